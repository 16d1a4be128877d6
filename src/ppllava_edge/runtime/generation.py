"""Token generation over a KV-cached decoder: greedy, sampling and beam search. numpy only (no torch).

The decoder is anything that follows :class:`KVDecoder` (an ORT/TRT runner wrapper, or a torch model in tests).
The semantics follow transformers 5.24 ``generate``:

- greedy is an argmax; sampling applies temperature → top-k → top-p to the logits and then samples;
- an EOS token ends generation and is included in the returned ids;
- beam search reproduces ``GenerationMixin._beam_search`` step for step (float32 log-softmax scores, top
  ``2 * num_beams`` candidates, length-normalised finished hypotheses, the early-stop heuristic), so its ids equal
  ``generate(inputs_embeds=..., num_beams=N, do_sample=False)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from ..errors import InferenceError, InputError

__all__ = ["EmbedFn", "GenerationConfig", "GenerationOutput", "KVDecoder", "generate"]

# transformers marks impossible beams and placeholder hypotheses with this float32 score.
_NEG = np.float32(-1.0e9)


class KVDecoder(Protocol):
    """A decoder that owns its KV cache."""

    def reset(self, batch: int) -> None:
        """Empties the cache and sizes it for `batch` rows."""
        ...

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Runs `inputs_embeds` [B, S, D] after the cached positions and appends S positions to the cache.

        The attention mask is all ones and positions continue from the cache length.
        Returns the float32 logits of the last position, [B, V].
        """
        ...

    def reorder(self, beam_idx: np.ndarray) -> None:
        """Replaces the cache rows by rows `beam_idx` (int64 [B_new]; may repeat rows or change B)."""
        ...


def _reserve(decoder: KVDecoder, batch: int, positions: int) -> None:
    """Tell a decoder that preallocates its cache (an optional `reserve(batch, positions)` method) what the request
    needs, so it allocates once and exactly: `positions` = prompt + new tokens - 1 (the last token is never fed)."""
    reserve = getattr(decoder, "reserve", None)
    if reserve is not None:
        reserve(batch, positions)


EmbedFn = Callable[[np.ndarray], np.ndarray]  # int64 ids [B] -> embeddings [B, 1, D]


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick new tokens. Field names and defaults follow transformers' GenerationConfig, except top_k (0 = off).

    `ignore_eos` keeps generating after EOS (benchmarks use it to get exactly `max_new_tokens` tokens);
    `eos_token_id=None` also means no EOS. Beam search does not sample (`num_beams > 1` needs `do_sample=False`).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_id: int | None = 2
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, rule: str, hint: str | None = None) -> None:
            msg = f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}"
            raise InputError(msg + (f"\nHint: {hint}" if hint else ""))

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def is_real(v: object) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an int >= 1")
        for name in ("do_sample", "ignore_eos"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "a bool")
        if not is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            fail("temperature", "a finite number > 0", "for deterministic output use do_sample=False (greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an int >= 0 (0 disables top-k)")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "a number in (0, 1] (1 disables top-p)")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            fail("seed", "None or an int >= 0")
        if not is_int(self.num_beams) or self.num_beams < 1:
            fail("num_beams", "an int >= 1")
        if self.num_beams > 1 and self.do_sample:
            fail("num_beams", "1 when do_sample=True (beam sampling is not supported)", "set do_sample=False")
        if not is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            fail("length_penalty", "a finite number")
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            fail("early_stopping", 'True, False or "never"')
        if self.eos_token_id is not None and (not is_int(self.eos_token_id) or self.eos_token_id < 0):
            fail("eos_token_id", "None or an int >= 0")

    @property
    def stops_at_eos(self) -> bool:
        return self.eos_token_id is not None and not self.ignore_eos


@dataclass
class GenerationOutput:
    """New token ids (no prompt) and timings.

    `prefill_ms` covers the prompt forward and the choice of the first token; `step_ms` holds one entry per later
    decode step (forward of the previous token(s), cache reorder for beam search, and the token choice), so for
    greedy/sampling `len(step_ms) == len(ids) - 1`. Streaming callbacks are not timed.
    """

    ids: list[int]
    prefill_ms: float
    step_ms: list[float] = field(default_factory=list)
    finished_by_eos: bool = False
    stopped: bool = False  # on_token asked to stop


def generate(
    decoder: KVDecoder,
    embed: EmbedFn,
    prompt_embeds: np.ndarray,
    config: GenerationConfig | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> GenerationOutput:
    """Generates tokens after one prompt.

    Args:
        decoder: the KV-cached decoder; `generate` resets it first.
        embed: token embedding lookup, int64 [B] -> [B, 1, D].
        prompt_embeds: the prompt's input embeddings [L, D] (text and visual tokens already merged).
        config: decoding options (defaults: greedy, 32 new tokens, EOS id 2).
        on_token: called with each new id. Greedy and sampling call it as soon as the id is chosen; beam search
            knows its ids only at the end and calls it then, once per id of the best hypothesis. When it returns
            True, generation ends after that id (a stop string matched, or the caller went away): the returned
            ids end with it and `stopped` is set.

    Returns:
        The new ids (ending with the EOS id if EOS stopped generation) and the timings.
    """
    config = config if config is not None else GenerationConfig()
    prompt_embeds = np.asarray(prompt_embeds)
    if prompt_embeds.ndim != 2 or prompt_embeds.shape[0] < 1 or prompt_embeds.shape[1] < 1:
        raise InputError(f"prompt_embeds must have shape [L, D] with L, D >= 1, got {prompt_embeds.shape}")
    if not np.issubdtype(prompt_embeds.dtype, np.floating):
        raise InputError(f"prompt_embeds must be a floating-point array, got dtype {prompt_embeds.dtype}")
    if config.num_beams > 1:
        out = _beam_search(decoder, embed, prompt_embeds, config)
        if on_token is not None:
            for n, tok in enumerate(out.ids, 1):
                if on_token(tok):
                    out.finished_by_eos = out.finished_by_eos and n == len(out.ids)
                    out.ids, out.stopped = out.ids[:n], True
                    break
        return out
    return _greedy_or_sample(decoder, embed, prompt_embeds, config, on_token)


# ---------------------------------------------------------------------------------------------------------------
# greedy and sampling


def _greedy_or_sample(
    decoder: KVDecoder,
    embed: EmbedFn,
    prompt_embeds: np.ndarray,
    config: GenerationConfig,
    on_token: Callable[[int], bool | None] | None,
) -> GenerationOutput:
    rng = np.random.default_rng(config.seed) if config.do_sample else None
    stops = config.stops_at_eos
    _reserve(decoder, 1, prompt_embeds.shape[0] + config.max_new_tokens - 1)
    decoder.reset(1)

    t0 = time.perf_counter()
    logits = _checked_logits(decoder.forward(prompt_embeds[None]), 1)
    tok = _pick_token(logits[0], config, rng)
    out = GenerationOutput(ids=[tok], prefill_ms=(time.perf_counter() - t0) * 1e3)
    if on_token is not None and on_token(tok):
        out.stopped = True

    while not out.stopped and len(out.ids) < config.max_new_tokens and not (stops and tok == config.eos_token_id):
        t0 = time.perf_counter()
        logits = _checked_logits(decoder.forward(_embed(embed, np.array([tok], dtype=np.int64))), 1)
        tok = _pick_token(logits[0], config, rng)
        out.step_ms.append((time.perf_counter() - t0) * 1e3)
        out.ids.append(tok)
        if on_token is not None and on_token(tok):
            out.stopped = True
    out.finished_by_eos = stops and tok == config.eos_token_id
    return out


def _pick_token(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator | None) -> int:
    """Greedy argmax, or a sample after temperature → top-k → top-p (transformers' warper order and rules)."""
    if rng is None:
        return int(np.argmax(logits))
    scores = logits.astype(np.float32, copy=True)  # [V]
    vocab = scores.shape[0]
    if config.temperature != 1.0:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scores /= np.float32(config.temperature)
        top = scores.max()
        if not np.isfinite(top) or np.isnan(scores).any():
            # A temperature so small (about 1e-37 and below) that logits / T overflows float32: the distribution is
            # the limit T -> 0, all mass on the best token, i.e. greedy (transformers would sample from NaNs).
            return int(np.argmax(logits))
    if 0 < config.top_k < vocab:
        # TopKLogitsWarper: drop tokens scoring below the k-th largest (ties with it are kept).
        kth = np.partition(scores, vocab - config.top_k)[vocab - config.top_k]
        scores[scores < kth] = -np.inf
    if config.top_p < 1.0:
        # TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the best.
        order = np.argsort(scores, kind="stable")
        cum = np.cumsum(_softmax(scores[order]))
        remove = cum <= np.float32(1.0 - config.top_p)
        remove[-1] = False
        scores[order[remove]] = -np.inf
    probs = _softmax(scores).astype(np.float64)
    return int(rng.choice(vocab, p=probs / probs.sum()))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------------------------
# beam search (transformers 5.24 GenerationMixin._beam_search, batch of one prompt)


def _beam_search(
    decoder: KVDecoder, embed: EmbedFn, prompt_embeds: np.ndarray, config: GenerationConfig
) -> GenerationOutput:
    n = config.num_beams
    max_len = config.max_new_tokens  # prompt length counts as 0: generate() gets inputs_embeds, no input_ids
    stops = config.stops_at_eos
    k = 2 * n  # max(2, 1 + number of EOS ids) * num_beams with at most one EOS id
    lp = config.length_penalty
    early = config.early_stopping

    # Running beams. Only beam 0 is live at first, so the first step's candidates all extend it.
    run_seqs = np.zeros((n, max_len), dtype=np.int64)  # [n, max_len]
    run_scores = np.full(n, _NEG, dtype=np.float32)  # [n]
    run_scores[0] = 0.0
    # Finished hypotheses, best first; placeholders have score -1e9 and are not finished.
    fin_seqs = np.zeros((n, max_len), dtype=np.int64)
    fin_lens = np.zeros(n, dtype=np.int64)
    fin_scores = np.full(n, _NEG, dtype=np.float32)
    fin_done = np.zeros(n, dtype=bool)
    improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
    in_top_n = np.arange(k) < n

    # The prompt runs once with batch 1; the first reorder expands its cache row to n identical rows, which is
    # what transformers' n-row prefill holds.
    _reserve(decoder, n, prompt_embeds.shape[0] + max_len - 1)
    decoder.reset(1)
    t0 = time.perf_counter()
    logits = np.repeat(_checked_logits(decoder.forward(prompt_embeds[None]), 1), n, axis=0)  # [n, V]
    prefill_ms: float | None = None
    step_ms: list[float] = []
    next_rows: np.ndarray | None = None
    cur_len = 0
    while True:
        if next_rows is not None:  # not the prefill iteration
            t0 = time.perf_counter()
            decoder.reorder(next_rows if cur_len > 1 else np.zeros(n, dtype=np.int64))
            logits = _checked_logits(decoder.forward(_embed(embed, run_seqs[:, cur_len - 1])), n)
        vocab = logits.shape[1]

        # b. accumulated float32 log-probabilities of every (beam, token) continuation
        acc = (_log_softmax(logits) + run_scores[:, None]).reshape(-1)  # [n * V]

        # c. the top 2n continuations
        top = _topk(acc, k)  # [k], best first
        top_scores = acc[top]
        top_beams = top // vocab
        top_tokens = top % vocab
        top_seqs = run_seqs[top_beams]  # fancy indexing copies
        top_seqs[:, cur_len] = top_tokens

        # d. which continuations end here (EOS or max length)
        hits = np.full(k, cur_len + 1 >= max_len)
        if stops:
            hits |= top_tokens == config.eos_token_id

        # e. the best n unfinished continuations keep running
        run_cand = top_scores + hits.astype(np.float32) * _NEG
        keep = _topk(run_cand, n)
        run_seqs = top_seqs[keep]
        run_scores = run_cand[keep]
        next_rows = top_beams[keep].astype(np.int64)

        # f. finished continuations among the top n enter the hypotheses with length-normalised scores
        just_done = hits & in_top_n
        cand = top_scores / np.float32(float(cur_len + 1) ** lp)
        # The next two penalties never fire for a single prompt (the loop has already stopped in both cases);
        # they are kept so that this block reads line by line like transformers' _update_finished_beams.
        if early is True and fin_done.all():
            cand = cand + _NEG
        if not improvable:
            cand = cand + _NEG
        cand = cand + (~just_done).astype(np.float32) * _NEG
        merged_scores = np.concatenate([fin_scores, cand])
        sel = _topk(merged_scores, n)
        fin_seqs = np.concatenate([fin_seqs, top_seqs])[sel]
        fin_lens = np.concatenate([fin_lens, np.full(k, cur_len + 1, dtype=np.int64)])[sel]
        fin_scores = merged_scores[sel]
        fin_done = np.concatenate([fin_done, just_done])[sel]

        # g. stopping rule
        cur_len += 1
        hyp_len = max_len if (early == "never" and lp > 0.0) else cur_len
        best_running = run_scores[0] / np.float32(float(hyp_len) ** lp)
        worst_finished = np.where(fin_done, fin_scores.min(), _NEG)
        improvable = improvable and bool(np.any(best_running > worst_finished))
        still_open = not (fin_done.all() and early is True)
        can_continue = not hits.all()

        elapsed = (time.perf_counter() - t0) * 1e3
        if prefill_ms is None:
            prefill_ms = elapsed
        else:
            step_ms.append(elapsed)
        if not (improvable and still_open and can_continue):
            break

    ids = [int(t) for t in fin_seqs[0, : fin_lens[0]]]
    return GenerationOutput(
        ids=ids,
        prefill_ms=float(prefill_ms),
        step_ms=step_ms,
        finished_by_eos=bool(stops and ids and ids[-1] == config.eos_token_id),
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis, computed as torch does (x - max - log(sum(exp(x - max))))."""
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of 1-D `x`, largest first (ties: lower index first)."""
    if k < x.shape[0]:
        part = np.argpartition(-x, k - 1)[:k]
    else:
        part = np.arange(x.shape[0])
    return part[np.lexsort((part, -x[part]))][:k]


# ---------------------------------------------------------------------------------------------------------------
# checks on what the decoder and the embedding return


def _checked_logits(logits: np.ndarray, batch: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != batch or logits.shape[1] < 1:
        raise InferenceError(f"decoder.forward must return logits [B={batch}, V], got shape {logits.shape}")
    return logits.astype(np.float32, copy=False)


def _embed(embed: EmbedFn, ids: np.ndarray) -> np.ndarray:
    out = np.asarray(embed(ids))
    if out.ndim != 3 or out.shape[0] != ids.shape[0] or out.shape[1] != 1:
        raise InferenceError(f"embed must return [B={ids.shape[0]}, 1, D] for ids [B], got shape {out.shape}")
    return out
