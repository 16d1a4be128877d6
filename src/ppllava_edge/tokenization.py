"""Torch-free tokenizers: the LLaMA prompt tokenizer and the CLIP text tokenizer.

Everything here uses only the standard library, numpy and the `tokenizers` package (no torch, transformers,
sentencepiece or protobuf), so the runtime can tokenize on a device that has none of them.

- A small protobuf reader/writer for sentencepiece `ModelProto` files (`tokenizer.model`).
- `synthetic_llama_spm`: a deterministic LLaMA-like BPE vocabulary for the random-weight presets.
- `build_llama_tokenizer`: a `tokenizers.Tokenizer` built from a sentencepiece model with merges ranked by
  (-score, id), which gives the same ids as transformers 4.45's fast tokenizer and as sentencepiece
  (transformers 5 ranks merges by id and gets runs of spaces wrong).
- `LlamaPromptTokenizer`: the authors' prompt ids (`"USER: <image>\\n" + question + " ASSISTANT: "`), with the
  question tokenized so that a typed `<image>` or `</s>` stays text.
- `ClipTokenizer`: CLIP's BPE tokenizer (ids padded/truncated to 248 or 77), shipped as a package asset.
"""

from __future__ import annotations

import contextlib
import gzip
import heapq
import json
import logging
import random
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .conversation import IMAGE_TOKEN, PLAIN_V1, ConversationTemplate, Segment, history_messages, render
from .errors import InputError, TokenizerError

log = logging.getLogger(__name__)

__all__ = [
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_LENGTH",
    "CLIP_LENGTH_SHORT",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "PROMPT_HEAD",
    "PROMPT_TAIL",
    "SPM_BYTE",
    "SPM_CONTROL",
    "SPM_NORMAL",
    "SPM_UNKNOWN",
    "SPM_UNUSED",
    "SPM_USER_DEFINED",
    "TEMPLATE",
    "ClipTokenizer",
    "LlamaPromptTokenizer",
    "SpmModel",
    "build_llama_tokenizer",
    "check_llama_merge_order",
    "load_llama_tokenizer_from_checkpoint",
    "parse_spm_model",
    "read_spm_model",
    "render_prompt",
    "serialize_spm_model",
    "synthetic_llama_spm",
    "write_spm_model",
]

# --------------------------------------------------------------------------------------------------
# sentencepiece ModelProto: a minimal protobuf wire-format reader and writer
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# A synthetic LLaMA-like vocabulary for the random-weight presets
# --------------------------------------------------------------------------------------------------

_SPACE = "\u2581"  # sentencepiece's whitespace symbol
_NEG_INF_SCORE = -1e9  # LLaMA gives its whitespace-run pieces this score (but low ids)
# Run lengths of LLaMA's whitespace pieces in id order (259 `▁▁`, 268 `▁▁▁▁`, 308 `▁`x8, ...). All score -1e9, so
# sentencepiece breaks ties by position (leftmost first) and a merge list breaks them by rank (id); this order makes
# the two agree (runs of n spaces become 16+16+...+(n mod 16) either way).
_SPACE_RUN_ORDER = (2, 4, 8, 5, 16, 6, 12, 13, 10, 14, 3, 9, 7, 11, 15)

_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small end
put home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct
pose leave song measure door product black short numeral class wind question happen happening complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard best hour better
true during hundred five remember step early hold west ground interest reach fast verb sing listen six table
travel less morning ten simple several vowel toward war lay against pattern slow center love person money
serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood contain
front teach week final gave green quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon
island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran
check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language among video
image frame scene camera person people doing describe describes describing action actions happens shown
showing wearing holding playing standing sitting walking running talking looking background foreground
clip moment begins ends during while before after first then finally object objects color colors left right
""".split()

_ONSETS = (
    "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sc sh sk sl sm sn sp st str sw "
    "th tr wh qu"
).split() + [""] * 6
_NUCLEI = "a e i o u a e i o u ai ea ee ie oo ou ay ey".split()
_CODAS = "n r s t l m d nd ng nt st ck rs ts ll ss ght".split() + [""] * 12
# Single characters (lowest scores, at the end as in LLaMA). `▁` gets -1e9 as in LLaMA.
_CHARS = (
    [_SPACE]
    + list("etaoinsrhldcumfpgwybvkxjqz")
    + list("ETAOINSRHLDCUMFPGWYBVKXJQZ")
    + list("0123456789")
    + list(".,'\"-?!:;()[]{}<>/\\|_*&^%$#@~`+=")
    + list("éèàüöäñçß’“”—…")
)


@lru_cache(maxsize=4)
def _synthetic_pieces(n_merged: int, seed: int) -> tuple[str, ...]:
    rng = random.Random(seed)
    freqs: dict[str, int] = {}
    for rank, w in enumerate(dict.fromkeys(_WORDS)):
        f = int(200_000 / (rank + 20))
        freqs[_SPACE + w] = freqs.get(_SPACE + w, 0) + f
        freqs[_SPACE + w.capitalize()] = freqs.get(_SPACE + w.capitalize(), 0) + max(1, f // 8)
        freqs[w] = freqs.get(w, 0) + max(1, f // 16)  # word-internal use (after punctuation, etc.)
    n_words = max(2000, n_merged // 2)
    n_syllables = rng.choices((1, 2, 3, 4), weights=(1, 2, 2, 1), k=n_words)
    total = sum(n_syllables)
    onsets, nuclei, codas = (rng.choices(part, k=total) for part in (_ONSETS, _NUCLEI, _CODAS))
    flags = [rng.random() for _ in range(2 * n_words)]
    k = 0
    for rank, n in enumerate(n_syllables):
        w = "".join(onsets[k + s] + nuclei[k + s] + codas[k + s] for s in range(n))
        k += n
        if flags[2 * rank] < 0.15:
            w = w.capitalize()
        key = _SPACE + w if flags[2 * rank + 1] < 0.8 else w
        freqs[key] = freqs.get(key, 0) + max(1, int(3000 / (rank + 30)))
    return tuple(_train_bpe(freqs, n_merged, reserved=set(_CHARS)))


def _train_bpe(word_freqs: Mapping[str, int], n_pieces: int, reserved: set[str]) -> list[str]:
    """A small deterministic BPE trainer; returns `n_pieces` new pieces in merge order.

    Pair counts are updated only around each merged occurrence, and the heap is lazy: an entry may hold a count
    that is too high (it is re-pushed when popped), never one that is too low. Ties go to the smaller pair.
    """
    words = [list(w) for w in word_freqs]
    freqs = list(word_freqs.values())
    counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            counts[pair] = counts.get(pair, 0) + freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    seen = set(reserved)
    out: list[str] = []
    while len(out) < n_pieces:
        if not heap:
            raise InputError(f"The synthetic corpus ran out of merges after {len(out)} pieces (wanted {n_pieces}).")
        negc, a, b = heapq.heappop(heap)
        c = counts.get((a, b), 0)
        if c != -negc:  # stale: the count went down since this entry was pushed
            if c > 0:
                heapq.heappush(heap, (-c, a, b))
            continue
        merged = a + b
        if merged not in seen:
            seen.add(merged)
            out.append(merged)
        grown: set[tuple[str, str]] = set()
        for i in where.pop((a, b), ()):
            w, f = words[i], freqs[i]
            j = 0
            while True:
                try:
                    j = w.index(a, j)
                except ValueError:
                    break
                if j + 1 < len(w) and w[j + 1] == b:
                    if j > 0:
                        left = w[j - 1]
                        counts[(left, a)] -= f
                        pair = (left, merged)
                        counts[pair] = counts.get(pair, 0) + f
                        where.setdefault(pair, set()).add(i)
                        grown.add(pair)
                    if j + 2 < len(w):
                        right = w[j + 2]
                        counts[(b, right)] -= f
                        pair = (merged, right)
                        counts[pair] = counts.get(pair, 0) + f
                        where.setdefault(pair, set()).add(i)
                        grown.add(pair)
                    w[j : j + 2] = [merged]
                j += 1
        counts.pop((a, b), None)
        for pair in grown:
            c = counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
    return out


def synthetic_llama_spm(vocab_size: int = 32000, seed: int = 0) -> SpmModel:
    """A deterministic LLaMA-like sentencepiece BPE model (we cannot ship the real one).

    Layout: `<unk>` `<s>` `</s>` (ids 0-2), the 256 byte pieces `<0x00>`..`<0xFF>` (ids 3-258), the 15 whitespace
    runs `▁▁`..`▁`x16 with score -1e9 at ids 259-273 (low ids in LLaMA's relative order, so merges ranked by id
    are wrong as with LLaMA), then NORMAL pieces grown by a small BPE over built-in English words and generated
    syllables
    (decreasing scores; each is two earlier pieces joined), then single characters (`▁` included).

    Args:
        vocab_size: total number of pieces.
        seed: seeds the generated part of the corpus.

    Returns:
        An `SpmModel` that the `sentencepiece` library loads.
    """
    specials: list[tuple[str, float, int]] = [
        ("<unk>", 0.0, SPM_UNKNOWN),
        ("<s>", 0.0, SPM_CONTROL),
        ("</s>", 0.0, SPM_CONTROL),
    ]
    specials += [(f"<0x{b:02X}>", 0.0, SPM_BYTE) for b in range(256)]
    specials += [(_SPACE * n, _NEG_INF_SCORE, SPM_NORMAL) for n in _SPACE_RUN_ORDER]
    n_merged = vocab_size - len(specials) - len(_CHARS)
    if n_merged < 0:
        raise InputError(
            f"vocab_size={vocab_size} is too small: the synthetic vocabulary needs at least "
            f"{len(specials) + len(_CHARS)}."
        )
    pieces = list(specials)
    for p in _synthetic_pieces(n_merged, seed):
        pieces.append((p, -float(len(pieces) - len(specials) + 1), SPM_NORMAL))
    for c in _CHARS:
        score = _NEG_INF_SCORE if c == _SPACE else -float(len(pieces) - len(specials) + 1)
        pieces.append((c, score, SPM_NORMAL))
    assert len(pieces) == vocab_size and len({p for p, _, _ in pieces}) == vocab_size
    return SpmModel(pieces=pieces, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------------
# LLaMA tokenizer (tokenizers.Tokenizer) from a sentencepiece model
# --------------------------------------------------------------------------------------------------

_TOKEN_FLAGS = ("special", "lstrip", "rstrip", "single_word", "normalized")


def _spm_merges(spm: SpmModel) -> list[tuple[str, str]]:
    """Every split of every NORMAL piece into two NORMAL pieces, ranked by (-score of the merged piece, id)."""
    normal = {p: i for i, (p, _, t) in enumerate(spm.pieces) if t == SPM_NORMAL}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in normal.items():
        score = spm.pieces[i][1]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_llama_tokenizer(
    spm: SpmModel,
    added_tokens: Mapping[str, int] | None = None,
    add_bos: bool = True,
    add_eos: bool = False,
    *,
    legacy: bool = False,
    add_prefix_space: bool | None = None,
    token_options: Mapping[str, Mapping[str, bool]] | None = None,
) -> Tokenizer:
    """Build a LLaMA fast tokenizer from a sentencepiece BPE model, without transformers.

    The layout is transformers 4.45's `LlamaConverter` with merges ranked by (-score, id) (notes, method (d)):
    `BPE(byte_fallback=True, fuse_unk=True)`, `Metaspace("▁", prepend_scheme="first", split=False)`, a
    Replace/ByteFallback/Fuse/Strip decoder and a BOS template.

    Args:
        spm: the sentencepiece model (must be BPE with an identity normalizer).
        added_tokens: extra tokens and their ids, e.g. `{"<image>": 32000, "<pad>": 32001}`. Ids past the
            vocabulary must follow it without gaps; ids inside it must name the same piece.
        add_bos: prepend `<s>` (tokenizer_config `add_bos_token`).
        add_eos: append `</s>` (tokenizer_config `add_eos_token`).
        legacy: transformers' `legacy=True` layout (a Prepend/Replace normalizer instead of Metaspace).
        add_prefix_space: add the dummy prefix `▁`; None follows `spm.add_dummy_prefix`.
        token_options: AddedToken flags per token content (`special`, `lstrip`, `rstrip`, `single_word`,
            `normalized`), e.g. from `added_tokens_decoder`. Default: special, not normalized.

    Returns:
        The tokenizer. Control and unknown pieces, and `added_tokens`, are special tokens.

    Raises:
        TokenizerError: the model is not supported or the added tokens do not fit.
    """
    if spm.model_type != SPM_BPE:
        raise TokenizerError(f"Only sentencepiece BPE models are supported; this one has model_type={spm.model_type}.")
    if spm.precompiled_charsmap or spm.remove_extra_whitespaces or not spm.escape_whitespaces:
        raise TokenizerError(
            "Unsupported sentencepiece normalizer "
            f"(name={spm.normalizer_name!r}, charsmap={len(spm.precompiled_charsmap)} bytes, "
            f"remove_extra_whitespaces={spm.remove_extra_whitespaces}, escape_whitespaces={spm.escape_whitespaces}).\n"
            "Note: LLaMA models use the identity normalizer without whitespace removal."
        )
    vocab = spm.piece_to_id()
    if len(vocab) != len(spm.pieces):
        raise TokenizerError("The sentencepiece model has duplicate pieces.")
    if not 0 <= spm.unk_id < len(spm.pieces):
        raise TokenizerError(f"unk_id={spm.unk_id} is outside the vocabulary ({len(spm.pieces)} pieces).")
    unk = spm.pieces[spm.unk_id][0]
    extra = sorted(((c, int(i)) for c, i in (added_tokens or {}).items()), key=lambda kv: kv[1])
    next_id = len(spm.pieces)
    for content, token_id in extra:
        if 0 <= token_id < len(spm.pieces):
            if spm.pieces[token_id][0] != content:
                raise TokenizerError(
                    f"Added token {content!r} has id {token_id}, which is the piece {spm.pieces[token_id][0]!r}."
                )
        elif token_id != next_id:
            raise TokenizerError(
                f"Added token {content!r} has id {token_id}; expected {next_id} (added ids must follow the "
                f"{len(spm.pieces)}-piece vocabulary without gaps)."
            )
        else:
            next_id += 1
    prefix = spm.add_dummy_prefix if add_prefix_space is None else add_prefix_space
    model = models.BPE(
        vocab=vocab, merges=_spm_merges(spm), unk_token=unk, fuse_unk=True, byte_fallback=spm.byte_fallback
    )
    tok = Tokenizer(model)
    if legacy:
        steps = ([normalizers.Prepend(_SPACE)] if prefix else []) + [normalizers.Replace(" ", _SPACE)]
        tok.normalizer = normalizers.Sequence(steps)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)

    options = dict(token_options or {})

    def added(content: str) -> AddedToken:
        flags = {"special": True, "normalized": False}
        flags.update({k: bool(v) for k, v in options.get(content, {}).items() if k in _TOKEN_FLAGS})
        return AddedToken(content, **flags)

    # sentencepiece's own control/unknown pieces are special; user-defined pieces match whole, as in transformers.
    tok.add_special_tokens([added(p) for p, _, t in spm.pieces if t in (SPM_CONTROL, SPM_UNKNOWN)])
    user = [p for p, _, t in spm.pieces if t == SPM_USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    for content, token_id in extra:
        token = added(content)
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(content) != token_id:
            raise TokenizerError(f"Added token {content!r} got id {tok.token_to_id(content)}, expected {token_id}.")

    tok.post_processor = _llama_template(spm, add_bos, add_eos)
    return tok


def _llama_template(spm: SpmModel, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    specials: list[tuple[str, int]] = []
    bos = eos = ""
    if add_bos:
        if not 0 <= spm.bos_id < len(spm.pieces):
            raise TokenizerError(f"add_bos_token is set but the model has no BOS piece (bos_id={spm.bos_id}).")
        bos = spm.pieces[spm.bos_id][0]
        specials.append((bos, spm.bos_id))
    if add_eos:
        if not 0 <= spm.eos_id < len(spm.pieces):
            raise TokenizerError(f"add_eos_token is set but the model has no EOS piece (eos_id={spm.eos_id}).")
        eos = spm.pieces[spm.eos_id][0]
        specials.append((eos, spm.eos_id))
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _merge_pairs(model_json: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model_json.get("merges", []):
        if isinstance(m, str):
            left, _, right = m.partition(" ")
        else:
            left, right = m
        pairs.append((left, right))
    return pairs


def _merge_order_problem(tok_json: Mapping[str, Any]) -> str | None:
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        return None
    merges = _merge_pairs(model)
    is_run = [not (a + b).strip(_SPACE) for a, b in merges]  # only "▁" characters (str.strip: fast on 61k merges)
    runs = [r for r, run in enumerate(is_run) if run]
    if not runs:
        return None
    last_other = max((r for r, run in enumerate(is_run) if not run), default=-1)
    if runs[0] > last_other:
        return None
    a, b = merges[runs[0]]
    return f"merge {a!r} + {b!r} has rank {runs[0]} of {len(merges)}, before {last_other - runs[0]} ordinary merges"


def check_llama_merge_order(tokenizer: Tokenizer | Mapping[str, Any], source: str = "tokenizer.json") -> None:
    """Raise TokenizerError if a LLaMA tokenizer's merges rank whitespace runs by id (transformers 5's bug).

    LLaMA's whitespace-run pieces (`▁▁`, `▁▁▁▁`, ...) have the lowest score (-1e9) but low ids, so in a correct
    tokenizer their merges come after every other merge. transformers 5 ranks merges by id, which changes the ids
    of any text with two or more spaces in a row.

    Args:
        tokenizer: a `tokenizers.Tokenizer` or its parsed JSON.
        source: what to name in the message (a path).
    """
    tok_json = json.loads(tokenizer.to_str()) if isinstance(tokenizer, Tokenizer) else tokenizer
    problem = _merge_order_problem(tok_json)
    if problem:
        raise TokenizerError(
            f"{source} has the merge order of transformers 5 (whitespace-run merges ranked by id): {problem}.\n"
            "Note: such a tokenizer gives different ids for text with 2+ spaces in a row (e.g. '…   ASSISTANT').\n"
            "Hint: put the checkpoint's tokenizer.model next to it (it is used instead), or re-export the "
            "tokenizer with ppllava_edge (merges ranked by sentencepiece score)."
        )


def _read_json(folder: Path, name: str, required: bool) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file():
        if required:
            raise TokenizerError(f"Missing tokenizer file {name} in {folder}.")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"Cannot read tokenizer file {name} in {folder}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"Tokenizer file {name} in {folder} is not a JSON object.")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_llama_tokenizer_from_checkpoint(folder: str | Path) -> Tokenizer:
    """Load the LLaMA tokenizer of a released checkpoint folder, as the authors' transformers 4.45 did.

    Uses `tokenizer.model` with `tokenizer_config.json` (`add_bos_token`, `add_eos_token`, `legacy`,
    `add_prefix_space`, `added_tokens_decoder`) and, when present, `added_tokens.json` and
    `special_tokens_map.json`. A folder with only a `tokenizer.json` is loaded as it is, after checking that its
    merges are not in transformers 5's broken order.

    Raises:
        TokenizerError: a file is missing or malformed, or the tokenizer.json has broken merges.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"Tokenizer folder {folder} does not exist.")
    model_path = folder / "tokenizer.model"
    json_path = folder / "tokenizer.json"
    if not model_path.is_file():
        if json_path.is_file():
            try:
                tok = Tokenizer.from_file(str(json_path))
            except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
                raise TokenizerError(f"Cannot load tokenizer file tokenizer.json in {folder}: {exc}") from exc
            check_llama_merge_order(tok, str(json_path))
            return tok
        raise TokenizerError(f"Missing tokenizer file tokenizer.model (or tokenizer.json) in {folder}.")

    config = _read_json(folder, "tokenizer_config.json", required=True)
    assert config is not None
    special_map = _read_json(folder, "special_tokens_map.json", required=False) or {}
    added_json = _read_json(folder, "added_tokens.json", required=False) or {}
    spm = read_spm_model(model_path)

    added: dict[str, int] = {}
    options: dict[str, dict[str, bool]] = {}

    def add(content: str, token_id: Any, source: str) -> None:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise TokenizerError(f"Token {content!r} in {source} ({folder}) has a non-integer id {token_id!r}.")
        if added.get(content, token_id) != token_id:
            raise TokenizerError(
                f"Token {content!r} has id {added[content]} in one file and {token_id} in {source} ({folder})."
            )
        added[content] = token_id

    decoder = config.get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        content = _token_content(entry)
        if content is None or not str(key).lstrip("-").isdigit():
            raise TokenizerError(f"Bad added_tokens_decoder entry {key!r} in tokenizer_config.json ({folder}).")
        add(content, int(key), "tokenizer_config.json")
        if isinstance(entry, dict):
            options[content] = {k: bool(entry[k]) for k in _TOKEN_FLAGS if k in entry}
    for content, token_id in added_json.items():
        add(content, token_id, "added_tokens.json")

    piece_ids = spm.piece_to_id()
    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
        content = _token_content(config.get(key)) or _token_content(special_map.get(key))
        if content is not None:
            token_id = piece_ids.get(content, added.get(content))
            if token_id is None:
                raise TokenizerError(f"{key} {content!r} of tokenizer_config.json is not in the vocabulary ({folder}).")
            setattr(spm, attr, token_id)

    legacy = config.get("legacy")
    if legacy is None:
        log.warning("%s: tokenizer_config.json has no 'legacy' key; using legacy=True (transformers 4.45)", folder)
        legacy = True
    return build_llama_tokenizer(
        spm,
        added,
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        legacy=bool(legacy),
        add_prefix_space=config.get("add_prefix_space"),
        token_options=options,
    )


# --------------------------------------------------------------------------------------------------
# The authors' prompt
# --------------------------------------------------------------------------------------------------

IMAGE_TOKEN_ID = 32000
PROMPT_HEAD = "USER: "
PROMPT_TAIL = "\n{question} ASSISTANT: "
TEMPLATE = PROMPT_HEAD + IMAGE_TOKEN + PROMPT_TAIL  # "USER: <image>\n{question} ASSISTANT: "


def render_prompt(question: str) -> str:
    """The authors' prompt text for one video: `"USER: <image>\\n" + question + " ASSISTANT: "`."""
    if not isinstance(question, str):
        raise InputError(f"question must be a str, got {type(question).__name__}.")
    return TEMPLATE.format(question=question)


def _tail_json(tok_json: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer for the text after `<image>`: no dummy prefix (Metaspace prepend_scheme "never")."""
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)  # pre-0.19 spelling
                found = True
            for child in node.get("pretokenizers", []) or []:
                visit(child)

    visit(tok_json.get("pre_tokenizer"))
    if not found and "Prepend" not in json.dumps(tok_json.get("normalizer")):
        if _is_byte_level(tok_json):
            return tok_json  # byte-level BPE (GPT-2 style): no dummy prefix, every piece is tokenized alike
        raise TokenizerError(
            "The tokenizer has no Metaspace pre-tokenizer, no Prepend normalizer and no ByteLevel pre-tokenizer; it is "
            "neither a sentencepiece-style (LLaMA) nor a byte-level BPE (GPT-2 style) tokenizer."
        )
    return tok_json


def _is_byte_level(tok_json: Mapping[str, Any]) -> bool:
    return '"ByteLevel"' in json.dumps(tok_json.get("pre_tokenizer"))


class LlamaPromptTokenizer:
    """Prompt ids for PPLLaVA's LLM in the checkpoint's conversation template, with a single image placeholder.

    A conversation is rendered into segments (`conversation.render`): template text, whose special-token literals
    (`</s>`, `<|im_end|>`, ...) become their ids; message content, where such literals typed by a user stay text;
    and the image placeholder. Text between two special ids is tokenized in one piece with
    `encode_special_tokens=True`. The first piece, when the prompt starts with text, is tokenized with the full
    tokenizer (sentencepiece dummy prefix; BOS when the template says `bos`), later pieces without the dummy prefix
    (Metaspace "never"), as the authors' tokenizer does after a special token. For the authors' plain_v1 this is

        head ids of "USER: " (BOS, dummy prefix) + [image_token_id] + tail ids of "\\n" + q + " ASSISTANT: "

    (notes, Method B). A byte-level BPE tokenizer (tokenizer.json of GPT-2 style, e.g. SmolLM2) has no dummy prefix:
    every piece is tokenized alike.

    Args:
        tokenizer: the full tokenizer (as from `build_llama_tokenizer` or a tokenizer.json); it is not modified.
        image_token_id: the id placed where `<image>` is.
        template: the conversation template (default: the authors' plain_v1).
        bos_token: / eos_token: token contents for `bos_token_id` / `eos_token_id`.
        check_merges: reject a sentencepiece-style tokenizer with transformers 5's merge order.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_token_id: int = IMAGE_TOKEN_ID,
        *,
        template: ConversationTemplate | None = None,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        check_merges: bool = True,
        _tok_json: dict[str, Any] | None = None,
        _owned: bool = False,
    ) -> None:
        tok_json = json.loads(tokenizer.to_str()) if _tok_json is None else _tok_json
        if check_merges:
            check_llama_merge_order(tok_json, "the LLaMA tokenizer")
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.template = template or PLAIN_V1
        # first piece: dummy prefix and BOS as configured. A tokenizer we parsed ourselves (`from_file`) serves as
        # the head too: `encode_special_tokens` changes only encoding, and `self.tokenizer` only decodes, looks up
        # ids and saves (the flag is not serialized). A caller's tokenizer is copied, never changed.
        self._head = tokenizer if _owned else Tokenizer.from_str(tokenizer.to_str())
        self._head.encode_special_tokens = True  # runtime-only flag: not serialized, so set on every load
        self._tail = Tokenizer.from_str(json.dumps(_tail_json(tok_json)))
        self._tail.encode_special_tokens = True
        specials = sorted({a["content"] for a in tok_json.get("added_tokens", []) if a.get("special")}, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        self._bos_token, self._eos_token = bos_token, eos_token

    @classmethod
    def from_file(cls, path: str | Path, image_token_id: int = IMAGE_TOKEN_ID, **kwargs: Any) -> LlamaPromptTokenizer:
        """Load a tokenizer.json written by `save` (or a correct transformers export)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"Missing tokenizer file {path.name} in {path.parent}.")
        try:
            text = path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
            tok_json = json.loads(text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"Cannot load tokenizer file {path}: {exc}") from exc
        if kwargs.pop("check_merges", True):
            check_llama_merge_order(tok_json, str(path))
        return cls(tok, image_token_id, check_merges=False, _tok_json=tok_json, _owned=True, **kwargs)

    @classmethod
    def from_checkpoint(
        cls, folder: str | Path, image_token_id: int = IMAGE_TOKEN_ID, **kwargs: Any
    ) -> LlamaPromptTokenizer:
        """Build from a released checkpoint folder (see `load_llama_tokenizer_from_checkpoint`)."""
        return cls(load_llama_tokenizer_from_checkpoint(folder), image_token_id, **kwargs)

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Ids of rendered segments (see the class doc)."""
        ids: list[int] = []
        run: list[str] = []
        started = False

        def start() -> None:
            nonlocal started
            if not started and self.template.bos:
                ids.extend(self._head.encode("", add_special_tokens=True).ids)  # BOS alone
            started = True

        def flush() -> None:
            nonlocal started
            text = "".join(run)
            run.clear()
            if not text:
                return
            if started:
                ids.extend(self._tail.encode(text, add_special_tokens=False).ids)
            else:
                ids.extend(self._head.encode(text, add_special_tokens=self.template.bos).ids)
                started = True

        for seg in segments:
            if seg.kind == "image":
                flush()
                start()
                ids.append(self.image_token_id)
            elif seg.kind == "content":
                run.append(seg.text)
            else:
                pos = 0
                for m in self._special_re.finditer(seg.text) if self._special_re is not None else ():
                    run.append(seg.text[pos : m.start()])
                    flush()
                    start()
                    ids.append(self.image_token_id if m.group() == IMAGE_TOKEN else self._token_id(m.group()))
                    pos = m.end()
                run.append(seg.text[pos:])
        flush()
        return ids

    def conversation_ids(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation ([{'role': 'system'|'user'|'assistant', 'content': str}, ...], oldest first) in the
        template, with the image placeholder in the first user message."""
        return self.encode_segments(render(self.template, messages, add_generation_prompt))

    def prompt_ids(self, question: str) -> list[int]:
        """Ids of a one-question prompt (plain_v1: the authors' ids for `render_prompt(question)`), with exactly one
        `image_token_id`."""
        if not isinstance(question, str):
            raise InputError(f"question must be a str, got {type(question).__name__}.")
        return self.conversation_ids([{"role": "user", "content": question}])

    def chat_prompt_ids(
        self, question: str, history: Sequence[tuple[str, str]] = (), system: str | None = None
    ) -> list[int]:
        """Ids of a conversation in the checkpoint's template, with the image placeholder in the first user turn;
        for plain_v1:

            [{system} ]USER: <image>\\n{u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>USER: {question} ASSISTANT: 

        `history` holds the earlier (user, assistant) turns, oldest first. Without history and system this equals
        `prompt_ids(question)`. Special tokens between turns (`</s>`, `<|im_end|>`) are their ids; text typed by the
        user (a literal `</s>` or `<image>` included) stays text.
        """
        return self.conversation_ids(history_messages(question, history, system))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (the image placeholder and BOS/EOS are dropped unless `skip_special_tokens=False`)."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise InputError(f"Token ids must be >= 0, got {min(ids)}.")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_id(self, content: str) -> int:
        token_id = self.tokenizer.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"The tokenizer has no token {content!r}.")
        return token_id

    @property
    def bos_token_id(self) -> int:
        return self._token_id(self._bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._token_id(self._eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer.json (a folder gets `tokenizer.json` inside); `from_file` restores this object."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------

CLIP_BOS_ID = 49406  # <|startoftext|>
CLIP_EOS_ID = 49407  # <|endoftext|>, also the padding id
CLIP_LENGTH = 248  # PPLLaVA's extended CLIP text length
CLIP_LENGTH_SHORT = 77  # original CLIP (config extend_clip false)
_CLIP_ASSET = "clip_tokenizer.json.gz"


def _load_tokenizer_file(path: Path) -> Tokenizer:
    try:
        if path.suffix == ".gz":
            return Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))
        return Tokenizer.from_file(str(path))
    except OSError as exc:
        raise TokenizerError(f"Cannot read tokenizer file {path}: {exc}") from exc
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"Cannot load tokenizer file {path}: {exc}") from exc


class ClipTokenizer:
    """CLIP's BPE text tokenizer (the authors' `CLIPTokenizerFast`), with ids padded to a fixed length.

    The default is the asset shipped with the package. Ids: `<|startoftext|>` 49406, text, `<|endoftext|>` 49407,
    then 49407 padding; a long text is cut so that 49407 is the last id.
    """

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        if tokenizer is None:
            asset = resources.files("ppllava_edge") / "assets" / _CLIP_ASSET
            try:
                data = gzip.decompress(asset.read_bytes()).decode("utf-8")
            except OSError as exc:
                raise TokenizerError(f"Missing package asset assets/{_CLIP_ASSET}: {exc}") from exc
            tokenizer = Tokenizer.from_str(data)
        self.tokenizer = tokenizer
        self._by_length: dict[int, Tokenizer] = {}
        trunc, pad = tokenizer.truncation, tokenizer.padding
        if trunc and pad and trunc.get("max_length") == pad.get("length") and pad.get("pad_id") == CLIP_EOS_ID:
            self._by_length[int(pad["length"])] = tokenizer  # already fixed-length: use it as it is

    @classmethod
    def from_file(cls, path: str | Path) -> ClipTokenizer:
        """Load a CLIP tokenizer.json (or .json.gz) written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"Missing tokenizer file {path.name} in {path.parent}.")
        return cls(_load_tokenizer_file(path))

    def _fixed(self, length: int) -> Tokenizer:
        tok = self._by_length.get(length)
        if tok is None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 2:
                raise InputError(f"CLIP length must be an int >= 2, got {length!r}.")
            tok = Tokenizer.from_str(self.tokenizer.to_str())
            tok.enable_truncation(max_length=length)  # keeps room for the 2 template ids: EOT at length-1
            tok.enable_padding(length=length, pad_id=CLIP_EOS_ID, pad_token="<|endoftext|>")
            self._by_length[length] = tok
        return tok

    def encode(self, text: str, length: int = CLIP_LENGTH) -> np.ndarray:
        """Ids of `text`, padded/truncated to `length`. Returns int64 `[length]`."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}.")
        return np.asarray(self._fixed(length).encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str], length: int = CLIP_LENGTH) -> np.ndarray:
        """Ids of several texts. Returns int64 `[B, length]`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a sequence of str.")
        encs = self._fixed(length).encode_batch(list(texts))
        return np.asarray([e.ids for e in encs], dtype=np.int64).reshape(len(encs), length)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (word ends become spaces)."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON (padding/truncation to 248 included); a `.gz` suffix gzips it."""
        path = Path(path)
        if path.is_dir():
            path = path / "clip_tokenizer.json"
        data = self.tokenizer.to_str()
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(data.encode("utf-8"), compresslevel=6, mtime=0))
        else:
            path.write_text(data, encoding="utf-8")
        return path
