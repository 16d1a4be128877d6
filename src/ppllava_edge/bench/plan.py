"""What a bench run measures: its options, checked against the exports, and the list of variants (`plan`); the
stage names every report uses (`STAGES`, the same names as `runtime.pipeline.Timings` and `--dump`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError
from ..manifest import ExportManifest, load_manifest
from ..runtime.stages import TIMED_STAGES

BACKENDS = ("ort", "trt", "torch")
BASELINES = ("nopool", "avgpool")
STAGES = TIMED_STAGES
"""Timed stages (ms), the route's vocabulary (runtime/stages.py). `decode_step` pools every decode step of every run (TPOT)."""
DERIVED_STAGES = ("ttft", "decode")
"""Per run: `ttft` = e2e minus the decode steps (time to first token); `decode` = all decode steps."""
DEFAULT_FRAMES = (8, 16, 32, 64)
NOPOOL_FRAMES = 8
"""LLaVA-NeXT's video setting in the paper: 8 frames x 576 patch tokens = 4608 visual tokens."""
HEADLINE_FRAMES = 32
"""Top-level numbers and targets use 32 frames (the paper's setting) when measured, else the largest frames."""
QUESTIONS = (
    "What is happening in the video?",
    "Describe the colours and the shapes you can see.",
    "Which object moves fastest, and in which direction?",
    "How many distinct objects appear in the clip?",
    "Summarise the video in one sentence.",
    "What changes between the beginning and the end?",
    "Is there any text or number visible?",
    "Where is the square at the end of the clip?",
)

ProgressFn = Callable[[int, int, str], None]


# ---- options and validation ---------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    exports: list[Path]
    video: Path | None = None
    image: tuple[Path, ...] = ()  # bench an image instead of a video (its anyres tiles play the frames' part); several: one question about all
    synthetic: bool = False
    frames: list[int] | None = None  # None: DEFAULT_FRAMES within every export's range
    questions: int = 2
    max_new_tokens: int = 32
    warmup: int = 1
    iterations: int = 5
    provider: str = "auto"
    backends: tuple[str, ...] = ("ort",)
    baselines: tuple[str, ...] = ()
    threads: int | None = None
    engines: tuple[Path, ...] = ()  # one TensorRT engine folder per export, for backend "trt"
    hardware: bool = True  # measure bandwidth / GEMM FLOP/s (a few seconds)
    bandwidth_mb: int | None = None  # working set of the bandwidth probe (default: 1 GiB or 16x the LLC)
    gemm_n: int = 1536
    workdir: Path | None = None  # where --synthetic writes its video (default: a temporary folder)
    raise_errors: bool = False  # re-raise a failing variant's exception instead of recording it
    cold_start: bool = False  # after the runs: one fresh-process `ask` of the reference export (its wall minus the warm answer)
    command: str | None = None


def parse_choices(value: str | list[str] | tuple[str, ...] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'a,b' (or a list) -> ('a', 'b'), each checked against `allowed`; duplicates dropped, order kept."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [v for part in value for v in str(part).split(",")]
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in allowed:
            raise InputError(f"unknown {what} {raw.strip()!r}; choose from: {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_frames(value: str | list[int] | None) -> list[int] | None:
    """'8,16,32' -> [8, 16, 32]; every value must be an even integer >= 2."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    frames: list[int] = []
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        try:
            f = int(text)
        except ValueError:
            raise InputError(f"--frames: {text!r} is not an integer (expected a list such as 8,16,32)") from None
        if f < 2 or f % 2:
            raise InputError(
                f"--frames {f}: frame counts must be even and >= 2 (the (2,3,3) pooling pairs frames, so the token "
                "count is T/2 x tokens per pair).\nHint: use 8,16,32 or 64."
            )
        if f not in frames:
            frames.append(f)
    if not frames:
        raise InputError("--frames is empty; give a list such as 8,16,32")
    return frames


@dataclass
class VariantSpec:
    name: str
    kind: str  # "export" | "torch" | "baseline"
    backend: str  # "ort" | "trt" | "torch"
    manifest: ExportManifest
    frames: list[int]
    baseline: str | None = None
    engines: Path | None = None
    precision: str = "fp32"


def precision_label(manifest: ExportManifest) -> str:
    """Precision of the graphs a pooled answer runs: 'fp32' when vision, prompt_pool and decoder agree, else
    'vis int8 / pool fp32 / llm int8'."""
    precs = [manifest.precision(g) if g in manifest.graph_names else manifest.dtype for g in ("vision", "prompt_pool", "decoder")]
    if len(set(precs)) == 1:
        return precs[0]
    return " / ".join(f"{short} {p}" for short, p in zip(("vis", "pool", "llm"), precs))


def _check_frames(manifest: ExportManifest, frames: list[int], what: str) -> None:
    fmin, _, fmax = manifest.frames
    lo = max(fmin, 2)
    bad = [f for f in frames if not lo <= f <= fmax]
    if bad:
        raise InputError(
            f"{what} {','.join(map(str, bad))} outside the frame range {lo}..{fmax} of export {manifest.folder}.\n"
            "Hint: re-export with --frames MIN:OPT:MAX covering it, or bench fewer frames."
        )


def _prompt_len(manifest: ExportManifest, questions: int, images: int = 1) -> int:
    """Longest prompt (text ids, image tokens excluded) of the first `questions` questions with `images` image slots."""
    tok = manifest.llama_tokenizer()
    return max(len(tok.prompt_ids(q, images=images)) - images for q in QUESTIONS[:questions])


def plan(opts: BenchOptions) -> list[VariantSpec]:
    """Check the options against the exports and list the variants; raises InputError / ConfigError."""
    if not opts.exports:
        raise InputError("give at least one EXPORT folder")
    for name, value, low in (("--iterations", opts.iterations, 1), ("--warmup", opts.warmup, 0), ("--questions", opts.questions, 1), ("--max-new-tokens", opts.max_new_tokens, 1)):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if opts.questions > len(QUESTIONS):
        raise InputError(f"--questions must be <= {len(QUESTIONS)}, got {opts.questions}")
    if opts.video is not None and opts.synthetic:
        raise InputError("give either --video FILE or --synthetic, not both")
    if opts.image and (opts.video is not None or opts.synthetic):
        raise InputError("give either --image FILE or a video (--video / --synthetic), not both")
    if opts.threads is not None and opts.threads < 1:
        raise InputError(f"--threads must be >= 1, got {opts.threads}")
    backends = parse_choices(list(opts.backends), BACKENDS, "backend")
    baselines = parse_choices(list(opts.baselines), BASELINES, "baseline")
    if not backends and not baselines:
        raise InputError("nothing to run: give at least one --backend or --baseline")
    manifests = [load_manifest(e) for e in opts.exports]
    engines: list[Path] = []
    if "trt" in backends:
        if opts.engines and len(opts.engines) != len(manifests):
            raise ConfigError(
                f"--backend trt takes one --engines folder per EXPORT ({len(manifests)} export(s), {len(opts.engines)} --engines given)."
            )
        engines = [Path(e) for e in opts.engines] or [m.folder / "engines" for m in manifests]
        from ..engine.metadata import ENGINES_JSON

        missing = [str(e) for e in engines if not (e / ENGINES_JSON).is_file()]
        if missing:
            raise ConfigError(
                f"--backend trt: no TensorRT engine folder ({ENGINES_JSON}) at {', '.join(missing)}.\n"
                "Hint: build one with `ppllava-edge build EXPORT --out EXPORT/engines` (the default place), or pass --engines DIR per EXPORT."
            )
        from ..engine.availability import require_tensorrt

        require_tensorrt("--backend trt")
    if any(b in backends for b in ("ort", "trt")) or baselines:
        from ..runtime.session import resolve_provider

        resolve_provider(opts.provider)  # unknown / unavailable provider -> InferenceError

    if opts.image:
        frames = _image_frames(opts, manifests, baselines)
    else:
        if opts.frames is None:
            frames = [f for f in DEFAULT_FRAMES if all(max(m.frames[0], 2) <= f <= m.frames[2] for m in manifests)]
            frames = frames or [manifests[0].frames[1] + manifests[0].frames[1] % 2]
        else:
            frames = parse_frames(opts.frames)
        for m in manifests:
            _check_frames(m, frames, "--frames")
            limit = m.model["max_position_embeddings"]
            longest = _prompt_len(m, opts.questions) + m.visual_tokens(max(frames)) + opts.max_new_tokens
            if longest > limit:
                raise InputError(
                    f"{max(frames)} frames ({m.visual_tokens(max(frames))} visual tokens) + prompt + --max-new-tokens "
                    f"{opts.max_new_tokens} = {longest} positions exceed the LLM context of {limit} ({m.folder}).\n"
                    "Hint: bench fewer frames or fewer new tokens."
                )
    if "nopool" in baselines:
        _check_frames(manifests[0], [NOPOOL_FRAMES], "the nopool baseline's frames")

    labels = [m.folder.name or str(m.folder) for m in manifests]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
    specs: list[VariantSpec] = []
    for i, (m, label) in enumerate(zip(manifests, labels)):
        for b in backends:
            if b == "torch":
                continue
            name = label if b == "ort" else f"{label} {b}"
            specs.append(VariantSpec(name, "export", b, m, frames, engines=engines[i] if b == "trt" else None, precision=precision_label(m)))
    for b in baselines:
        m = manifests[0]
        specs.append(VariantSpec(b, "baseline", "ort", m, [NOPOOL_FRAMES] if b == "nopool" else frames, baseline=b, precision=precision_label(m)))
    if "torch" in backends:
        seen: list[str] = []
        for m in manifests:
            ck = m.checkpoint["path"]
            if ck in seen:
                continue
            seen.append(ck)
        for ck in seen:
            m = next(x for x in manifests if x.checkpoint["path"] == ck)
            name = "torch" if len(seen) == 1 else f"torch {Path(ck).name}"
            specs.append(VariantSpec(name, "torch", "torch", m, frames, precision="fp32"))
    return specs


def _image_frames(opts: BenchOptions, manifests: list[ExportManifest], baselines: tuple[str, ...]) -> list[int]:
    """--image: the image's tile count stands in for the frames (one entry per variant); several --image: their
    number does. Checks the options."""
    from ..media import input_kind, read_image_size

    if opts.frames is not None:
        raise InputError("--frames is for videos; an image's tiles follow from its size and the export's image_grid_pinpoints")
    if baselines:
        raise InputError("--baseline nopool/avgpool are video baselines; drop --baseline with --image")
    for image in map(Path, opts.image):
        if not image.is_file():
            raise InputError(f"--image {image}: no such file")
        if input_kind(image) != "image":
            raise InputError(f"--image {image}: not an image file (by its extension)")
    if len(opts.image) > 1:
        return [_images_count(opts, manifests)]
    image = Path(opts.image[0])
    size = read_image_size(image)
    tiles = set()
    for m in manifests:
        layout = m.image_layout(size)
        tiles.add(layout.tiles)
        limit = m.model["max_position_embeddings"]
        longest = _prompt_len(m, opts.questions) + layout.num_tokens + opts.max_new_tokens
        if longest > limit:
            raise InputError(
                f"the image ({layout.num_tokens} visual tokens) + prompt + --max-new-tokens {opts.max_new_tokens} = {longest} "
                f"positions exceed the LLM context of {limit} ({m.folder}).\nHint: bench fewer new tokens."
            )
    if len(tiles) != 1:
        raise InputError(f"--image {image}: the exports cut it into different tile counts ({sorted(tiles)}); bench them separately")
    return [tiles.pop()]


def _images_count(opts: BenchOptions, manifests: list[ExportManifest]) -> int:
    """Several --image: one question about all of them (g*g visual tokens each); checks their number and the context."""
    from ..media import check_num_images

    n = len(opts.image)
    for m in manifests:
        check_num_images(n, m.frames[2])  # they go through the vision graph as one clip
        m.image_layout(None)  # an export from before image tiles: a clear error
        tokens = n * m.image_rules["pooled_grid"] ** 2
        longest = _prompt_len(m, opts.questions, images=n) + tokens + opts.max_new_tokens
        if longest > m.model["max_position_embeddings"]:
            raise InputError(
                f"{n} images ({tokens} visual tokens) + prompt + --max-new-tokens {opts.max_new_tokens} = {longest} positions exceed "
                f"the LLM context of {m.model['max_position_embeddings']} ({m.folder}).\nHint: bench fewer images or fewer new tokens."
            )
    return n


def headline_frames(frames: list[int]) -> int:
    return HEADLINE_FRAMES if HEADLINE_FRAMES in frames else max(frames)


def reference_entry(entries: list[dict], frames: int) -> dict | None:
    """The first variant's entry at `frames` (the reference of ratios and headline numbers), if it ran."""
    if not entries:
        return None
    first = entries[0]["name"]
    return next((e for e in entries if e["name"] == first and e["frames"] == frames and not e.get("error")), None)


TORCH_RATIO_STAGES = ("vision", "prefill", "decode_step", "ttft", "e2e")
