"""A minimal protobuf wire-format reader and writer for sentencepiece `ModelProto` files (`tokenizer.model`).

No sentencepiece or protobuf needed: the pieces and the known scalar fields are decoded, everything else is kept
verbatim.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TokenizerError

# SentencePiece.Type
SPM_NORMAL = 1
SPM_UNKNOWN = 2
SPM_CONTROL = 3
SPM_USER_DEFINED = 4
SPM_UNUSED = 5
SPM_BYTE = 6
_PIECE_TYPES = {SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE}

# TrainerSpec.ModelType
SPM_UNIGRAM = 1
SPM_BPE = 2

_SPACE = "\u2581"  # sentencepiece's whitespace symbol

_WT_VARINT, _WT_I64, _WT_LEN, _WT_SGROUP, _WT_EGROUP, _WT_I32 = 0, 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1

# Known scalar fields: attribute -> (field number, kind, proto default). Everything else is kept verbatim.
_TRAINER_FIELDS: dict[str, tuple[int, str, Any]] = {
    "model_type": (3, "int", SPM_UNIGRAM),
    "vocab_size": (4, "int", 8000),
    "byte_fallback": (35, "bool", False),
    "unk_id": (40, "int", 0),
    "bos_id": (41, "int", 1),
    "eos_id": (42, "int", 2),
    "pad_id": (43, "int", -1),
}
_NORMALIZER_FIELDS: dict[str, tuple[int, str, Any]] = {
    "normalizer_name": (1, "str", ""),
    "precompiled_charsmap": (2, "bytes", b""),
    "add_dummy_prefix": (3, "bool", True),
    "remove_extra_whitespaces": (4, "bool", True),
    "escape_whitespaces": (5, "bool", True),
}
_KIND_WIRE = {"int": _WT_VARINT, "bool": _WT_VARINT, "str": _WT_LEN, "bytes": _WT_LEN}

Record = tuple[int, bytes]  # (field number, the complete encoded record: key + payload)


@dataclass
class SpmModel:
    """The parts of a sentencepiece `ModelProto` that tokenization needs.

    `pieces[i]` is `(piece, score, type)` for id `i` (`type` is one of the `SPM_*` constants). The `*_records`
    tuples keep every field of the original file verbatim, so `write_spm_model(read_spm_model(p))` reproduces
    the file byte for byte; a changed attribute replaces its record.
    """

    pieces: list[tuple[str, float, int]] = field(repr=False)
    model_type: int = SPM_BPE
    vocab_size: int | None = None  # TrainerSpec.vocab_size; None: len(pieces)
    byte_fallback: bool = True
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer_name: str = "identity"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False
    escape_whitespaces: bool = True
    trainer_records: tuple[Record, ...] = field(default=(), repr=False)
    normalizer_records: tuple[Record, ...] = field(default=(), repr=False)
    extra_records: tuple[Record, ...] = field(default=(), repr=False)  # ModelProto fields other than 1, 2, 3

    def piece_to_id(self) -> dict[str, int]:
        """Map each piece string to its id."""
        return {piece: i for i, (piece, _, _) in enumerate(self.pieces)}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TokenizerError("Malformed sentencepiece model: truncated varint.")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & _U64, pos
        shift += 7
        if shift >= 70:
            raise TokenizerError("Malformed sentencepiece model: varint longer than 10 bytes.")


def _skip_group(buf: bytes, pos: int, number: int) -> int:
    """Skip a (deprecated) group whose start tag was just read; return the position after its end tag."""
    while True:
        key, pos = _read_varint(buf, pos)
        fn, wt = key >> 3, key & 7
        if wt == _WT_EGROUP:
            if fn != number:
                raise TokenizerError("Malformed sentencepiece model: mismatched end-group tag.")
            return pos
        pos = _skip_value(buf, pos, fn, wt)


def _skip_value(buf: bytes, pos: int, fn: int, wt: int) -> int:
    if wt == _WT_VARINT:
        return _read_varint(buf, pos)[1]
    if wt == _WT_I64:
        end = pos + 8
    elif wt == _WT_I32:
        end = pos + 4
    elif wt == _WT_LEN:
        n, pos = _read_varint(buf, pos)
        end = pos + n
    elif wt == _WT_SGROUP:
        return _skip_group(buf, pos, fn)
    else:
        raise TokenizerError(f"Malformed sentencepiece model: wire type {wt} at field {fn}.")
    if end > len(buf):
        raise TokenizerError("Malformed sentencepiece model: truncated field.")
    return end


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield `(field, wire type, record start, payload start, record end)` for each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        fn, wt = key >> 3, key & 7
        if fn == 0:
            raise TokenizerError("Malformed sentencepiece model: field number 0.")
        if wt == _WT_LEN:
            n, payload = _read_varint(buf, pos)
            end = payload + n
            if end > len(buf):
                raise TokenizerError("Malformed sentencepiece model: truncated field.")
        else:
            payload = pos
            end = _skip_value(buf, pos, fn, wt)
        yield fn, wt, start, payload, end
        pos = end


def _decode_scalar(kind: str, buf: bytes, wt: int, payload: int, end: int) -> Any:
    if wt != _KIND_WIRE[kind]:
        raise ValueError  # wrong wire type: treated as an unknown field, as protobuf does
    if kind in ("int", "bool"):
        v = _read_varint(buf, payload)[0]
        if kind == "bool":
            return v != 0
        v = v - (1 << 64) if v >= 1 << 63 else v
        return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # int32
    data = bytes(buf[payload:end])
    if kind == "str":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"Malformed sentencepiece model: invalid UTF-8 string ({exc}).") from exc
    return data


def _varint(value: int) -> bytes:
    value &= _U64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(fn: int, wt: int) -> bytes:
    return _varint((fn << 3) | wt)


def _len_record(fn: int, data: bytes) -> bytes:
    return _key(fn, _WT_LEN) + _varint(len(data)) + data


def _encode_scalar(fn: int, kind: str, value: Any) -> bytes:
    if kind in ("int", "bool"):
        return _key(fn, _WT_VARINT) + _varint(int(value))
    data = value.encode("utf-8") if kind == "str" else bytes(value)
    return _len_record(fn, data)


def _parse_submessage(
    buf: bytes, spec: Mapping[str, tuple[int, str, Any]]
) -> tuple[dict[str, Any], tuple[Record, ...]]:
    by_number = {fn: (name, kind) for name, (fn, kind, _) in spec.items()}
    values: dict[str, Any] = {name: default for name, (_, _, default) in spec.items()}
    records: list[Record] = []
    for fn, wt, start, payload, end in _iter_fields(buf):
        records.append((fn, bytes(buf[start:end])))
        if fn in by_number:
            name, kind = by_number[fn]
            with contextlib.suppress(ValueError):  # wrong wire type: kept as an unknown record only
                values[name] = _decode_scalar(kind, buf, wt, payload, end)
    return values, tuple(records)


def _serialize_submessage(
    values: Mapping[str, Any], spec: Mapping[str, tuple[int, str, Any]], records: Sequence[Record]
) -> bytes:
    known = {fn for fn, _, _ in spec.values()}
    out: list[Record] = [(fn, raw) for fn, raw in records if fn not in known]
    for name, (fn, kind, default) in spec.items():
        enc = _encode_scalar(fn, kind, values[name])
        original = [raw for f, raw in records if f == fn]
        if original:  # keep the original record when it already encodes this value
            out.append((fn, original[0] if len(original) == 1 and original[0] == enc else enc))
        elif values[name] != default:
            out.append((fn, enc))
    out.sort(key=lambda r: r[0])  # stable: protobuf writers emit fields in number order
    return b"".join(raw for _, raw in out)


def parse_spm_model(data: bytes) -> SpmModel:
    """Parse the bytes of a sentencepiece `tokenizer.model` (unknown fields of every wire type are skipped)."""
    buf = bytes(data)
    pieces: list[tuple[str, float, int]] = []
    trainer = normalizer = b""
    extra: list[Record] = []
    for fn, wt, start, payload, end in _iter_fields(buf):
        if fn == 1 and wt == _WT_LEN:
            pieces.append(_parse_piece(buf[payload:end], len(pieces)))
        elif fn == 2 and wt == _WT_LEN:
            trainer += buf[payload:end]  # repeated occurrences of a message field are merged
        elif fn == 3 and wt == _WT_LEN:
            normalizer += buf[payload:end]
        else:
            extra.append((fn, buf[start:end]))
    tvals, trecords = _parse_submessage(trainer, _TRAINER_FIELDS)
    nvals, nrecords = _parse_submessage(normalizer, _NORMALIZER_FIELDS)
    return SpmModel(
        pieces=pieces,
        **tvals,
        **nvals,
        trainer_records=trecords,
        normalizer_records=nrecords,
        extra_records=tuple(extra),
    )


def _parse_piece(buf: bytes, index: int) -> tuple[str, float, int]:
    piece, score, type_ = None, 0.0, SPM_NORMAL
    for fn, wt, _, payload, end in _iter_fields(buf):
        if fn == 1 and wt == _WT_LEN:
            piece = _decode_scalar("str", buf, wt, payload, end)
        elif fn == 2 and wt == _WT_I32:
            score = struct.unpack_from("<f", buf, payload)[0]
        elif fn == 3 and wt == _WT_VARINT:
            type_ = _read_varint(buf, payload)[0]
    if piece is None:
        raise TokenizerError(f"Malformed sentencepiece model: piece {index} has no string.")
    return piece, score, type_


def serialize_spm_model(model: SpmModel) -> bytes:
    """Encode `model` as sentencepiece `ModelProto` bytes."""
    out = bytearray()
    for i, (piece, score, type_) in enumerate(model.pieces):
        if type_ not in _PIECE_TYPES:
            raise TokenizerError(f"Piece {i} ({piece!r}) has unknown type {type_}.")
        body = _encode_scalar(1, "str", piece) + _key(2, _WT_I32) + struct.pack("<f", score)
        if type_ != SPM_NORMAL:
            body += _key(3, _WT_VARINT) + _varint(type_)
        out += _len_record(1, body)
    tvals = {name: getattr(model, name) for name in _TRAINER_FIELDS}
    if tvals["vocab_size"] is None:
        tvals["vocab_size"] = len(model.pieces)
    nvals = {name: getattr(model, name) for name in _NORMALIZER_FIELDS}
    out += _len_record(2, _serialize_submessage(tvals, _TRAINER_FIELDS, model.trainer_records))
    out += _len_record(3, _serialize_submessage(nvals, _NORMALIZER_FIELDS, model.normalizer_records))
    for _, raw in sorted(model.extra_records, key=lambda r: r[0]):
        out += raw
    return bytes(out)


def read_spm_model(path: str | Path) -> SpmModel:
    """Read a sentencepiece `tokenizer.model` file.

    Raises:
        TokenizerError: the file is missing or malformed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"Cannot read sentencepiece model {path}: {exc}") from exc
    try:
        return parse_spm_model(data)
    except TokenizerError as exc:
        raise TokenizerError(f"{exc}\nNote: file {path}") from exc


def write_spm_model(path: str | Path, model: SpmModel) -> Path:
    """Write `model` as a sentencepiece `tokenizer.model` file and return its path."""
    path = Path(path)
    path.write_bytes(serialize_spm_model(model))
    return path

