"""The Qwen2 + SigLIP family's ONNX graphs against transformers' own modules (random weights stored under the
released checkpoint's tensor names): the Qwen2 decoder (in-place GQA graph, its weight-only quantization, the
TensorRT graph)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ppllava_edge.export.decoder_builder import DecoderDims, build_decoder  # noqa: E402
from ppllava_edge.runtime.decoder import InplaceKVDecoder  # noqa: E402

from .conftest import cosine  # noqa: E402

LLM = "language_model."
STEPS = 10


def _randomize(module, seed: int, std: float = 0.05) -> None:
    """Every parameter random (transformers zero-inits the q/k/v biases, which would hide a dropped bias); norm
    weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)


@pytest.fixture(scope="module")
def qwen2():
    """A tiny Qwen2ForCausalLM: GQA (4 heads, 2 kv heads), q/k/v biases, rope theta 1e6, untied head, and a padded
    vocabulary (embedding rows beyond the ids the prompt uses)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    _randomize(model, 0)
    return model


def _dims(model) -> DecoderDims:
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    return DecoderDims(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, hd,
                       c.intermediate_size, c.vocab_size, c.rms_norm_eps, False, False, False, qkv_bias=True)


def _rotary(model, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] from transformers' Qwen2RotaryEmbedding (its rope theta)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    rotary = Qwen2RotaryEmbedding(model.config)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1), torch.arange(positions)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _source(model):
    state = {LLM + k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return lambda name: state[name]


@pytest.fixture(scope="module")
def qwen2_decoder(qwen2, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "decoder.onnx"
    info = build_decoder(_source(qwen2), _dims(qwen2), *_rotary(qwen2, 2 * qwen2.config.max_position_embeddings), path)
    return path, info


def _greedy_torch(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' own loop: prefill, then one token at a time with its cache. (generated ids, prefill logits)"""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        first = out.logits[0, -1].numpy()
        cache, new = out.past_key_values, []
        for _ in range(steps):
            new.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    return new, first


def _greedy_ort(decoder: InplaceKVDecoder, table: np.ndarray, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    decoder.reserve(1, len(ids) + steps)
    decoder.reset(1)
    logits = decoder.forward(table[ids][None])
    first, new = logits[0].copy(), []
    for _ in range(steps):
        new.append(int(logits[0].argmax()))
        logits = decoder.forward(table[[new[-1]]][None])
    return new, first


def test_qwen2_decoder_equals_transformers_prefill_and_greedy(qwen2, qwen2_decoder):
    path, info = qwen2_decoder
    c = qwen2.config
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("Add") == 2  # one q|k|v bias Add per layer, nothing else
    biases = [n for n in graph.node if n.op_type == "Add"]
    assert all(n.output[0] == g.input[0] for n, g in zip(biases, (g for g in graph.node if g.op_type == "GroupQueryAttention")))
    assert info["weights"].map["layers.0.attn.qkv_proj.bias"] == (
        "concat_transpose", [f"{LLM}model.layers.0.self_attn.{k}_proj.bias" for k in "qkv"])
    assert info["weights"].map["lm_head.weight"] == ("transpose", [f"{LLM}lm_head.weight"])  # untied
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[-1] == c.vocab_size  # every row of the padded vocabulary
    hd = c.hidden_size // c.num_attention_heads
    table = qwen2.model.embed_tokens.weight.detach().numpy()
    prompt = [5, 17, 42, 99, 3, 250, 7, 11, 64]
    for chunk in (0, 4):  # one prefill run, and the CPU runtime's chunked prefill
        decoder = InplaceKVDecoder(session, c.num_hidden_layers, c.num_key_value_heads, hd, c.max_position_embeddings)
        decoder.prefill_chunk = chunk
        ids, first = _greedy_ort(decoder, table, prompt, STEPS)
        want, ref = _greedy_torch(qwen2, prompt, STEPS)
        assert np.abs(first - ref).max() <= 1e-4 * np.abs(ref).max() and cosine(first, ref) > 0.99999
        assert ids == want
        assert len(set(want)) > 2  # the random model does not collapse to one token (the comparison means something)
        # in-place contract: the cache buffer holds every position, written where it lies
        assert decoder.length == len(prompt) + STEPS and decoder.allocations == 1
