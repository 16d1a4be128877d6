"""`engines.json`: what an engine folder was built with, and the checks before loading it. Pure (no TensorRT).

A serialized TensorRT engine only loads with the TensorRT version that built it, and NVIDIA's developer guide
says engines are specific to the exact GPU model they were built on (unless built version- or
hardware-compatible, which we do not do). So engine file names carry the version and SM
(`decoder.trt10.3.0.sm87.engine`, as clip_trt does), engines.json records the GPU name next to the SM, and
`check_compatible` refuses any mismatch with a message that says to rebuild, instead of TensorRT's deserialization
error or a silently slower engine.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, EngineBuildError
from ..digest import sha256_file
from ..jsonfile import read_json
from ..manifest import MANIFEST_NAME, ExportManifest

ENGINES_JSON = "engines.json"
FORMAT = "ppllava-edge-engines"
FORMAT_VERSION = 1


def normalize_trt_version(version: str) -> str:
    """'10.3.0.30' -> '10.3.0' (major.minor.patch: the part engine compatibility depends on)."""
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise ConfigError(f"not a TensorRT version: {version!r}")
    return ".".join((parts + ["0", "0"])[:3])


def trt_major(version: str) -> int:
    return int(normalize_trt_version(version).split(".")[0])


def sm_of(compute_capability: str | tuple[int, int] | int) -> int:
    """(8, 7) / '8.7' / 87 -> 87; (12, 0) -> 120."""
    if isinstance(compute_capability, int):
        return compute_capability
    if isinstance(compute_capability, str):
        if "." not in compute_capability:
            return int(compute_capability.removeprefix("sm"))
        major, minor = compute_capability.split(".", 1)
        return int(major) * 10 + int(minor)
    major, minor = compute_capability
    return int(major) * 10 + int(minor)


def engine_file_name(graph: str, trt_version: str, sm: int | str) -> str:
    """'{graph}.trt{version}.sm{XY}.engine', e.g. 'vision.trt10.3.0.sm87.engine' (for humans; engines.json is the truth)."""
    version = normalize_trt_version(trt_version) if trt_version != "unknown" else "unknown"
    return f"{graph}.trt{version}.sm{sm}.engine"


def onnx_hashes(export_dir: Path, onnx_name: str) -> dict[str, str]:
    """SHA-256 of a graph's file and the external-data files beside it (manifest.graph_files)."""
    from ..manifest import graph_files

    return {p.name: sha256_file(p) for p in graph_files(export_dir / onnx_name)}


def new_metadata(
    *,
    trt_version: str,
    gpu: dict,
    export: dict,
    limits: dict,
    options: dict,
    jetson: dict | None = None,
) -> dict:
    """Skeleton of engines.json; `engines` is filled per built engine with `engine_entry`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensorrt": normalize_trt_version(trt_version),
        "tensorrt_full": str(trt_version),
        "gpu": gpu,  # {"name", "compute_capability": "8.7", "sm": 87, "cuda_driver": "12.6", "cuda_runtime", "memory_bytes"}
        "jetson": jetson,  # {"model", "l4t", "jetpack", "power_mode", ...} or None
        "export": export,  # {"folder", "manifest_sha256", "created", "checkpoint_sha256", "dtype"}
        "limits": limits,
        "options": options,
        "engines": {},
    }


def engine_entry(
    *,
    file: str,
    graph: str | None = None,
    onnx: str,
    onnx_sha256: dict[str, str],
    precision: str,
    strongly_typed: bool,
    profiles: list[dict],
    device: str,
    size_bytes: int,
    build_seconds: float,
    trtexec: str,
    inputs: list[dict] | None = None,
    outputs: list[dict] | None = None,
    placement: dict | None = None,
) -> dict:
    """One engine of engines.json. `graph` is the export's graph it was built from (export.json `backends.trt`;
    the engine keeps the stage name); `placement` says what runs on the DLA (DLA engines only)."""
    entry = {
        "file": file,
        "graph": graph,
        "onnx": onnx,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "device": device,
        "profiles": profiles,
        "inputs": inputs or [],
        "outputs": outputs or [],
        "size_bytes": size_bytes,
        "build_seconds": round(build_seconds, 3),
        "trtexec": trtexec,
    }
    if placement is not None:
        entry["placement"] = placement
    return entry


def export_fingerprint(manifest: ExportManifest) -> dict:
    """What identifies the export the engines come from (checked again at load time)."""
    return {
        "folder": str(manifest.folder),
        "manifest_sha256": sha256_file(manifest.folder / MANIFEST_NAME),
        "created": manifest.created or "",
        "checkpoint_sha256": manifest.checkpoint["sha256"],
        "dtype": manifest.dtype,
    }


def write_metadata(folder: Path, meta: dict) -> Path:
    path = Path(folder) / ENGINES_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_metadata(folder: str | Path) -> dict:
    """Read `<folder>/engines.json` and check that every engine it names exists."""
    folder = Path(folder)
    path = folder / ENGINES_JSON
    meta = read_json(path, f"missing; {folder} is not an engine folder.\nHint: build one with `ppllava-edge build EXPORT --out {folder}`.", fmt=FORMAT)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {meta['format_version']} is newer than this ppllava-edge understands ({FORMAT_VERSION})")
    missing = [e["file"] for e in meta.get("engines", {}).values() if not (folder / e["file"]).is_file()]
    if missing:
        raise ConfigError(f"{path}: engine files named in it are missing: {', '.join(missing)}")
    return meta


def normalize_gpu_name(name: str | None) -> str | None:
    """One spelling per GPU: nvidia-smi on Jetson (JetPack 6) says 'Orin (nvgpu)' for what cudart (and engines.json)
    calls 'Orin'."""
    if name is None:
        return None
    return re.sub(r"\s*\(nvgpu\)\s*$", "", str(name)).strip() or None


def built_module(meta: dict) -> str | None:
    """The Jetson module the engines were built on (engines.json `gpu.module`, else from the recorded device-tree model)."""
    from .jetson import jetson_module

    return meta.get("gpu", {}).get("module") or jetson_module((meta.get("jetson") or {}).get("model"))


def check_compatible(meta: dict, trt_version: str, sm: int | None, gpu_name: str | None = None, module: str | None = None) -> None:
    """Refuse engines built by another TensorRT version, for another GPU architecture, on another GPU model or on
    another Jetson module (EngineBuildError). None for `sm`, `gpu_name` or `module` (not known here) skips that check."""
    built_v, built_sm = meta.get("tensorrt", "?"), meta.get("gpu", {}).get("sm")
    built_name = normalize_gpu_name(meta.get("gpu", {}).get("name"))
    gpu_name = normalize_gpu_name(gpu_name)
    built_mod = built_module(meta)
    have_v = normalize_trt_version(trt_version)
    problems = []
    if built_v != have_v:
        problems.append(f"TensorRT {built_v} built them, this machine has TensorRT {have_v}")
    if built_sm is not None and sm is not None and int(built_sm) != int(sm):
        problems.append(f"they target sm{built_sm} ({built_name or '?'}), this GPU is sm{sm}")
    elif built_name and gpu_name and built_name != gpu_name:
        problems.append(f"they were built on a {built_name}, this GPU is a {gpu_name}")
    elif built_mod and module and built_mod != module:
        problems.append(f"they were built on a {built_mod}, this is a {module} (same GPU architecture, another number of SMs"
                        + (", and no DLA" if module.endswith("Nano") else "") + ")")
    if problems:
        src = meta.get("export", {}).get("folder", "EXPORT")
        raise EngineBuildError(
            f"the engines cannot run here: {'; '.join(problems)}.\n"
            "Note: a TensorRT engine only loads with the TensorRT version that built it, and is specific to the GPU model it was built on.\n"
            f"Hint: rebuild them on this machine: ppllava-edge build {src} --out ENGINES --force"
        )


def check_export(meta: dict, manifest: ExportManifest) -> None:
    """Refuse engines built from a different export (checkpoint or export run) than the one being served."""
    exp = meta.get("export", {})
    mine = {"checkpoint_sha256": manifest.checkpoint["sha256"], "created": manifest.created or ""}
    bad = [k for k, v in mine.items() if exp.get(k) and v and exp[k] != v]
    if bad:
        where = manifest.folder
        raise EngineBuildError(
            f"the engines were built from another export ({', '.join(f'{k} {exp[k][:16]} != {mine[k][:16]}' for k in bad)}).\n"
            f"Hint: rebuild them from this export: ppllava-edge build {where} --out ENGINES --force"
        )
