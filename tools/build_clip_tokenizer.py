#!/usr/bin/env python
"""Build the CLIP tokenizer asset `src/ppllava_edge/assets/clip_tokenizer.json.gz` (run once, offline).

The BPE merges come from open_clip's `bpe_simple_vocab_16e6.txt.gz`, the same merges as OpenAI CLIP and as the
`merges.txt` of HF's CLIP checkpoints. Get it without installing anything:

    pip download open_clip_torch --no-deps -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The layout follows transformers 4.45's `CLIPTokenizerFast` JSON (docs/tokenizers-notes.md §3): normalizer
NFC + `\\s+`->" " + Lowercase; pre-tokenizer Split(CLIP regex, removed, invert) + ByteLevel; BPE with the `</w>`
suffix; RobertaProcessing; truncation and padding (id 49407) to 248; special tokens with normalized=True.
Only `tokenizers` is needed. The output is deterministic (gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # as open_clip's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LENGTH = 248
SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/ppllava_edge/assets/clip_tokenizer.json.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the order fixes the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_merges(source: Path) -> list[tuple[str, str]]:
    """The first N_MERGES merges from a `bpe_simple_vocab_16e6.txt.gz`, or from an open_clip_torch wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            names = [n for n in whl.namelist() if n.endswith("/" + BPE_NAME)]
            if not names:
                raise SystemExit(f"{source} has no {BPE_NAME}")
            data = whl.read(names[0])
    else:
        data = source.read_bytes()
    lines = gzip.GzipFile(fileobj=io.BytesIO(data)).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"{source}: expected {N_MERGES} merges of two symbols")
    return merges  # type: ignore[return-value]


def build_clip_tokenizer(merges: list[tuple[str, str]]) -> Tokenizer:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408 and vocab[BOS] == 49406 and vocab[EOS] == 49407
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=EOS,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOS, 49407), (BOS, 49406), False, False)  # positional only
    tok.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in (BOS, EOS)])
    tok.enable_truncation(max_length=LENGTH)  # keeps room for the 2 template ids: EOT at index 247
    tok.enable_padding(length=LENGTH, pad_id=49407, pad_token=EOS)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel, or {BPE_NAME}")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output .json or .json.gz")
    args = parser.parse_args(argv)

    tok = build_clip_tokenizer(read_merges(args.source))
    ids = tok.encode("What is happening in the video?").ids
    expected = [49406, 768, 533, 4284, 530, 518, 1455, 286, 49407]
    if ids[:9] != expected or len(ids) != LENGTH or set(ids[9:]) != {49407}:
        raise SystemExit(f"self-check failed: {ids[:12]}")
    data = tok.to_str().encode("utf-8")
    if args.out.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
