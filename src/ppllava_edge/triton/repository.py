"""`ppllava-edge triton-repo`: a Triton model repository made from an export folder.

    OUT/
      ppllava/config.pbtxt              Python backend, decoupled (streams text deltas), instance_group
      ppllava/1/model.py                imports TritonPythonModel from the installed ppllava_edge
      ppllava/1/export/                 the export folder's files (reflinks where the filesystem allows, else copies)
      ppllava/1/engines/                --backend trt: engines.json + the decoder engine
      vision/, prompt_pool/, image_pool/    --kind gpu only: each stage as its own model, called by ppllava (BLS)
        config.pbtxt                    onnxruntime backend (TensorRT accelerator) or tensorrt_plan
        1/model.onnx | 1/model.plan

The export is copied into the repository, as reflinks (copy-on-write clones: no bytes duplicated) on file systems
that have them (Btrfs, XFS, ...), else as plain copies: the repository is then self-contained (one folder to mount
into a container or ship to a replica), and a later `ppllava-edge export --force` to the same path cannot change a
running server's model under it. Never hard links: onnx's external-data loader refuses a file with several links
("potential hardlink attack"), so the source export could no longer be quantized.

Written atomically (a temp folder beside OUT, renamed at the end): an error leaves no half-written repository.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..atomic import AtomicDir
from ..errors import ConfigError, InputError
from ..manifest import MANIFEST_NAME, ExportManifest, graph_files, load_manifest
from .pbtxt import Enum, string_parameters, to_pbtxt
from .protocol import INPUTS, MODEL_NAME, OUTPUTS, TensorSpec

# stages served as their own Triton models with --kind gpu (the Python model calls them with BLS requests)
STAGE_MODELS = ("vision", "prompt_pool", "image_pool")
KINDS = ("cpu", "gpu")
BACKENDS = ("ort", "trt")
CONFIG_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
MODEL_PY = '''"""Triton Python-backend entry point written by `ppllava-edge triton-repo`; the code is the installed package's."""

from ppllava_edge.triton.python_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """What `ppllava-edge triton-repo` writes (see the module docstring and the README's Triton section)."""

    instances: int = 1  # instance_group count of every model (per GPU with --kind gpu)
    kind: str = "cpu"  # cpu: everything in the Python model; gpu: vision/pool stages as their own GPU models
    backend: str = "ort"  # gpu stage models: ort (onnxruntime backend, TensorRT accelerator) or trt (tensorrt_plan)
    engines: Path | None = None  # engine folder of `ppllava-edge build` for backend trt (default EXPORT/engines)
    frames: int = 8  # frames per video when a request does not send `frames` (as `ask --frames`)
    max_tokens: int = 32  # new tokens when a request does not send `max_tokens` (as `ask --max-new-tokens`)
    threads: int | None = None  # ONNX Runtime intra-op threads per instance (None: CPU cores // instances)
    cache_dir: Path | None = None  # feature cache shared on disk by every instance (and replicas on a shared volume)
    cache_mb: int = 2048  # in-memory feature cache per instance
    trt_cache_dir: str | None = None  # --kind gpu --backend ort: onnxruntime's TensorRT engine cache (None: default_trt_cache_dir())

    def check(self) -> None:
        if self.instances < 1:
            raise InputError(f"--instances {self.instances}: must be >= 1")
        if self.kind not in KINDS:
            raise InputError(f"--kind {self.kind!r}: choose cpu or gpu")
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend!r}: choose ort (onnxruntime backend) or trt (tensorrt_plan engines)")
        if self.backend == "trt" and self.kind != "gpu":
            raise InputError("--backend trt needs --kind gpu: TensorRT engines run on a GPU.")
        if self.engines is not None and self.backend != "trt":
            raise InputError("--engines is used with --backend trt only.")
        if self.max_tokens < 1:
            raise InputError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads}: must be >= 1")
        if self.cache_mb < 0:
            raise InputError(f"--cache-mb {self.cache_mb}: must be >= 0")


def write_repository(export_dir: str | Path, out: str | Path, options: RepositoryOptions | None = None, force: bool = False) -> Path:
    """Write the Triton model repository for `export_dir` at `out` (see the module docstring). Returns `out`.

    Raises:
        ConfigError: not an export folder, or engines that do not belong to it.
        InputError: an option out of range, or a non-empty `out` without `force`.
    """
    opts = options or RepositoryOptions()
    opts.check()
    manifest = load_manifest(export_dir)
    fmin, _, fmax = manifest.frames
    if not (max(fmin, 2) <= opts.frames <= fmax):
        raise InputError(f"--frames {opts.frames} is outside this export's frame range {max(fmin, 2)}..{fmax}.")
    engines = _load_engines(manifest, opts) if opts.backend == "trt" else None
    stages = [s for s in STAGE_MODELS if manifest.has_graph(manifest.graph_for(s, "ort"))] if opts.kind == "gpu" else []
    if engines is not None:
        stages = [s for s in stages if s in engines["engines"]]
    for need in ("vision", "prompt_pool"):
        if opts.kind == "gpu" and need not in stages:
            raise ConfigError(f"{manifest.folder}: --kind gpu serves the {need} stage as its own model, but there is no {need} "
                              + ("engine in " + str(opts.engines or manifest.folder / "engines") if engines is not None else "graph in the export"))
    if stages and engines is None:  # the onnxruntime backend's TensorRT engine cache: a folder only we can write
        opts = dataclasses.replace(opts, trt_cache_dir=str(private_dir(Path(opts.trt_cache_dir) if opts.trt_cache_dir else default_trt_cache_dir())))
    out = Path(out)
    with AtomicDir(out, force=force) as tmp:
        version = tmp / MODEL_NAME / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY)
        _link_export(manifest, version / "export")
        if engines is not None:
            _link_engines(engines, _engine_dir(manifest, opts), version / "engines", ["decoder"])
        (tmp / MODEL_NAME / "config.pbtxt").write_text(_python_model_config(manifest, opts, stages))
        for stage in stages:
            (tmp / stage / "1").mkdir(parents=True)
            if engines is not None:
                _link(_engine_dir(manifest, opts) / engines["engines"][stage]["file"], tmp / stage / "1" / "model.plan")
            else:
                src = manifest.path(manifest.graph_for(stage, "ort"))
                _link_onnx(src, tmp / stage / "1", "model.onnx")
            (tmp / stage / "config.pbtxt").write_text(_stage_config(manifest, opts, stage, engines))
    return out


# ---- files ---------------------------------------------------------------------------------------------------
def default_trt_cache_dir() -> Path:
    """Per user: $XDG_CACHE_HOME (or ~/.cache)/ppllava-edge/trt-cache. Not a shared /tmp path, where another local
    user could create the folder first and pre-seed engines the server would load."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppllava-edge" / "trt-cache"


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can write (created with mode 0700; an existing one of ours is tightened
    to 0700). Absolute, so the server finds it whatever its working directory.

    Raises:
        ConfigError: it exists and is not a folder, or belongs to another user.
    """
    path = Path(path).absolute()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the TensorRT engine cache folder ({exc.strerror}).") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: not a folder (a symlink or a file); the TensorRT engine cache must be a private folder.")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path}: owned by another user (uid {st.st_uid}), who could place engines in it.\n"
                          "Hint: pass a folder of your own (RepositoryOptions.trt_cache_dir) or remove that one.")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


FICLONE = 0x40049409  # Linux ioctl: make dst a copy-on-write clone of src (Btrfs, XFS, bcachefs, OCFS2)


def _link(src: Path, dst: Path) -> None:
    """`src` at `dst` as a reflink where the file system can clone, else a copy (never a hard link: see the module
    docstring)."""
    try:
        import fcntl

        with open(src, "rb") as fs, open(dst, "wb") as fd:
            fcntl.ioctl(fd.fileno(), FICLONE, fs.fileno())
        shutil.copystat(src, dst)
    except (OSError, ImportError):  # no reflinks here (ext4, tmpfs, another device, not Linux): copy
        shutil.copy2(src, dst)


def _link_onnx(src: Path, folder: Path, name: str) -> None:
    """The graph as `folder/name`; external-data files keep their names (the graph refers to them by name)."""
    main, *data = graph_files(src)
    _link(main, folder / name)
    for d in data:
        _link(d, folder / d.name)


def _link_export(manifest: ExportManifest, dst: Path) -> None:
    """The files the runtime reads: export.json, every graph (+ external data), tokenizers, tables."""
    dst.mkdir()
    for f in sorted({manifest.folder / MANIFEST_NAME, *manifest.files()}):
        _link(f, dst / f.name)


def _engine_dir(manifest: ExportManifest, opts: RepositoryOptions) -> Path:
    return Path(opts.engines) if opts.engines is not None else manifest.folder / "engines"


def _load_engines(manifest: ExportManifest, opts: RepositoryOptions) -> dict:
    from ..engine.metadata import check_export, load_metadata

    meta = load_metadata(_engine_dir(manifest, opts))
    check_export(meta, manifest)
    if "decoder" not in meta["engines"]:
        raise ConfigError(f"{_engine_dir(manifest, opts)}: no decoder engine (the Python model runs the decoder with it).")
    return meta


def _link_engines(meta: dict, src: Path, dst: Path, keep: list[str]) -> None:
    """engines.json limited to the `keep` engines (the stage engines live in their own models), and their files."""
    from ..engine.metadata import write_metadata

    dst.mkdir()
    sub = dict(meta, engines={k: v for k, v in meta["engines"].items() if k in keep})
    for entry in sub["engines"].values():
        _link(src / entry["file"], dst / entry["file"])
    write_metadata(dst, sub)


# ---- configs -------------------------------------------------------------------------------------------------
def _tensor(spec: TensorSpec) -> dict:
    t = {"name": spec.name, "data_type": Enum(spec.data_type), "dims": list(spec.dims)}
    if spec.optional:
        t["optional"] = True
    return t


def _graph_tensor(io: dict) -> dict:
    dtype = CONFIG_TYPES.get(io["dtype"])
    if dtype is None:
        raise ConfigError(f"tensor {io['name']!r} has dtype {io['dtype']}, which this repository writer does not map to a Triton type")
    return {"name": io["name"], "data_type": Enum(dtype), "dims": [d if isinstance(d, int) else -1 for d in io["dims"]]}


def _instance_group(opts: RepositoryOptions) -> list[dict]:
    return [{"count": opts.instances, "kind": Enum("KIND_GPU" if opts.kind == "gpu" else "KIND_CPU")}]


def _threads(opts: RepositoryOptions) -> int:
    """Intra-op threads per instance: --threads, or on CPU the cores shared out between the instances (0 on GPU:
    onnxruntime's default for what little runs on the CPU)."""
    if opts.threads is not None:
        return opts.threads
    return max(1, (os.cpu_count() or 1) // opts.instances) if opts.kind == "cpu" else 0


def _python_model_config(manifest: ExportManifest, opts: RepositoryOptions, stages: list[str]) -> str:
    params = {
        "export_dir": "export",  # relative to the model version folder
        "frames": opts.frames,
        "max_tokens": opts.max_tokens,
        "provider": "cuda" if opts.kind == "gpu" else "cpu",
        "backend": opts.backend,
        "engines": "engines" if opts.backend == "trt" else "",
        "threads": _threads(opts),  # 0: onnxruntime's default
        "cache_dir": str(Path(opts.cache_dir).resolve()) if opts.cache_dir else "",
        "cache_mb": opts.cache_mb,
        "bls_stages": ",".join(stages),  # stages run by their own models through BLS requests
    }
    config = {
        "name": MODEL_NAME,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [_tensor(s) for s in INPUTS],
        "output": [_tensor(s) for s in OUTPUTS],
        "instance_group": _instance_group(opts),
        "parameters": string_parameters(params),
    }
    comments = [
        f"written by `ppllava-edge triton-repo` from {manifest.folder.resolve()}",
        f"export created {manifest.created or '?'}, checkpoint sha256 {manifest.checkpoint['sha256'][:16]}, preset {manifest.preset or '?'}, dtype {manifest.dtype}",
        f"--kind {opts.kind} --instances {opts.instances} --backend {opts.backend}"
        + (f": {', '.join(stages)} run as their own models (BLS requests)" if stages else ": every stage runs in this Python model"),
        "decoupled: each request gets its answer as a stream of `text` deltas; the final response adds `stats` (JSON).",
        "No dynamic batching: the graphs have no batch axis (the BT-Adapter attends across one video's frames), so",
        "concurrent requests run on separate instances.",
    ]
    return to_pbtxt(config, comments)


def _stage_config(manifest: ExportManifest, opts: RepositoryOptions, stage: str, engines: dict | None) -> str:
    graph = manifest.graph(manifest.graph_for(stage, "trt" if engines is not None else "ort"))
    config: dict = {"name": stage}
    if engines is not None:
        config.update(platform="tensorrt_plan", max_batch_size=0, default_model_filename="model.plan")
    else:
        config.update(backend="onnxruntime", max_batch_size=0, default_model_filename="model.onnx")
    config["input"] = [_graph_tensor(i) for i in graph["inputs"]]
    config["output"] = [_graph_tensor(o) for o in graph["outputs"]]
    config["instance_group"] = _instance_group(opts)
    if engines is None:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [_tensorrt_accelerator(manifest, opts, stage)]}}
    comments = [
        f"{stage} stage of {manifest.folder.name}, called by the `{MODEL_NAME}` model (BLS); max_batch_size 0: "
        "the graph has no batch axis, dims are the full shapes (-1 = dynamic).",
    ]
    if engines is not None:
        entry = engines["engines"][stage]
        comments.append(f"engine {entry['file']} (TensorRT {engines.get('tensorrt', '?')}, sm{engines.get('gpu', {}).get('sm', '?')}): "
                        "Triton's TensorRT must be the version that built it.")
    return to_pbtxt(config, comments)


def _tensorrt_accelerator(manifest: ExportManifest, opts: RepositoryOptions, stage: str) -> dict:
    """onnxruntime backend: the TensorRT execution provider with an engine cache and the export's shape ranges."""
    from ..engine.profiles import graph_profiles, resolve_limits

    profile = graph_profiles(manifest, resolve_limits(manifest), [stage], sources={stage: manifest.graph_for(stage, "ort")})[stage][0]

    def shapes(corner: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in rng[corner])}" for name, rng in profile.items())

    params = {
        "precision_mode": "FP16" if manifest.dtype == "fp16" else "FP32",
        "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{opts.trt_cache_dir}/{stage}",
        "trt_profile_min_shapes": shapes(0),
        "trt_profile_opt_shapes": shapes(1),
        "trt_profile_max_shapes": shapes(2),
    }
    return {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in params.items()]}
