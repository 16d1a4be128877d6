"""The LLaMA tokenizer (`tokenizers.Tokenizer`) from a sentencepiece model or a checkpoint folder.

`build_llama_tokenizer` ranks merges by (-score, id), which gives the same ids as transformers 4.45's fast tokenizer
and as sentencepiece (transformers 5 ranks merges by id and gets runs of spaces wrong).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import TokenizerError
from .codec import _SPACE, SPM_BPE, SPM_CONTROL, SPM_NORMAL, SPM_UNKNOWN, SPM_USER_DEFINED, SpmModel, read_spm_model

log = logging.getLogger(__name__)


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
    if model.get("type") != "BPE" or (tok_json.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        return None  # the bug is in sentencepiece-style (Metaspace) conversions; byte-level BPE has no "▁" runs (saves ~0.1 s per load)
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
