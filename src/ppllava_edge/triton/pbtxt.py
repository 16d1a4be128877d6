"""Protobuf text format for Triton's `config.pbtxt`, written from plain dicts (no protobuf needed to write one).

    to_pbtxt({"name": "vision", "backend": "onnxruntime", "max_batch_size": 0,
              "input": [{"name": "pixel_values", "data_type": Enum("TYPE_FP32"), "dims": [-1, 3, 336, 336]}]})

dict -> a message, a list of dicts -> a repeated message field, a list of scalars -> `[a, b]`, `Enum` -> a bare
enum name, bool -> true/false, str -> a quoted string. The tests parse every file with Triton's own ModelConfig
protobuf (tritonclient's `model_config_pb2`), so a field Triton would reject fails there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Enum:
    name: str


def _quote(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


def _scalar(v) -> str:
    if isinstance(v, Enum):
        return v.name
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _quote(v)
    raise TypeError(f"no protobuf text form for {type(v).__name__}: {v!r}")


def _fields(msg: dict, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in msg.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_fields(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", *_fields(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def to_pbtxt(config: dict, comments: list[str] = ()) -> str:
    """`config` as protobuf text, after `# ` comment lines."""
    head = [f"# {c}" if c else "#" for c in comments]
    return "\n".join(head + _fields(config, 0)) + "\n"


def string_parameters(params: dict[str, object]) -> list[dict]:
    """Triton's `parameters` map (ModelParameter with string_value) from a plain dict, in key order."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in params.items()]
