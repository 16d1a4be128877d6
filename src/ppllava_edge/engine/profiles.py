"""TensorRT optimization profiles derived from an export manifest (`export.json`). Pure: no TensorRT, no numpy.

Every dynamic dimension in the manifest is a symbol or a small integer expression of symbols ("frames",
"36*frames", "4*((frames//2))", "batch", "seq", "past", "total", "tokens"). A profile gives each symbol a
(min, opt, max) triple; the input shapes follow by evaluating the dims at the three corners.

- vision:          one profile over T (frames); min 1 when the export range starts at <= 2, because the image
                   path runs one tile through the vision graph.
- prompt_pool:     one profile over T, min 2 (pooling needs a frame pair).
- projector_head:  one profile over N tokens = T * patches_per_frame (min 1).
- image_pool:      one profile over an image's anyres tiles, 1..max_tiles (export.json `image.max_tiles`); exports
                   from before image tiles have a static one-tile graph (no profile).
- decoder:         two profiles, as in TensorRT Edge-LLM's LLM engines:
                   context    seq 1..max_input_len, past 0,              total = seq
                   generation seq 1,                past 1..max_seq_len-1, total = past + 1

    limits = resolve_limits(manifest, frames=(2, 8, 16))   # manifest: manifest.ExportManifest
    profiles = graph_profiles(manifest, limits)   # {"decoder": [{"inputs_embeds": ((1,1,64), ...)}, ...]}
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass

from ..errors import ConfigError, InputError
from ..manifest import ExportManifest

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
Profile = dict[str, ShapeRange]  # input name -> shapes

CONTEXT, GENERATION = 0, 1
DECODER_PROFILES = ("context", "generation")
DEFAULT_TEXT_TOKENS = 256  # prompt text headroom on top of the visual tokens for the default --max-input-len
OPT_TEXT_TOKENS = 64  # typical question + template length, used for the opt shapes
OPT_NEW_TOKENS = 32


@dataclass(frozen=True)
class BuildLimits:
    """Resolved shape limits of one engine build (recorded in engines.json)."""

    frames: tuple[int, int, int]  # MIN:OPT:MAX frames of the video path
    max_input_len: int  # longest prefill (prompt tokens incl. visual tokens)
    max_seq_len: int  # longest context (prompt + generated tokens)
    max_batch: int = 1  # decoder batch (beam search needs num_beams)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["frames"] = list(self.frames)
        return d


def parse_frames_spec(spec: str) -> tuple[int, int, int]:
    """'2:8:16' -> (2, 8, 16), checking 1 <= MIN <= OPT <= MAX."""
    try:
        parts = tuple(int(p) for p in spec.split(":"))
    except ValueError as exc:
        raise InputError(f"--frames {spec!r}: expected MIN:OPT:MAX integers, e.g. 2:8:16") from exc
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise InputError(f"--frames {spec!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 2:8:16")
    return parts  # type: ignore[return-value]


# ---- dimension expressions -------------------------------------------------------------------------
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}


def dim_symbols(dim: int | str) -> set[str]:
    """Symbol names used by one manifest dim (empty for a static int)."""
    if isinstance(dim, int):
        return set()
    return {n.id for n in ast.walk(_parse_dim(dim)) if isinstance(n, ast.Name)}


def _parse_dim(expr: str) -> ast.expr:
    try:
        return ast.parse(expr, mode="eval").body
    except SyntaxError as exc:
        raise ConfigError(f"manifest dim {expr!r} is not an integer expression") from exc


def eval_dim(dim: int | str, env: dict[str, int]) -> int:
    """Value of a manifest dim ('36*frames', 'past + seq', 64) for symbol values `env` (+ - * // only)."""
    if isinstance(dim, int):
        return dim

    def ev(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise ConfigError(f"manifest dim {dim!r}: no value for symbol {node.id!r} (known: {', '.join(sorted(env))})")
            return int(env[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ConfigError(f"manifest dim {dim!r}: unsupported expression {ast.dump(node)}")

    return ev(_parse_dim(dim))


def shape_of(dims: list, env: dict[str, int]) -> Shape:
    return tuple(eval_dim(d, env) for d in dims)


# ---- limits -----------------------------------------------------------------------------------------
def export_frame_range(manifest: ExportManifest) -> tuple[int, int]:
    """(lowest, highest) frame count the export's vision graph accepts (the exporter lets T=1 through when MIN <= 2)."""
    fmin, _, fmax = manifest.frames
    return (1 if fmin <= 2 else fmin), fmax


def resolve_limits(
    manifest: ExportManifest,
    frames: tuple[int, int, int] | None = None,
    max_input_len: int | None = None,
    max_seq_len: int | None = None,
    max_batch: int = 1,
) -> BuildLimits:
    """Defaults and checks for the build options of `manifest`'s export.

    Defaults: frames = the export's range; max_seq_len = the LLM context (max_position_embeddings);
    max_input_len = visual tokens at MAX frames + DEFAULT_TEXT_TOKENS (capped at max_seq_len).
    """
    lo, hi = export_frame_range(manifest)
    fr = tuple(frames) if frames is not None else manifest.frames
    if not (1 <= fr[0] <= fr[1] <= fr[2]):
        raise InputError(f"--frames {fr[0]}:{fr[1]}:{fr[2]}: expected 1 <= MIN <= OPT <= MAX")
    if fr[0] < lo or fr[2] > hi:
        raise InputError(
            f"--frames {fr[0]}:{fr[1]}:{fr[2]} is outside the export's frame range {lo}..{hi}.\n"
            "Hint: re-export with `ppllava-edge export --frames MIN:OPT:MAX` covering it."
        )
    if fr[2] < 2:
        raise InputError(f"--frames {fr[0]}:{fr[1]}:{fr[2]}: MAX must be >= 2 (prompt-guided pooling works on frame pairs)")
    context = int(manifest.model["max_position_embeddings"])
    seq = context if max_seq_len is None else int(max_seq_len)
    if not (2 <= seq <= context):
        raise InputError(f"--max-seq-len {seq}: must be in 2..{context} (the LLM context, max_position_embeddings)")
    need = max(manifest.visual_tokens(fr[2]), manifest.image_tokens)
    inp = min(seq, need + DEFAULT_TEXT_TOKENS) if max_input_len is None else int(max_input_len)
    if not (1 <= inp <= seq):
        raise InputError(f"--max-input-len {inp}: must be in 1..--max-seq-len ({seq})")
    if max_batch < 1:
        raise InputError(f"--max-batch {max_batch}: must be >= 1")
    return BuildLimits(frames=fr, max_input_len=inp, max_seq_len=seq, max_batch=int(max_batch))  # type: ignore[arg-type]


# ---- symbol ranges per graph ------------------------------------------------------------------------
def symbol_ranges(graph: str, manifest: ExportManifest, limits: BuildLimits, static_frames: bool = False) -> list[tuple[str, dict[str, tuple[int, int, int]]]]:
    """[(profile name, {symbol: (min, opt, max)})] for one stage of the manifest.

    `static_frames` pins the vision profile to exactly the frame count of `limits` (MIN = OPT = MAX), as DLA
    needs: its profile's min, opt and max must be equal, and images (one tile) are then not covered.
    """
    fmin, fopt, fmax = limits.frames
    if graph == "vision":
        if static_frames:
            if fmin != fmax:
                raise InputError(f"--frames {fmin}:{fopt}:{fmax}: a static vision profile needs MIN = OPT = MAX (e.g. --frames {fmax}:{fmax}:{fmax})")
            return [(f"frames={fmax}", {"frames": (fmax, fmax, fmax)})]
        lo = 1 if fmin <= 2 else fmin
        return [("frames", {"frames": (lo, max(lo, fopt), fmax)})]
    if graph == "prompt_pool":
        lo = max(2, fmin)
        return [("frames", {"frames": (lo, max(lo, fopt), fmax)})]
    if graph == "image_pool" and manifest.image_rules:
        n = int(manifest.image_rules["max_tiles"])
        return [("tiles", {"tiles": (1, n, n)})]
    if graph == "projector_head":
        p = int(manifest.model["patches_per_frame"])
        return [("tokens", {"tokens": (1, fopt * p, fmax * p)})]
    if graph == "decoder":
        b = limits.max_batch
        ctx_opt = max(1, min(limits.max_input_len, manifest.visual_tokens(fopt) + OPT_TEXT_TOKENS))
        gen_max = limits.max_seq_len - 1
        gen_opt = max(1, min(gen_max, ctx_opt + OPT_NEW_TOKENS))
        context = {"batch": (1, 1, b), "seq": (1, ctx_opt, limits.max_input_len), "past": (0, 0, 0), "total": (1, ctx_opt, limits.max_input_len)}
        generation = {"batch": (1, 1, b), "seq": (1, 1, 1), "past": (1, gen_opt, gen_max), "total": (2, gen_opt + 1, gen_max + 1)}
        return [(DECODER_PROFILES[CONTEXT], context), (DECODER_PROFILES[GENERATION], generation)]
    return [("static", {})]


def graph_profiles(
    manifest: ExportManifest,
    limits: BuildLimits,
    graphs: list[str] | None = None,
    sources: dict[str, str] | None = None,
    static_frames: tuple[str, ...] = (),
) -> dict[str, list[Profile]]:
    """{stage: [profile, ...]} with profile = {input name: (min, opt, max) shape}, for every stage in `graphs`
    (default: every graph of the manifest).

    `sources` maps a stage to the manifest graph that is built for it (export.json `backends`; default: the stage's
    own graph); `static_frames` lists the stages whose frame profile is pinned (see symbol_ranges). A graph whose
    inputs are all static gets one profile with min == opt == max.
    """
    out: dict[str, list[Profile]] = {}
    for name in graphs or list(manifest.backend_graphs("trt")):
        spec = manifest.graph((sources or {}).get(name, manifest.graph_for(name, "trt")))  # engines are named by stage
        used = set().union(*(dim_symbols(d) for i in spec["inputs"] for d in i["dims"]))
        profiles = []
        for pname, ranges in symbol_ranges(name, manifest, limits, name in static_frames):
            missing = used - set(ranges)
            if missing:
                raise ConfigError(
                    f"graph {name!r}: no profile range for dynamic dims {sorted(missing)} (profile {pname!r}).\n"
                    "Note: this export has dims the engine builder does not know; it may come from a newer ppllava-edge."
                )
            corners = [{k: v[i] for k, v in ranges.items()} for i in range(3)]
            profiles.append({i["name"]: tuple(shape_of(i["dims"], env) for env in corners) for i in spec["inputs"]})  # type: ignore[misc]
        out[name] = profiles
    return out


def is_static(profile: Profile) -> bool:
    return all(lo == opt == hi for lo, opt, hi in profile.values())


def select_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int:
    """Index of the first profile whose ranges contain every given input shape; -1 when none does."""
    for idx, prof in enumerate(profiles):
        ok = True
        for name, shape in shapes.items():
            if name not in prof:
                continue
            lo, _, hi = prof[name]
            if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                ok = False
                break
        if ok:
            return idx
    return -1


def profiles_to_json(profiles: list[Profile], names: list[str], symbols: list[dict] | None = None) -> list[dict]:
    """JSON form for engines.json: [{"name", "dims": {symbol: [min, opt, max]}, "shapes": {input: {"min", "opt", "max"}}}]."""
    symbols = symbols or [{} for _ in profiles]
    return [
        {
            "name": n,
            "dims": {k: list(v) for k, v in sym.items()},
            "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in p.items()},
        }
        for n, p, sym in zip(names, profiles, symbols)
    ]


def format_symbols(symbols: dict[str, tuple[int, int, int]]) -> str:
    """'seq 1..80..384, past 0' (fixed symbols once, ranges as min..opt..max); 'static' when there are none."""
    parts = [f"{k} {lo}" if lo == hi else f"{k} {lo}..{opt}..{hi}" for k, (lo, opt, hi) in symbols.items()]
    return ", ".join(parts) or "static"


def profiles_from_json(items: list[dict]) -> list[Profile]:
    return [{k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in item["shapes"].items()} for item in items]
