"""Optional heavy dependencies, imported lazily with an error that names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

_INSTALL_HINTS = {
    "export": "pip install 'ppllava-edge[export]'",
    "tensorrt": "pip install 'ppllava-edge[tensorrt]'  (x86 + CUDA), or on Jetson: sudo apt install python3-libnvinfer (JetPack)",
    "gpu": "pip uninstall -y onnxruntime && pip install 'ppllava-edge[gpu]'",
    "bench": "pip install 'ppllava-edge[bench]'",
    "serve": "pip install 'ppllava-edge[serve]'",
    "dev": "pip install 'ppllava-edge[dev]'",
    "video": "pip install av==18.1.0 (part of the plain ppllava-edge install)",
}


def has_module(name: str) -> bool:
    """True when `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError saying which extra provides it.

    Args:
        module: importable module name, e.g. "torch".
        extra: the pyproject extra that installs it, e.g. "export".
        purpose: what needs it, e.g. "Exporting ONNX graphs".
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(extra, f"pip install 'ppllava-edge[{extra}]'")
        raise MissingDependencyError(
            f"{purpose} needs '{module}', which is not installed.\nHint: {hint}\nNote: {exc}"
        ) from exc
