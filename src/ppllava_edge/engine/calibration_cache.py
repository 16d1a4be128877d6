"""TensorRT text calibration caches: the header ('TRT-<version>-<algorithm>'), reading and checking every scale line,
retagging a cache for the installed TensorRT, the calibrator that only serves a cache (made at call time, as
Polygraphy does), and the activations of a parsed network the cache has no scale for.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from ..errors import EngineBuildError
from .metadata import normalize_trt_version

# calibration-cache header algorithm -> the TensorRT 10 calibrator class that accepts it (a cache whose algorithm
# does not match the calibrator is not used: pyInt8Doc.h, read_calibration_cache)
CALIBRATORS = {"EntropyCalibration2": "IInt8EntropyCalibrator2", "MinMaxCalibration": "IInt8MinMaxCalibrator"}


def trt_version_code(trt_version: str) -> int:
    """NV_TENSORRT_VERSION as in calibration cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    major, minor, patch = (int(x) for x in normalize_trt_version(trt_version).split("."))
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def retag_calibration_cache(text: str, trt_version: str) -> str:
    """Give a text calibration cache the header of the installed TensorRT ('TRT-100300-EntropyCalibration2').

    The per-tensor scales do not depend on the TensorRT version, but TensorRT ignores a cache whose header names
    another version (and would then try to calibrate, which needs data we do not feed).
    """
    lines = text.splitlines()
    algo = lines[0].split("-", 2)[2] if lines and lines[0].startswith("TRT-") and lines[0].count("-") >= 2 else "EntropyCalibration2"
    return "\n".join([f"TRT-{trt_version_code(trt_version)}-{algo}", *lines[1:]]) + "\n"


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(algorithm, {tensor: scale}) of a TensorRT text calibration cache, or EngineBuildError saying what is wrong.

    Format: a header 'TRT-<version>-<algorithm>' (e.g. TRT-100300-EntropyCalibration2), then one
    '<tensor>: <8 hex digits of the big-endian float32 scale>' line per tensor. TensorRT does not use a cache whose
    header names another version or calibrator (pyInt8Doc.h, read_calibration_cache) and would then calibrate, which
    needs data the build does not have: so the header and every line are checked here, before anything is built.
    """
    hint = "Hint: re-run `ppllava-edge quantize ... --trt-cache` to write it again."
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        raise EngineBuildError(f"{path}: cannot read the calibration cache ({exc}).\n{hint}") from exc
    m = re.fullmatch(r"TRT-(\d+)-(\w+)", lines[0].strip()) if lines else None
    if m is None:
        raise EngineBuildError(
            f"{path}: not a TensorRT calibration cache (first line {lines[0][:60] if lines else ''!r}; expected 'TRT-<version>-<algorithm>', "
            f"e.g. TRT-100300-EntropyCalibration2).\n{hint}"
        )
    algorithm = m.group(2)
    if algorithm not in CALIBRATORS:
        raise EngineBuildError(
            f"{path}: calibration algorithm {algorithm!r} in the header; the builder serves caches of {', '.join(CALIBRATORS)} "
            f"(TensorRT ignores a cache whose algorithm differs from its calibrator's).\n{hint}"
        )
    scales: dict[str, float] = {}
    bad = []
    for number, line in enumerate(lines[1:], 2):
        name, sep, value = line.rpartition(":")  # tensor names may hold ':' ('onnx::MatMul_12'); the scale is last
        value = value.strip()
        scale = None
        if sep and name.strip() and re.fullmatch(r"[0-9a-fA-F]{8}", value):
            scale = struct.unpack(">f", bytes.fromhex(value))[0]
        if scale is None or not math.isfinite(scale) or scale <= 0:
            bad.append(f"line {number}: {line.strip()[:60]!r}")
        else:
            scales[name.strip()] = scale
    if bad:
        raise EngineBuildError(f"{path}: {len(bad)} line(s) are not '<tensor>: <hex float32 scale>' with a positive scale: {'; '.join(bad[:3])}.\n{hint}")
    if not scales:
        raise EngineBuildError(f"{path}: the calibration cache holds no tensor scales.\n{hint}")
    return algorithm, scales


def _cache_calibrator(trt, cache: bytes, algorithm: str):
    """A calibrator that only serves a calibration cache (created at call time, as Polygraphy does), of the class
    the cache's header names. `asked_for_data` records whether TensorRT ignored the cache and tried to calibrate."""
    base = getattr(trt, CALIBRATORS[algorithm])

    class CacheCalibrator(base):  # type: ignore[misc, valid-type]
        asked_for_data = False

        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # no data: TensorRT must take every scale from the cache
            CacheCalibrator.asked_for_data = True
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data) -> None:
            return None

    return CacheCalibrator()


def uncalibrated_tensors(trt, network, scales: dict[str, float]) -> list[str]:
    """Activations feeding the network's matrix multiplies and convolutions (the layers implicit INT8 is for) that
    the calibration cache has no scale for. Inputs are followed back through shuffles the ONNX parser inserts;
    weights (constant layers) need no scale, and TensorRT-internal tensors ('(Unnamed Layer* 7) ...'), which no
    ONNX-side calibration can name, are left to TensorRT (it warns and runs their layers in higher precision)."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    targets = (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.CONVOLUTION)
    missing: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in targets:
            continue
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            name = tensor.name if tensor is not None else None
            while name is not None and name not in scales:
                src = producer.get(name)
                if src is None or src.type != trt.LayerType.SHUFFLE or src.get_input(0) is None:
                    break
                name = src.get_input(0).name
            if name is None or name in scales or name.startswith("(Unnamed Layer"):
                continue
            src = producer.get(name)
            if src is not None and src.type == trt.LayerType.CONSTANT:
                continue
            if name not in missing:
                missing.append(name)
    return missing
