"""`ClipTokenizer`: CLIP's BPE tokenizer (ids padded/truncated to 248 or 77), shipped as a package asset."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import InputError, TokenizerError

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
