"""runtime.generation (numpy loop) against transformers' generate on a tiny random Llama."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from ppllava_edge.errors import InputError
from ppllava_edge.runtime.generation import GenerationConfig, GenerationOutput, generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, EOS, PROMPT_LEN = 300, 64, 2, 16


class TorchDecoder:
    """A KVDecoder over a transformers causal LM with a DynamicCache (test-only; the runtime never imports torch)."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.batch = 0

    def reset(self, batch: int) -> None:
        self.cache = transformers.DynamicCache(config=self.model.config)
        self.batch = batch

    @torch.no_grad()
    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        b, s = x.shape[:2]
        assert b == self.batch, (b, self.batch)
        past = self.cache.get_seq_length()
        out = self.model(
            inputs_embeds=x,
            attention_mask=torch.ones(b, past + s, dtype=torch.long),
            position_ids=torch.arange(past, past + s)[None].expand(b, s),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1].float().numpy()

    def reorder(self, beam_idx: np.ndarray) -> None:
        assert beam_idx.dtype == np.int64 and beam_idx.ndim == 1
        self.cache.reorder_cache(torch.from_numpy(beam_idx))
        self.batch = beam_idx.shape[0]


class FixedLogitsDecoder:
    """Returns the same logits at every step (for checking the sampling filters)."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits.astype(np.float32)

    def reset(self, batch: int) -> None:
        self.batch = batch

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        return np.repeat(self.logits[None], inputs_embeds.shape[0], axis=0)

    def reorder(self, beam_idx: np.ndarray) -> None:
        self.batch = beam_idx.shape[0]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The model is tiny: extra threads only add overhead (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _make_lm(eos_weight: float):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # logits std ~0.8: not flat
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # EOS reads one hidden channel alone, so it wins at some positions and not at others.
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = eos_weight
    return model


# 1.0: EOS ends some greedy runs early. 2.0: beam search often fills all num_beams finished slots before
# max_new_tokens, so the early-stop heuristic, early_stopping=True and several EOS candidates per step matter.
@pytest.fixture(scope="module", params=[1.0, 2.0], ids=["eos1", "eos2"])
def lm(request):
    return _make_lm(request.param)


@pytest.fixture(scope="module")
def embed(lm):
    return _embedder(lm)


def _embedder(model):
    table = model.model.embed_tokens.weight.detach().numpy().copy()
    return lambda ids: table[ids][:, None, :]


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((PROMPT_LEN, HIDDEN)).astype(np.float32)


@torch.no_grad()
def _hf_generate_counted(lm, prompt: np.ndarray, **kwargs) -> tuple[list[int], int]:
    """transformers' new ids, and how many forward passes it ran (prefill included)."""
    calls = []
    hook = lm.register_forward_hook(lambda *_: calls.append(1))
    try:
        e = torch.from_numpy(prompt)[None]
        out = lm.generate(
            inputs_embeds=e,
            attention_mask=torch.ones(1, e.shape[1], dtype=torch.long),
            eos_token_id=EOS,
            pad_token_id=0,
            **kwargs,
        )
    finally:
        hook.remove()
    return out[0].tolist(), len(calls)


def _ours(lm, embed, prompt, **kwargs) -> GenerationOutput:
    return generate(TorchDecoder(lm), embed, prompt, GenerationConfig(**kwargs))


# ---------------------------------------------------------------------------------------------------------------
# greedy


GREEDY_SEEDS = range(10)


def test_greedy_matches_transformers(lm, embed):
    early_eos = 0
    for seed in GREEDY_SEEDS:
        prompt = _prompt(seed)
        ref, ref_calls = _hf_generate_counted(lm, prompt, do_sample=False, max_new_tokens=20)
        out = _ours(lm, embed, prompt, max_new_tokens=20)
        assert out.ids == ref, seed
        assert 1 + len(out.step_ms) == ref_calls
        assert out.finished_by_eos == (ref[-1] == EOS)
        assert len(out.step_ms) == len(out.ids) - 1 and out.prefill_ms > 0
        early_eos += out.finished_by_eos and len(out.ids) < 20
    assert early_eos >= 1, "fixture should make EOS reachable"


# ---------------------------------------------------------------------------------------------------------------
# beam search


BEAM_SEEDS = range(6)


@pytest.mark.parametrize("num_beams", [2, 3, 5])
@pytest.mark.parametrize("max_new_tokens", [1, 3, 8, 20])
def test_beam_search_matches_transformers(lm, embed, num_beams, max_new_tokens):
    for seed in BEAM_SEEDS:
        prompt = _prompt(seed)
        ref, ref_calls = _hf_generate_counted(lm, prompt, do_sample=False, num_beams=num_beams,
                                              max_new_tokens=max_new_tokens, length_penalty=1.0, early_stopping=False)
        out = _ours(lm, embed, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens)
        assert out.ids == ref, (seed, out.ids, ref)
        assert 1 + len(out.step_ms) == ref_calls  # same stopping step
        assert out.finished_by_eos == (ref[-1] == EOS)


def test_beam_search_cases_include_eos():
    """The beam cases cover best hypotheses that end with EOS before max_new_tokens and ones that run to it."""
    ends = set()
    for eos_weight in (1.0, 2.0):
        model = _make_lm(eos_weight)
        for seed in BEAM_SEEDS:
            for n in (2, 3, 5):
                out = _ours(model, _embedder(model), _prompt(seed), num_beams=n, max_new_tokens=20)
                ends.add("eos" if out.finished_by_eos and len(out.ids) < 20 else "len" if len(out.ids) == 20 else "?")
    assert ends == {"eos", "len"}, ends


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"), [(0.5, False), (2.0, False), (1.0, True), (-1.0, True), (2.0, "never")]
)
def test_beam_search_options_match_transformers(lm, embed, length_penalty, early_stopping):
    for seed in BEAM_SEEDS:
        prompt = _prompt(seed)
        kw = dict(num_beams=3, max_new_tokens=12, length_penalty=length_penalty, early_stopping=early_stopping)
        ref, ref_calls = _hf_generate_counted(lm, prompt, do_sample=False, **kw)
        out = _ours(lm, embed, prompt, **kw)
        assert out.ids == ref, seed
        assert 1 + len(out.step_ms) == ref_calls, seed  # same stopping step


# ---------------------------------------------------------------------------------------------------------------
# sampling


SAMPLE_SEEDS = range(4)


def test_sampling_is_reproducible_per_seed(lm, embed):
    for p in SAMPLE_SEEDS:
        prompt = _prompt(p)
        kw = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=16, ignore_eos=True)
        a = _ours(lm, embed, prompt, seed=7, **kw).ids
        b = _ours(lm, embed, prompt, seed=7, **kw).ids
        c = _ours(lm, embed, prompt, seed=8, **kw).ids
        assert a == b
        assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy(lm, embed):
    for p in SAMPLE_SEEDS:
        prompt = _prompt(p)
        greedy = _ours(lm, embed, prompt, max_new_tokens=16).ids
        assert _ours(lm, embed, prompt, do_sample=True, top_k=1, seed=p, temperature=0.5, max_new_tokens=16).ids == greedy
        assert _ours(lm, embed, prompt, do_sample=True, top_p=1e-6, seed=p, max_new_tokens=16).ids == greedy


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 0.6), (0.7, 20, 1.0), (1.5, 40, 0.8), (0.3, 0, 0.9)])
def test_sampling_filters_follow_transformers(temperature, top_k, top_p):
    """Sampled ids stay inside the set transformers' warpers (temperature → top-k → top-p) keep, and cover it."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).standard_normal(64).astype(np.float32) * 0.7
    scores = torch.from_numpy(logits)[None]
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    allowed = set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())
    assert 1 < len(allowed) < 64

    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=0,
                           max_new_tokens=2000, ignore_eos=True)
    ids = generate(FixedLogitsDecoder(logits), lambda i: np.zeros((len(i), 1, 4), np.float32),
                   np.zeros((3, 4), np.float32), cfg).ids
    assert set(ids) <= allowed
    probs = torch.softmax(scores[0], -1).numpy()
    assert {i for i in allowed if probs[i] > 0.01} <= set(ids)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        (dict(temperature=0.0), "0.0"),
        (dict(temperature=-1.0), "-1.0"),
        (dict(temperature=math.nan), "nan"),
        (dict(top_p=0.0), "0.0"),
        (dict(top_p=1.5), "1.5"),
        (dict(top_k=-1), "-1"),
        (dict(max_new_tokens=0), "0"),
        (dict(num_beams=0), "0"),
        (dict(num_beams=2, do_sample=True), "2"),
        (dict(seed=-3), "-3"),
        (dict(early_stopping="sometimes"), "sometimes"),
        (dict(eos_token_id=-1), "-1"),
        (dict(max_new_tokens=True), "True"),
    ],
)
def test_config_validation(kwargs, shown):
    with pytest.raises(InputError) as err:
        GenerationConfig(**kwargs)
    first = str(err.value).splitlines()[0]
    assert next(iter(kwargs)) in first and shown in first


def test_prompt_validation(lm, embed):
    with pytest.raises(InputError, match=r"\(16,\)"):
        generate(TorchDecoder(lm), embed, np.zeros(16, np.float32))
    with pytest.raises(InputError, match="int64"):
        generate(TorchDecoder(lm), embed, np.zeros((4, HIDDEN), np.int64))


# ---------------------------------------------------------------------------------------------------------------
# ignore_eos, streaming


def _early_eos_prompt(lm, embed) -> tuple[np.ndarray, list[int]]:
    for seed in GREEDY_SEEDS:
        out = _ours(lm, embed, _prompt(seed), max_new_tokens=20)
        if out.finished_by_eos and len(out.ids) < 20:
            return _prompt(seed), out.ids
    raise AssertionError("no prompt hits EOS early")


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(do_sample=True, seed=1)])
def test_ignore_eos_generates_exactly_max_new_tokens(lm, embed, kw):
    prompt, stopped = _early_eos_prompt(lm, embed)
    out = _ours(lm, embed, prompt, max_new_tokens=24, ignore_eos=True, **kw)
    assert len(out.ids) == 24 and not out.finished_by_eos
    if not kw:
        assert out.ids[: len(stopped)] == stopped  # EOS stays in the middle of the ids
        assert len(out.step_ms) == 23


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(do_sample=True, seed=2), dict(ignore_eos=True)])
def test_on_token_streams_the_returned_ids(lm, embed, kw):
    prompt, _ = _early_eos_prompt(lm, embed)
    seen: list[int] = []
    out = generate(TorchDecoder(lm), embed, prompt, GenerationConfig(max_new_tokens=20, **kw), on_token=seen.append)
    assert seen == out.ids and all(type(t) is int for t in seen)


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(do_sample=True, seed=2)])
def test_on_token_returning_true_stops_after_that_token(lm, embed, kw):
    prompt, _ = _early_eos_prompt(lm, embed)
    full = generate(TorchDecoder(lm), embed, prompt, GenerationConfig(max_new_tokens=20, ignore_eos=True, **kw))
    seen: list[int] = []
    out = generate(TorchDecoder(lm), embed, prompt, GenerationConfig(max_new_tokens=20, ignore_eos=True, **kw),
                   on_token=lambda t: seen.append(t) or len(seen) == 5)
    assert out.ids == seen == full.ids[:5] and out.stopped and not full.stopped
    if not kw.get("num_beams"):
        assert len(out.step_ms) == 4  # no forward pass after the stop
