"""Reading the JSON files of our folders (config.json, export.json, engines.json, index.json) with one error style."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, PPLLaVAEdgeError


def read_json(path: Path, missing: str, error: type[PPLLaVAEdgeError] = ConfigError, fmt: str | None = None) -> dict:
    """Parse `path`; a missing file raises `error(f"{path}: {missing}")`, bad JSON names the file.

    With `fmt`, the object's "format" field must equal it (so a wrong kind of folder is named as such).
    """
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    if fmt is not None and data.get("format") != fmt:
        raise error(f"{path}: not a {fmt} file (format={data.get('format')!r})")
    return data
