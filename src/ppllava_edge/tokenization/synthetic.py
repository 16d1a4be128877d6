"""Deterministic test vocabularies for the random-weight presets: `synthetic_llama_spm` (LLaMA-like sentencepiece BPE),
`synthetic_qwen2_tokenizer_json` (Qwen2-like byte-level BPE tokenizer.json) and `synthetic_siglip_spm` (a SigLIP-like
sentencepiece unigram model)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from functools import lru_cache

from ..errors import InputError
from .codec import _SPACE, SPM_BYTE, SPM_CONTROL, SPM_NORMAL, SPM_UNIGRAM, SPM_UNKNOWN, SpmModel

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


def _train_bpe(word_freqs: Mapping[str, int], n_pieces: int, reserved: set[str], pairs: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """A small deterministic BPE trainer; returns `n_pieces` new pieces in merge order (`pairs`, when given, receives
    each new piece's two halves).

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
            if pairs is not None:
                pairs[merged] = (a, b)
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


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
QWEN2_FIRST_SPECIAL = 151643  # `<|endoftext|>`; the others follow (llava-onevision-qwen2's added tokens)
# Qwen2's pre-tokenizer split (tokenizer.json of the release)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def synthetic_qwen2_tokenizer_json(n_merges: int = 1500) -> dict:
    """A Qwen2-like byte-level BPE tokenizer.json (we cannot ship Qwen2's): NFC, Qwen2's split regex, byte-level
    alphabet (ids 0-255), `n_merges` merges trained on the built-in English words, and the five added tokens of
    llava-onevision-qwen2 at their real ids (151643-151647), so `image_token_index` 151646 is the release's."""
    chars = _byte_chars()
    table = dict(zip(range(256), chars, strict=True))
    freqs: dict[str, int] = {}
    for rank, w in enumerate(dict.fromkeys(_WORDS)):
        f = int(200_000 / (rank + 20))
        for text, share in ((" " + w, f), (" " + w.capitalize(), max(1, f // 8)), (w, max(1, f // 16))):
            key = "".join(table[b] for b in text.encode("utf-8"))
            freqs[key] = freqs.get(key, 0) + share
    pairs: dict[str, tuple[str, str]] = {}
    pieces = _train_bpe(freqs, n_merges, reserved=set(chars), pairs=pairs)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({p: 256 + i for i, p in enumerate(pieces)})
    # unreachable fillers (no merge makes them) up to Qwen2's 151643 regular tokens: tokenizers numbers added tokens
    # right after the model's vocabulary, so the specials land on their real ids only with a full-size vocabulary
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), QWEN2_FIRST_SPECIAL)})
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {"id": QWEN2_FIRST_SPECIAL + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(QWEN2_SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}, level]},
        "post_processor": dict(level),
        "decoder": dict(level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": [list(pairs[p]) for p in pieces]},
    }


def synthetic_siglip_spm(vocab_size: int = 32000, seed: int = 0) -> SpmModel:
    """A SigLIP-like sentencepiece unigram model (we cannot ship SigLIP's): `<pad>` 0, `</s>` 1, `<unk>` 2 as in
    google/siglip-so400m-patch14-384, then lowercase word pieces (log-probability-like decreasing scores) and single
    characters; no byte fallback, identity normalizer, dummy prefix and whitespace cleanup on."""
    specials: list[tuple[str, float, int]] = [("<pad>", 0.0, SPM_CONTROL), ("</s>", 0.0, SPM_CONTROL), ("<unk>", 0.0, SPM_UNKNOWN)]
    chars = [c for c in _CHARS if not c.isupper()]
    n_merged = vocab_size - len(specials) - len(chars)
    if n_merged < 0:
        raise InputError(f"vocab_size={vocab_size} is too small: the synthetic SigLIP vocabulary needs at least {len(specials) + len(chars)}.")
    llama_pieces = _synthetic_pieces(vocab_size - 3 - 256 - len(_SPACE_RUN_ORDER) - len(_CHARS), seed)  # cached with the LLaMA vocabulary's
    lower = [p.lower() for p in llama_pieces]
    words = [p for p in dict.fromkeys(lower + [_SPACE + p for p in lower if not p.startswith(_SPACE)]) if p not in chars][:n_merged]
    if len(words) < n_merged:
        raise InputError(f"the synthetic corpus has {len(words)} lowercase pieces; vocab_size={vocab_size} needs {n_merged}.")
    pieces = list(specials)
    pieces += [(w, -2.0 - 0.001 * i, SPM_NORMAL) for i, w in enumerate(words)]
    pieces += [(c, -20.0 - 0.01 * i, SPM_NORMAL) for i, c in enumerate(chars)]
    assert len({p for p, _, _ in pieces}) == vocab_size
    return SpmModel(pieces=pieces, model_type=SPM_UNIGRAM, vocab_size=vocab_size, byte_fallback=False, unk_id=2, bos_id=-1, eos_id=1, pad_id=0,
                    add_dummy_prefix=True, remove_extra_whitespaces=True)
