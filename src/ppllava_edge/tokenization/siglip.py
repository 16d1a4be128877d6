"""`SiglipTextTokenizer`: SigLIP's sentencepiece text tokenization with the authors' rules, torch- and
sentencepiece-free.

The authors tokenize the question for SigLIP's text tower with `SiglipProcessor.from_pretrained(clip_weight).tokenizer`
(transformers' slow `SiglipTokenizer`) as `tokenizer(question, padding="max_length", truncation=True,
max_length=196)` (64 without `extend_clip`) and pass `input_ids` and `attention_mask` on (ppllava/test/video_utils.py).
`SiglipTokenizer` (read in transformers 5.24's tokenization_siglip.py; the same steps as 4.45.2's) does:

1. prefix `▁` (after turning any `▁` in the text into a space);
2. split on its special tokens (`</s>`, `<unk>`) typed in the text: they become their ids, and the whitespace on both
   sides of them is dropped (`AddedToken(lstrip=True, rstrip=True)`). 4.45.2's `PreTrainedTokenizer.tokenize` first
   lowercases everything but the exact special tokens, character by character (`do_lower_case`), so `</S>` or `<UNK>`
   are special ids too; 5.24 dropped that step and keeps them as text. We follow 4.45.2, the authors' pin;
3. each piece of text between them on its own: canonicalise (big_vision's rule): lowercase, delete ASCII punctuation
   (`string.punctuation`), collapse whitespace runs to one space, strip;
4. encode with the sentencepiece model without its dummy prefix (the `▁` of step 1 stands in for it, so a word right
   after a typed special token has no `▁`); the model's normalizer (`remove_extra_whitespaces`) folds `▁` and spaces
   into one `▁` and drops them at the end; a lone leading `▁` before a special token is dropped;
5. cut to `max_length - 1` ids and append `</s>` unless the ids already end with it (`_add_eos_if_not_present`); pad
   with the pad id (`</s>` too) to `max_length`; attention_mask 1 for the ids and `</s>`, 0 for the padding.

Step 4 runs here as a `tokenizers` Unigram model over the sentencepiece pieces and scores (the model file is read by
`codec`), with the model's precompiled normalizer and a Metaspace split, as transformers' own converters build SigLIP's
and T5's fast tokenizers.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ..errors import InputError, TokenizerError
from .codec import _SPACE, SPM_UNIGRAM, SpmModel, read_spm_model

SIGLIP_LENGTH = 196  # PPLLaVA's extended SigLIP text length (4 * 64 - 3 * 20)
SIGLIP_LENGTH_SHORT = 64  # SigLIP's own (extend_clip false)
SIGLIP_MODEL_NAME = "spiece.model"  # the file name in a SigLIP model folder
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
    """SiglipTokenizer's `canonicalize_text` (do_lower_case true): lowercase, no ASCII punctuation, single spaces, stripped."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class SiglipTextTokenizer:
    """Ids and attention mask of a question for SigLIP's text tower, as the authors' SiglipTokenizer call makes them.

    Args:
        spm: the SigLIP sentencepiece model (a unigram model: `spiece.model` of the `clip_weight` folder).
        eos_token / pad_token: SiglipTokenizer's defaults (`</s>` both).
    """

    def __init__(self, spm: SpmModel, eos_token: str = "</s>", pad_token: str = "</s>", unk_token: str = "<unk>") -> None:
        if spm.model_type != SPM_UNIGRAM:
            raise TokenizerError(f"SigLIP's sentencepiece model is a unigram model; this one has model_type={spm.model_type}.")
        ids = spm.piece_to_id()
        missing = [t for t in (eos_token, pad_token, unk_token) if t not in ids]
        if missing:
            raise TokenizerError(f"the SigLIP sentencepiece model has no {', '.join(missing)} piece.")
        self.eos_id, self.pad_id = ids[eos_token], ids[pad_token]
        self.special_ids = {t: ids[t] for t in (eos_token, pad_token, unk_token)}
        self.special_split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special_ids, key=len, reverse=True)) + ")")
        self.space_id = ids.get(_SPACE)
        self.unk_token = unk_token
        self.remove_extra_whitespaces = spm.remove_extra_whitespaces
        tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in spm.pieces], unk_id=spm.unk_id, byte_fallback=spm.byte_fallback))
        if spm.precompiled_charsmap:
            tok.normalizer = normalizers.Precompiled(spm.precompiled_charsmap)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
        self.tokenizer = tok
        self.unk_length = len(tok.encode(unk_token, add_special_tokens=False).ids)

    @classmethod
    def from_file(cls, path: str | Path) -> SiglipTextTokenizer:
        """Load `spiece.model` (a file, or a folder holding it: the `clip_weight` folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / SIGLIP_MODEL_NAME
        if not path.is_file():
            raise TokenizerError(
                f"Missing SigLIP tokenizer {path.name} in {path.parent}.\n"
                f"Hint: put the SigLIP model's {SIGLIP_MODEL_NAME} (google/siglip-so400m-patch14-384) in the clip_weight folder."
            )
        return cls(read_spm_model(path))

    def piece_ids(self, text: str) -> list[int]:
        """Ids of a question before truncation and `</s>` (steps 1-4 of the module doc)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}.")
        parts = self.special_split.split(self._lower_outside_specials(_SPACE + text.replace(_SPACE, " ")))
        for i in range(1, len(parts), 2):  # odd parts are special tokens: they eat the whitespace beside them
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        pieces: list[tuple[int, bool]] = []  # (id, typed special token)
        for i, part in enumerate(parts):
            if i % 2:
                pieces.append((self.special_ids[part], True))
            elif part:
                pieces.extend((t, False) for t in self._text_ids(part))
        if len(pieces) > 1 and pieces[0] == (self.space_id, False) and pieces[1][1]:
            pieces = pieces[1:]
        return [t for t, _ in pieces]

    def _lower_outside_specials(self, text: str) -> str:
        """4.45.2's `do_lower_case` step: every character lowercased on its own, the exact special tokens kept."""
        return "".join(p if i % 2 else "".join(c.lower() for c in p) for i, p in enumerate(self.special_split.split(text)))

    def _text_ids(self, text: str) -> list[int]:
        """SiglipTokenizer's `_tokenize` of a piece of text without special tokens (steps 3-4): it encodes
        `<unk>` + text and drops the pieces of `<unk>`, so a text that does not start with `▁` is segmented as the
        model does it after `<unk>` (an unknown first character can even merge into `<unk>`'s last piece)."""
        prepared = canonicalize_text(text)
        if self.remove_extra_whitespaces:  # sentencepiece's normalizer: `▁` and spaces alike, runs folded, none at the end
            prepared = re.sub(_SPACE + "+", _SPACE, prepared.replace(" ", _SPACE)).rstrip(_SPACE)
        ids = self.tokenizer.encode(self.unk_token + prepared, add_special_tokens=False).ids
        return ids[self.unk_length :] if len(ids) >= self.unk_length else ids

    def encode(self, text: str, length: int = SIGLIP_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention_mask), both int64 `[length]`: `padding="max_length"`, `truncation=True`, `max_length=length`."""
        if not isinstance(length, int) or isinstance(length, bool) or length < 2:
            raise InputError(f"SigLIP length must be an int >= 2, got {length!r}.")
        ids = self.piece_ids(text)[: length - 1]
        if not ids or ids[-1] != self.eos_id:  # a typed `</s>` at the end is the end (`_add_eos_if_not_present`)
            ids.append(self.eos_id)
        mask = np.zeros(length, dtype=np.int64)
        mask[: len(ids)] = 1
        return np.asarray(ids + [self.pad_id] * (length - len(ids)), dtype=np.int64), mask
