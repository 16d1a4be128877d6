"""Tests of ppllava_edge.tokenization: sentencepiece proto IO, LLaMA prompt ids, the synthetic vocabulary, CLIP."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from ppllava_edge.errors import InputError, TokenizerError
from ppllava_edge.tokenization import (
    CLIP_EOS_ID,
    SPM_BYTE,
    SPM_CONTROL,
    SPM_NORMAL,
    SPM_UNKNOWN,
    TEMPLATE,
    ClipTokenizer,
    LlamaPromptTokenizer,
    SpmModel,
    build_llama_tokenizer,
    check_llama_merge_order,
    load_llama_tokenizer_from_checkpoint,
    parse_spm_model,
    read_spm_model,
    render_prompt,
    serialize_spm_model,
    synthetic_llama_spm,
    write_spm_model,
)

LLAMA_DIR = Path(__file__).resolve().parents[2] / "shared/data/llama-tokenizer"
needs_llama = pytest.mark.skipif(
    not (LLAMA_DIR / "tokenizer.model").is_file(), reason=f"real LLaMA tokenizer files absent ({LLAMA_DIR})"
)
SPACE = "\u2581"
ADDED = {"<image>": 32000, "<pad>": 32001}

QUESTION = "What is happening in the video?"
# From shared/data/llama-tokenizer/README.md (the authors' inference path).
EXPECTED_PROMPT = [1, 3148, 1001, 29901, 29871, 32000, 13, 5618, 338, 10464, 297, 278, 4863, 29973]
EXPECTED_PROMPT += [319, 1799, 9047, 13566, 29901, 29871]
HEAD = [1, 3148, 1001, 29901, 29871, 32000]  # <s> ▁US ER : ▁ <image>
TAIL_END = [319, 1799, 9047, 13566, 29901, 29871]  # ▁A SS IST ANT : ▁


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------

_WORDS = "the a video man woman is are what happening in on at of dog cat running jumps quickly describe scene".split()
_LITERALS = ["<image>", "</s>", "<s>", "<unk>", "<pad>", "<|endoftext|>", "<IMAGE>", "</S>", SPACE]
_EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "🎥"]
_ODD_SPACES = ["\t", "\n", "\r\n", "\u00a0", "\u200d", "\u3000", "\u200b", "\ufeff"]


def fuzz_strings(n: int, seed: int) -> list[str]:
    """Seeded questions: words, space runs (up to 17+), tabs/CRLF/NBSP/ZWJ, CJK, emoji, astral code points,
    special-token literals, punctuation and digits."""
    rng = random.Random(seed)

    def atom() -> str:
        r = rng.random()
        if r < 0.45:
            w = rng.choice(_WORDS)
            return w.capitalize() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w
        if r < 0.60:
            return " " * rng.choice([1, 1, 2, 3, 4, 5, 8, 16, 17, 33])
        if r < 0.66:
            return rng.choice(_ODD_SPACES)
        if r < 0.72:
            return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 4)))
        if r < 0.77:
            return rng.choice(_EMOJI)
        if r < 0.80:
            c = rng.randint(0x80, 0x10FFFF)
            while 0xD800 <= c <= 0xDFFF:
                c = rng.randint(0x80, 0x10FFFF)
            return chr(c)
        if r < 0.86:
            return rng.choice(_LITERALS)
        if r < 0.93:
            return rng.choice(list(".,?!:;'\"()-/<>[]{}#@&*+=%$"))
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))

    return ["".join(atom() for _ in range(rng.randint(0, 14))) for _ in range(n)]


def sentencepiece_pair(spm: SpmModel, tmp: Path):
    """sentencepiece processors for `spm` as it is and with add_dummy_prefix off (written with our writer)."""
    sp_lib = pytest.importorskip("sentencepiece")
    write_spm_model(tmp / "dummy.model", spm)
    write_spm_model(tmp / "nodummy.model", dataclasses.replace(spm, add_dummy_prefix=False))
    sp = sp_lib.SentencePieceProcessor(model_file=str(tmp / "dummy.model"))
    sp_nodummy = sp_lib.SentencePieceProcessor(model_file=str(tmp / "nodummy.model"))
    return sp, sp_nodummy


def sp_prompt_ids(sp, sp_nodummy, question: str) -> list[int]:
    """The authors' ids built from sentencepiece (notes §2): BOS, "USER: " with prefix, image, tail without."""
    return [1, *sp.encode("USER: "), 32000, *sp_nodummy.encode("\n" + question + " ASSISTANT: ")]


def id_ranked_merges(tok: Tokenizer) -> dict:
    """The tokenizer's JSON with merges re-ranked by the id of the merged piece (transformers 5's bug)."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in data["model"]["merges"]]
    merges.sort(key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    data["model"]["merges"] = [list(m) for m in merges]
    return data


@pytest.fixture(scope="module")
def real_spm() -> SpmModel:
    return read_spm_model(LLAMA_DIR / "tokenizer.model")


@pytest.fixture(scope="module")
def real_tok() -> Tokenizer:
    return load_llama_tokenizer_from_checkpoint(LLAMA_DIR)


@pytest.fixture(scope="module")
def real_prompt(real_tok) -> LlamaPromptTokenizer:
    return LlamaPromptTokenizer(real_tok)


@pytest.fixture(scope="module")
def real_sp(real_spm, tmp_path_factory):
    return sentencepiece_pair(real_spm, tmp_path_factory.mktemp("real_sp"))


@pytest.fixture(scope="module")
def synth_spm() -> SpmModel:
    return synthetic_llama_spm()


@pytest.fixture(scope="module")
def synth_tok(synth_spm) -> Tokenizer:
    return build_llama_tokenizer(synth_spm, ADDED)


@pytest.fixture(scope="module")
def clip() -> ClipTokenizer:
    return ClipTokenizer()


# ------------------------------------------------------------------------------------------------
# sentencepiece ModelProto reader / writer
# ------------------------------------------------------------------------------------------------


def _key(fn: int, wt: int) -> bytes:
    return bytes([(fn << 3) | wt]) if fn < 16 else bytes([((fn << 3) | wt) & 0x7F | 0x80, (fn << 3 | wt) >> 7])


def _ld(fn: int, payload: bytes) -> bytes:
    return _key(fn, 2) + bytes([len(payload)]) + payload


def _unknown_fields(fn: int) -> bytes:
    """One unknown field of every wire type: varint, fixed64, length-delimited, group (nested), fixed32."""
    group = _key(fn + 1, 3) + _key(1, 0) + b"\x05" + _key(2, 3) + _key(1, 5) + b"abcd" + _key(2, 4) + _key(fn + 1, 4)
    return (
        _key(fn, 0)
        + b"\xff\xff\x03"
        + _key(fn + 2, 1)
        + b"12345678"
        + _ld(fn + 3, b"skip me")
        + group
        + _key(fn + 4, 5)
        + b"wxyz"
    )


def test_spm_reader_skips_unknown_fields_of_every_wire_type():
    def piece(s: str, score: float, t: int) -> bytes:
        body = _ld(1, s.encode()) + _key(2, 5) + struct.pack("<f", score) + _key(3, 0) + bytes([t])
        return _ld(1, body + _unknown_fields(7))

    trainer = _unknown_fields(50) + _key(3, 0) + b"\x02" + _key(35, 0) + b"\x01" + _key(43, 0) + b"\xff" * 9 + b"\x01"
    normalizer = _ld(1, b"identity") + _key(3, 0) + b"\x00" + _unknown_fields(9)
    data = (
        piece("<unk>", 0.0, 2)
        + _unknown_fields(20)
        + piece("<s>", 0.0, 3)
        + piece("ab", -1.5, 1)
        + _ld(2, trainer)
        + _ld(3, normalizer)
        + _ld(5, b"denormalizer")
    )
    m = parse_spm_model(data)
    assert m.pieces == [("<unk>", 0.0, SPM_UNKNOWN), ("<s>", 0.0, SPM_CONTROL), ("ab", -1.5, SPM_NORMAL)]
    assert (m.model_type, m.byte_fallback, m.pad_id, m.unk_id, m.bos_id, m.eos_id) == (2, True, -1, 0, 1, 2)
    assert (m.normalizer_name, m.add_dummy_prefix, m.remove_extra_whitespaces, m.escape_whitespaces) == (
        "identity",
        False,
        True,
        True,
    )
    # Unknown sub-message fields survive a write; a changed value replaces its record.
    again = parse_spm_model(serialize_spm_model(dataclasses.replace(m, add_dummy_prefix=True, pad_id=3)))
    assert again.pieces == m.pieces and again.add_dummy_prefix and again.pad_id == 3
    assert {fn for fn, _ in again.trainer_records} >= {50, 51, 52, 53, 54}
    assert sorted(again.extra_records) == sorted(m.extra_records)


@pytest.mark.parametrize("bad", [b"\x0a\x05ab", b"\x08", b"\x0f\x00", b"\x1b\x08\x01", b"\x00\x01"])
def test_spm_reader_rejects_malformed(bad):
    with pytest.raises(TokenizerError):
        parse_spm_model(bad)


def test_spm_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="nope.model"):
        read_spm_model(tmp_path / "nope.model")


@needs_llama
def test_spm_round_trip_of_real_model_is_byte_identical(real_spm):
    data = (LLAMA_DIR / "tokenizer.model").read_bytes()
    assert serialize_spm_model(real_spm) == data
    assert len(real_spm.pieces) == 32000 and real_spm.pieces[259] == (SPACE * 2, -1e9, SPM_NORMAL)
    assert real_spm.pieces[13] == ("<0x0A>", 0.0, SPM_BYTE) and real_spm.byte_fallback and real_spm.add_dummy_prefix


@needs_llama
def test_spm_reader_matches_sentencepiece(real_spm):
    """Our protobuf reader/writer against sentencepiece's own C++ loader (not its generated protobuf module: the
    `triton` extra pins protobuf 6.33.6, older than sentencepiece 0.2.3's gencode)."""
    import dataclasses

    spm = pytest.importorskip("sentencepiece")
    raw = (LLAMA_DIR / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=raw)
    kind = lambda i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else None  # noqa: E731
    assert len(real_spm.pieces) == sp.get_piece_size()
    for i, (piece, score, type_) in enumerate(real_spm.pieces):
        assert (piece, score) == (sp.id_to_piece(i), pytest.approx(sp.get_score(i)))
        assert kind(i) in (type_, None) and (kind(i) is not None) == (type_ in (2, 3, 5, 6)), (i, piece, type_)
    assert real_spm.byte_fallback and sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
    texts = ["Hello world", "  What is happening in the video?", "naïve café 東京 🙂", "a\nb\tc", "</s> <image>"]
    # written back unchanged: sentencepiece loads it and tokenizes exactly as the original
    same = spm.SentencePieceProcessor(model_proto=serialize_spm_model(parse_spm_model(raw)))
    assert [same.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    # our writer's one change (no dummy prefix) is what sentencepiece reads: no leading "▁" piece any more
    assert real_spm.add_dummy_prefix
    ours = dataclasses.replace(parse_spm_model(raw), add_dummy_prefix=False)
    flat = spm.SentencePieceProcessor(model_proto=serialize_spm_model(ours))
    assert sp.encode("Hello", out_type=str)[0].startswith("\u2581") and not flat.encode("Hello", out_type=str)[0].startswith("\u2581")
    assert flat.decode(flat.encode("Hello world")) == "Hello world"


# ------------------------------------------------------------------------------------------------
# the real LLaMA tokenizer
# ------------------------------------------------------------------------------------------------


def test_template():
    assert TEMPLATE == "USER: <image>\n{question} ASSISTANT: "
    assert render_prompt("Why {x}?") == "USER: <image>\nWhy {x}? ASSISTANT: "
    with pytest.raises(InputError):
        render_prompt(None)  # type: ignore[arg-type]


@needs_llama
def test_real_prompt_ids_match_the_authors(real_prompt, real_tok):
    assert real_prompt.prompt_ids(QUESTION) == EXPECTED_PROMPT
    assert real_tok.encode(render_prompt(QUESTION)).ids == EXPECTED_PROMPT  # the full tokenizer agrees
    assert (real_prompt.bos_token_id, real_prompt.eos_token_id, real_prompt.vocab_size) == (1, 2, 32002)
    with pytest.raises(InputError):
        real_prompt.prompt_ids(b"bytes")  # type: ignore[arg-type]


@needs_llama
@pytest.mark.parametrize(
    ("question", "tail"),
    [
        ("a   b", [13, 29874, 259, 289]),  # a ▁▁ ▁b
        ("x  y    z", [13, 29916, 29871, 343, 1678, 503]),  # x ▁ ▁y ▁▁▁ ▁z (id-ranked merges: x ▁▁ y ▁▁▁▁ z)
        ("tab\there\nnew line", [13, 3891, 12, 4150, 13, 1482, 1196]),
        ("emoji 😀 and 中文", [13, 15810, 2397, 29871, 243, 162, 155, 131, 322, 29871, 30275, 30333]),
        ("<image> first", [13, 29966, 3027, 29958, 937]),  # < image > at segment start, after \n
        ("see <image> now", [13, 4149, 529, 3027, 29958, 1286]),  # ▁< image > after a space
        ("end </s> <s> x", [13, 355, 1533, 29879, 29958, 529, 29879, 29958, 921]),
    ],
)
def test_real_prompt_ids_hard_cases(real_prompt, question, tail):
    ids = real_prompt.prompt_ids(question)
    assert ids == HEAD + tail + TAIL_END
    assert ids.count(32000) == 1 and ids.count(1) == 1 and 2 not in ids


@needs_llama
def test_real_prompt_ids_equal_sentencepiece_on_fuzz(real_prompt, real_sp):
    sp, sp_nodummy = real_sp
    questions = fuzz_strings(300, seed=1234) + ["a   b", "\t\ttabs", "x\n\ny", "😀", "中文 問題", "<image>", "</s>", ""]
    bad = [q for q in questions if real_prompt.prompt_ids(q) != sp_prompt_ids(sp, sp_nodummy, q)]
    assert not bad, f"{len(bad)} mismatches, first {bad[0]!r}"


@needs_llama
def test_real_decode(real_prompt):
    assert real_prompt.decode([450, 11203, 338, 29871, 243, 162, 155, 131, 2]) == "The dog is 😀"
    ids = real_prompt.prompt_ids("see <image> now")
    assert real_prompt.decode(ids) == "USER: \nsee <image> now ASSISTANT: "
    assert real_prompt.decode(ids, skip_special_tokens=False).startswith("<s> USER: <image>\n")
    with pytest.raises(InputError):
        real_prompt.decode([-200])


@needs_llama
def test_save_and_load_round_trip(real_prompt, tmp_path):
    path = real_prompt.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = LlamaPromptTokenizer.from_file(path)
    for q in [QUESTION, "a   b", "see <image> now </s>", *fuzz_strings(60, seed=7)]:
        assert loaded.prompt_ids(q) == real_prompt.prompt_ids(q)
    # The saved JSON is the plain tokenizer: the runtime-only flag is re-applied by from_file, not stored.
    assert LlamaPromptTokenizer.from_file(tmp_path).prompt_ids("see <image> now").count(32000) == 1


@needs_llama
def test_checkpoint_folder_with_tokenizer_json_only(real_tok, tmp_path):
    good, broken = tmp_path / "good", tmp_path / "broken"
    good.mkdir()
    broken.mkdir()
    real_tok.save(str(good / "tokenizer.json"))
    assert load_llama_tokenizer_from_checkpoint(good).encode(render_prompt(QUESTION)).ids == EXPECTED_PROMPT

    bad_json = id_ranked_merges(real_tok)
    (broken / "tokenizer.json").write_text(json.dumps(bad_json), encoding="utf-8")
    # The bug is real: the id-ranked tokenizer splits a run of spaces differently.
    bad_tok = Tokenizer.from_str(json.dumps(bad_json))
    assert bad_tok.encode("x  y").tokens == ["<s>", "▁x", "▁▁", "y"]
    assert real_tok.encode("x  y").tokens == ["<s>", "▁x", "▁", "▁y"]
    assert bad_tok.encode("a    b").ids != real_tok.encode("a    b").ids
    with pytest.raises(TokenizerError, match="transformers 5"):
        load_llama_tokenizer_from_checkpoint(broken)
    with pytest.raises(TokenizerError, match="transformers 5"):
        LlamaPromptTokenizer.from_file(broken / "tokenizer.json")
    with pytest.raises(TokenizerError):
        LlamaPromptTokenizer(bad_tok)
    check_llama_merge_order(real_tok)  # the correct order passes


@needs_llama
def test_checkpoint_folder_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_llama_tokenizer_from_checkpoint(tmp_path)
    shutil.copy(LLAMA_DIR / "tokenizer.model", tmp_path)
    with pytest.raises(TokenizerError, match=f"tokenizer_config.json in {tmp_path}"):
        load_llama_tokenizer_from_checkpoint(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_llama_tokenizer_from_checkpoint(tmp_path / "nowhere")


@needs_llama
def test_checkpoint_config_is_honoured(tmp_path):
    for name in ("tokenizer.model", "special_tokens_map.json"):
        shutil.copy(LLAMA_DIR / name, tmp_path)
    config = json.loads((LLAMA_DIR / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    config["added_tokens_decoder"]["32000"]["lstrip"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001, "<extra>": 32002}))
    tok = load_llama_tokenizer_from_checkpoint(tmp_path)
    assert tok.encode("hi").ids == [7251, 2]  # no BOS, EOS
    assert tok.token_to_id("<extra>") == 32002
    assert tok.encode("a <image>").ids == [263, 32000, 2]  # lstrip eats the space before <image>
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": 32005}))
    with pytest.raises(TokenizerError, match="<image>"):
        load_llama_tokenizer_from_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# the synthetic preset vocabulary
# ------------------------------------------------------------------------------------------------


def test_synthetic_layout(synth_spm):
    pieces = synth_spm.pieces
    assert len(pieces) == 32000 and len({p for p, _, _ in pieces}) == 32000
    assert pieces[:3] == [("<unk>", 0.0, SPM_UNKNOWN), ("<s>", 0.0, SPM_CONTROL), ("</s>", 0.0, SPM_CONTROL)]
    assert [p for p, _, t in pieces[3:259]] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(t == SPM_BYTE for _, _, t in pieces[3:259])
    runs = pieces[259:274]
    assert sorted(len(p) for p, _, _ in runs) == list(range(2, 17)) and all(set(p) == {SPACE} for p, _, _ in runs)
    assert all(s == -1e9 and t == SPM_NORMAL for _, s, t in runs)
    ids = synth_spm.piece_to_id()
    assert SPACE in ids and "e" in ids
    # Every multi-character NORMAL piece is two existing NORMAL pieces, each a single character or ranked before
    # it (higher score, or an earlier id at the same score), so BPE merges can reach it.
    normal = {p: i for i, (p, _, t) in enumerate(pieces) if t == SPM_NORMAL}
    rank = {p: (-pieces[i][1], i) for p, i in normal.items()}

    def ready(part: str, piece: str) -> bool:  # single characters are there from the start
        return part in normal and (len(part) == 1 or rank[part] < rank[piece])

    for p in normal:
        if len(p) > 1:
            assert any(ready(p[:k], p) and ready(p[k:], p) for k in range(1, len(p))), p
    scores = [s for p, s, t in pieces[274:] if t == SPM_NORMAL and p != SPACE]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_synthetic_is_deterministic(synth_spm):
    assert serialize_spm_model(synthetic_llama_spm()) == serialize_spm_model(synth_spm)
    small = synthetic_llama_spm(vocab_size=1000, seed=3)
    assert len(small.pieces) == 1000 and small.pieces != synthetic_llama_spm(vocab_size=1000, seed=4).pieces
    with pytest.raises(InputError):
        synthetic_llama_spm(vocab_size=100)


def test_synthetic_tokenizer(synth_tok):
    assert synth_tok.get_vocab_size() == 32002 and synth_tok.token_to_id("<image>") == 32000
    emoji = synth_tok.encode("ok 😀").tokens
    assert emoji[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert synth_tok.decode(synth_tok.encode("ok 😀 中文 a   b").ids) == "ok 😀 中文 a   b"
    check_llama_merge_order(synth_tok)
    with pytest.raises(TokenizerError, match="transformers 5"):
        check_llama_merge_order(id_ranked_merges(synth_tok))
    prompt = LlamaPromptTokenizer(synth_tok)
    ids = prompt.prompt_ids("see <image> now")
    assert ids[0] == 1 and ids.count(32000) == 1 and ids[-1] == synth_tok.token_to_id(SPACE)


def test_synthetic_equals_sentencepiece(synth_spm, synth_tok, tmp_path):
    sp, sp_nodummy = sentencepiece_pair(synth_spm, tmp_path)
    assert sp.get_piece_size() == 32000
    assert sp.encode("ok 😀", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    prompt = LlamaPromptTokenizer(synth_tok)
    questions = fuzz_strings(300, seed=99) + [QUESTION, "a   b", "x" + " " * 40 + "y"]
    bad = [q for q in questions if prompt.prompt_ids(q) != sp_prompt_ids(sp, sp_nodummy, q)]
    assert not bad, f"{len(bad)} mismatches, first {bad[0]!r}"
    # Plain encoding too, for text without special literals and without leading whitespace (sentencepiece adds
    # `▁` before a leading space; Metaspace does not, in transformers 4.45 either).
    plain = [q for q in questions if q[:1].strip() and q[0] != SPACE and "<" not in q]
    assert len(plain) > 100
    assert [synth_tok.encode(q, add_special_tokens=False).ids for q in plain] == [sp.encode(q) for q in plain]


def test_build_rejects_bad_added_tokens(synth_spm):
    with pytest.raises(TokenizerError, match="without gaps"):
        build_llama_tokenizer(synth_spm, {"<image>": 32001})
    with pytest.raises(TokenizerError, match="piece"):
        build_llama_tokenizer(synth_spm, {"<image>": 5})
    with pytest.raises(TokenizerError, match="BPE"):
        build_llama_tokenizer(dataclasses.replace(synth_spm, model_type=1), ADDED)


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------

CLIP_QUESTION_IDS = [49406, 768, 533, 4284, 530, 518, 1455, 286, 49407]


def test_clip_expected_ids(clip):
    ids = clip.encode(QUESTION)
    assert ids.dtype == np.int64 and ids.shape == (248,)
    assert ids[:9].tolist() == CLIP_QUESTION_IDS and (ids[9:] == CLIP_EOS_ID).all()
    assert clip.encode("a photo of a cat", length=77)[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip.encode(QUESTION, length=77).shape == (77,)
    assert clip.decode(ids) == "what is happening in the video ?"


def test_clip_truncation_and_padding(clip):
    long = " ".join(["word"] * 300)
    ids = clip.encode(long)
    assert ids.shape == (248,) and ids[0] == 49406 and ids[247] == CLIP_EOS_ID and (ids[1:247] != CLIP_EOS_ID).all()
    short = clip.encode(long, length=77)
    assert short[76] == CLIP_EOS_ID and (short[1:76] != CLIP_EOS_ID).all()
    assert clip.encode("").tolist() == [49406] + [49407] * 247
    batch = clip.encode_batch([QUESTION, long], length=77)
    assert batch.shape == (2, 77) and batch.dtype == np.int64 and batch[0, :9].tolist() == CLIP_QUESTION_IDS
    with pytest.raises(InputError):
        clip.encode(QUESTION, length=1)


def test_clip_literals_and_normalization(clip):
    ids = clip.encode("see <image> now").tolist()
    assert ids[2:5] == [283, 2867, 285]  # < image >
    assert clip.encode("WHAT  is\thappening\u00a0in the VIDEO?")[:9].tolist() == CLIP_QUESTION_IDS
    assert clip.encode("Hello <|ENDOFTEXT|> there")[:4].tolist() == [49406, 3306, 49407, 997]  # lower-cased first


def test_clip_save_and_from_file(clip, tmp_path):
    for name in ("clip_tokenizer.json", "clip_tokenizer.json.gz"):
        path = clip.save(tmp_path / name)
        again = ClipTokenizer.from_file(path)
        assert again.encode(QUESTION).tolist() == clip.encode(QUESTION).tolist()
    assert json.loads(gzip.decompress((tmp_path / "clip_tokenizer.json.gz").read_bytes()))["padding"]["pad_id"] == 49407
    with pytest.raises(TokenizerError, match="missing.json"):
        ClipTokenizer.from_file(tmp_path / "missing.json")


@needs_llama
def test_chat_prompt_ids_follow_the_conversation_template(real_prompt, real_tok):
    """Earlier turns: `USER: <image>\\n{u1} ASSISTANT: {a1}</s>USER: {q} ASSISTANT: ` tokenized as one string by the
    full tokenizer (which matches `<image>` and `</s>` as special tokens, as the authors' tokenizer does)."""
    history = [("Describe the video.", "A man  runs."), ("Where  is he?", "In a park, near 3 trees.")]
    q = "What happens next?"
    text = "USER: <image>\n" + history[0][0] + " ASSISTANT: " + history[0][1] + "</s>USER: " + history[1][0] + " ASSISTANT: " + history[1][1]
    text += "</s>USER: " + q + " ASSISTANT: "
    assert real_prompt.chat_prompt_ids(q, history) == real_tok.encode(text).ids
    assert real_prompt.chat_prompt_ids(q) == real_prompt.prompt_ids(q)
    with_system = real_prompt.chat_prompt_ids(q, system="You are brief.")
    assert with_system == real_tok.encode("You are brief. USER: <image>\n" + q + " ASSISTANT: ").ids
    typed = real_prompt.chat_prompt_ids("x </s> <image> y", [("a </s> b", "c")])
    assert typed.count(real_prompt.image_token_id) == 1 and typed.count(2) == 1  # typed specials stay text
    with pytest.raises(InputError, match="history"):
        real_prompt.chat_prompt_ids(q, [("only one",)])


def test_prompt_tokenizer_from_file_parses_the_tokenizer_once_for_full_and_head(synth_tok, tmp_path):
    """`from_file` (what the runtime loads at start-up) uses its own parse as the full tokenizer and the head piece's
    (one parse fewer); a caller's tokenizer is copied, never switched to encode special tokens; the ids and the
    decoding are the same either way."""
    real_tok = synth_tok
    real_prompt = LlamaPromptTokenizer(real_tok)
    path = tmp_path / "tokenizer.json"
    real_prompt.save(path)
    loaded = LlamaPromptTokenizer.from_file(path)
    assert loaded._head is loaded.tokenizer and loaded._tail is not loaded.tokenizer
    assert real_prompt._head is not real_tok and real_tok.encode_special_tokens is False
    for q in ("What is happening in the video?", "a </s> b <s> c", "  spaced\tout\n"):
        assert loaded.prompt_ids(q) == real_prompt.prompt_ids(q)
        ids = loaded.prompt_ids(q)
        assert loaded.decode(ids) == real_prompt.decode(ids)


def test_byte_level_tokenizer_loads_with_one_parse(tmp_path, monkeypatch):
    """A byte-level BPE (SmolLM2, Qwen2: no dummy prefix) tokenizes the text after `<image>` like the text before, so
    `from_file` parses the file once and uses that parse for both pieces (start-up of `ask`, issue 24); the ids equal
    those of a tokenizer given by the caller (which is copied, head and tail parsed apart)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import ppllava_edge.tokenization.prompt as prompt_mod

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is happening in the video?", "USER: ASSISTANT: describe  the moving shapes", "a b c  d\n e"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<image>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    parses = []

    class Counting:
        @staticmethod
        def from_str(s):
            parses.append(len(s))
            return tokenizers.Tokenizer.from_str(s)

    monkeypatch.setattr(prompt_mod, "Tokenizer", Counting)
    loaded = LlamaPromptTokenizer.from_file(path, image_token_id=2)
    assert len(parses) == 1 and loaded._tail is loaded._head
    monkeypatch.undo()
    given = LlamaPromptTokenizer(tokenizers.Tokenizer.from_file(str(path)), image_token_id=2)
    fresh = tokenizers.Tokenizer.from_file(str(path))  # what the second parse gave the text after `<image>`
    fresh.encode_special_tokens = True
    for q in ("What is happening in the video?", " leading  and  double spaces ", "a </s> b <s> c\nnew line"):
        assert loaded.prompt_ids(q) == given.prompt_ids(q) and loaded.prompt_ids(q).count(2) == 1
        assert loaded._tail.encode(q, add_special_tokens=False).ids == fresh.encode(q, add_special_tokens=False).ids


def test_header_json_is_the_file_without_its_model(tmp_path):
    """header_json: the sections before "model" of a tokenizer.json as `tokenizers` writes it (compact or indented),
    equal to the full parse without "model"; None when "model" is not the last top-level key (the caller parses the
    whole file). A byte-level tokenizer loaded through it gives the same prompt ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ppllava_edge.tokenization.prompt import LlamaPromptTokenizer, header_json

    tok = Tokenizer(models.BPE(vocab={"model": 0, "a": 1, "b": 2, "ab": 3, '"model":': 4}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<image>", "</s>"])
    for pretty in (True, False):
        text = tok.to_str(pretty=pretty)
        full = json.loads(text)
        assert header_json(text) == {k: v for k, v in full.items() if k != "model"}
    reordered = json.dumps({"model": full["model"], **{k: v for k, v in full.items() if k != "model"}})
    assert header_json(reordered) is None
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str(pretty=True))
    head, whole = LlamaPromptTokenizer.from_file(path, image_token_id=5), LlamaPromptTokenizer(tok, image_token_id=5)
    assert head.prompt_ids("ab a b") == whole.prompt_ids("ab a b")
