"""The Qwen2 + SigLIP family's ONNX graphs against transformers' own modules (random weights stored under the
released checkpoint's tensor names): the Qwen2 decoder (in-place GQA graph, its weight-only quantization, the
TensorRT graph) and the SigLIP vision tower in the fused vision graph (values, and keys through the MAP head's
value path)."""

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

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
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


def _dequantized_qwen2(model, qpath, bits: int, block: int):
    """A copy of `model` whose Linear weights are what the MatMulNBits graph multiplies by (its packed values and
    scales read back and dequantized in numpy); biases, norms and embeddings untouched."""
    import copy

    from ppllava_edge.calibration.weight_algorithms import Grid, dequantize, unpack
    from ppllava_edge.external_data import read_initializer

    graph = onnx.load(str(qpath), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    packed_parts = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn.o_proj": ("self_attn.o_proj",),
                    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)}
    for nd in (n for n in graph.node if n.op_type == "MatMulNBits"):
        k = next(a.i for a in nd.attribute if a.name == "K")
        q = unpack(np.asarray(read_initializer(inits[nd.input[1]], qpath.parent)), bits, k)
        scale = np.asarray(read_initializer(inits[nd.input[2]], qpath.parent), np.float32)
        w = dequantize(q, Grid(scale, np.full_like(scale, 1 << (bits - 1))), block).T  # [N, K], torch's layout
        name = inits[nd.input[1]].name.removesuffix(f"_Q{bits}")
        if name == "lm_head.weight":
            targets = ["lm_head"]
        else:
            layer, packed = name.split(".")[1], name.split(".", 2)[2].removesuffix(".weight")
            targets = [f"model.layers.{layer}.{p}" for p in packed_parts[packed]]
        rows = 0
        with torch.no_grad():
            for t in targets:
                p = params[t + ".weight"]
                p.copy_(torch.from_numpy(w[rows : rows + p.shape[0]]))
                rows += p.shape[0]
        assert rows == w.shape[0]
    return ref


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_qwen2_decoder_keeps_the_biases(qwen2, qwen2_decoder, tmp_path, bits):
    """quantize --llm int8-weight / int4-weight on the Qwen2 graph: every weight MatMul becomes MatMulNBits, the q|k|v
    bias Add stays after it with the float bias, and the graph computes transformers' Qwen2 with the dequantized
    weights (its own biases): prefill logits and greedy ids."""
    from ppllava_edge.calibration.convert import _quantize_nbits

    path, _ = qwen2_decoder
    block = 32
    dst = tmp_path / "decoder.onnx"
    info = _quantize_nbits(path, dst, bits, block, [], accuracy_level=0)
    c = qwen2.config
    assert info["nodes_quantized"] == 4 * c.num_hidden_layers + 1
    graph = onnx.load(str(dst), load_external_data=False).graph
    adds = [n for n in graph.node if n.op_type == "Add"]
    producers = {o: n for n in graph.node for o in n.output}
    assert len(adds) == c.num_hidden_layers and all(producers[a.input[0]].op_type == "MatMulNBits" for a in adds)
    assert {a.input[1] for a in adds} <= {t.name for t in graph.initializer}
    ref = _dequantized_qwen2(qwen2, dst, bits, block)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    decoder = InplaceKVDecoder(session, c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.max_position_embeddings)
    table = qwen2.model.embed_tokens.weight.detach().numpy()
    prompt = [8, 120, 33, 1, 77, 240]
    ids, first = _greedy_ort(decoder, table, prompt, STEPS)
    want, expected = _greedy_torch(ref, prompt, STEPS)
    assert np.abs(first - expected).max() <= 1e-4 * np.abs(expected).max()
    assert ids == want
    _, original = _greedy_torch(qwen2, prompt, 0)
    assert np.abs(expected - original).max() > 1e-3 * np.abs(original).max()  # the quantization is really there


@pytest.fixture(scope="module")
def qwen2_decoder_trt(qwen2, tmp_path_factory):
    from ppllava_edge.export.exporter import ExportOptions, export_concat_decoder

    path = tmp_path_factory.mktemp("qwen2_trt") / "decoder_trt.onnx"
    export_concat_decoder(qwen2, path, ExportOptions())
    return path


def _concat_decoder(path, model):
    """The concat-contract runtime decoder over `path`, at accuracy level 0 (ONNX Runtime fuses DequantizeLinear +
    MatMul into MatMulNBits itself, by default with int8 activations)."""
    from ppllava_edge.runtime.decoder import ConcatKVDecoder

    c = model.config
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ConcatKVDecoder(session, c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.max_position_embeddings)


def test_qwen2_decoder_trt_graph_equals_transformers(qwen2, qwen2_decoder_trt):
    """decoder_trt.onnx traced from Qwen2ForCausalLM: standard ONNX ops only (TensorRT's parser), the concat
    contract under ONNX Runtime gives transformers' prefill logits and greedy ids."""
    ops = {(n.domain or "ai.onnx") for n in onnx.load(str(qwen2_decoder_trt), load_external_data=False).graph.node}
    assert ops == {"ai.onnx"}
    table = qwen2.model.embed_tokens.weight.detach().numpy()
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ids, first = _greedy_ort(_concat_decoder(qwen2_decoder_trt, qwen2), table, prompt, STEPS)
    want, ref = _greedy_torch(qwen2, prompt, STEPS)
    assert np.abs(first - ref).max() <= 1e-4 * np.abs(ref).max() and ids == want


def test_int4_decoder_trt_equals_the_int4_decoder_for_qwen2(qwen2, qwen2_decoder, qwen2_decoder_trt, tmp_path):
    """quantize --llm int4-weight on a --tensorrt export: decoder_trt's DequantizeLinear weights hold the MatMulNBits
    quantizer's values, so the two int4 graphs (both with Qwen2's biases as float Adds) answer alike."""
    from ppllava_edge.calibration.convert import _quantize_nbits
    from ppllava_edge.calibration.weight_dq import quantize_dq

    c = qwen2.config
    info = quantize_dq(qwen2_decoder_trt, tmp_path / "decoder_trt.onnx", 4, 32, [])
    assert info["nodes_quantized"] == 7 * c.num_hidden_layers + 1  # q, k, v, o, gate, up, down per layer + lm_head
    _quantize_nbits(qwen2_decoder[0], tmp_path / "decoder.onnx", 4, 32, [], accuracy_level=0)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    inplace = InplaceKVDecoder(session, c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.max_position_embeddings)
    table = qwen2.model.embed_tokens.weight.detach().numpy()
    prompt = [8, 120, 33, 1, 77, 240]
    ids, first = _greedy_ort(_concat_decoder(tmp_path / "decoder_trt.onnx", qwen2), table, prompt, STEPS)
    want, ref = _greedy_ort(inplace, table, prompt, STEPS)
    assert np.abs(first - ref).max() <= 1e-4 * np.abs(ref).max() and ids == want


VISION = "vision_tower."
PROJ = "multi_modal_projector."


class _SiglipHeadValuePath(torch.nn.Module):
    """The authors' `SiglipPoolingHead_PatchCLS` as the projector uses it, written out directly: v = x W_v^T + b_v
    (the V third of the MAP head's in_proj), then v + MLP(LayerNorm(v)); the probe attention is unused."""

    def __init__(self, vcfg):
        from transformers.models.siglip.modeling_siglip import SiglipMLP

        super().__init__()
        e = vcfg.hidden_size
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * e, e))
        self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * e))
        self.layernorm = torch.nn.LayerNorm(e, eps=vcfg.layer_norm_eps)
        self.mlp = SiglipMLP(vcfg)

    def forward(self, x):
        e = x.shape[-1]
        v = torch.nn.functional.linear(x, self.in_proj_weight[2 * e :], self.in_proj_bias[2 * e :])
        return v + self.mlp(self.layernorm(v))


@pytest.fixture(scope="module")
def siglip():
    """transformers' SiglipVisionModel (tiny: 3x3 patches of 14 px, tanh-GELU) + the projector parts the vision graph
    reads, random, as a state dict under the released names."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vcfg = SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=42,
                              patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    tower = SiglipVisionModel(vcfg).eval()
    parts = torch.nn.ModuleDict({
        "linear_1": torch.nn.Linear(64, 48), "clip_visual_ln": torch.nn.LayerNorm(64, eps=1e-6), "clip_visual_head": _SiglipHeadValuePath(vcfg),
    }).eval()
    for i, m in enumerate((tower, parts)):
        _randomize(m, 10 + i, std=0.1)
    state = {VISION + "vision_model." + k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    state |= {PROJ + k.replace("clip_visual_head.in_proj", "clip_visual_head.attention.in_proj"): v for k, v in parts.state_dict().items()}
    return tower, parts, {k: v.detach().float().numpy() for k, v in state.items()}


def _siglip_dims(tower):
    from ppllava_edge.export.fusion import VisionDims

    c = tower.config
    return VisionDims(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.image_size, c.patch_size,
                      c.num_channels, c.hidden_act, c.layer_norm_eps, 0, 0, 48, c.hidden_size, 1e-6, tower="siglip")


def test_siglip_fused_vision_graph_equals_transformers(siglip, tmp_path):
    """vision.onnx for the SigLIP tower: values = GELU(linear_1(hidden_states[-1])) and keys = l2norm of the head's
    value path on clip_visual_ln(F), against transformers' SiglipVisionModel and the direct head, at 1, 2 and 5
    frames; every initializer traced to its checkpoint tensor (the V slice included)."""
    from ppllava_edge.export.fusion import build_vision
    from ppllava_edge.export.weights_check import check_weights

    tower, parts, state = siglip
    path = tmp_path / "vision.onnx"
    info = build_vision(lambda n: state[n], _siglip_dims(tower), path, external=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == 2 and ops.count("FastGelu") == 3 and "QuickGelu" not in ops and "Softmax" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for frames in (1, 2, 5):
        px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            feats = tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]  # [T, 9, 64], no post_layernorm
            values = torch.nn.functional.gelu(parts["linear_1"](feats))
            keys = parts["clip_visual_head"](parts["clip_visual_ln"](feats)).reshape(-1, 64)
            keys = keys / keys.norm(dim=-1, keepdim=True)
        got = sess.run(None, {"pixel_values": px.numpy()})
        for name, r, g in zip(("values", "keys"), (values.numpy(), keys.numpy()), got):
            assert g.shape == r.shape, (frames, name)
            assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), (frames, name)
    head = PROJ + "clip_visual_head.attention.in_proj_"
    assert info["weights"].map[head + "weight.v"] == ("value_slice", [head + "weight"])
    graphs = {"vision": {"file": "vision.onnx", "weights": info["weights"].to_json()}}
    assert check_weights(tmp_path, graphs, lambda n: state[n], np.float32).passed
    held = {s for _, srcs in info["weights"].map.values() for s in srcs}
    unused = {k for k in state if "post_layernorm" in k}
    assert held == set(state) - unused


CTX, KEEP = 196, 20


def _authors_extended_table(pe64: torch.Tensor) -> torch.Tensor:
    """`SiglipModelwithVideo.convert_text_position` (ppllava/models/siglip.py), line for line: 64 -> 196 rows."""
    length, dim = pe64.shape
    new = torch.zeros(4 * length - 3 * KEEP, dim)
    for i in range(KEEP):
        new[i] = pe64[i]
    for i in range(length - 1 - KEEP):
        for j in range(4):
            new[4 * i + j + KEEP] = (4 - j) * pe64[i + KEEP] / 4 + j * pe64[i + 1 + KEEP] / 4
    for j in range(4):
        new[4 * length - 3 * KEEP - 4 + j] = pe64[length - 1] + j * (pe64[length - 1] - pe64[length - 2]) / 4
    return new


class _AuthorsExtendTextEmbeddings(torch.nn.Module):
    """The authors' `ExtendTextEmbeddings` (ppllava/models/clip.py): positions < 20 from `position_embedding`, the
    rest from `position_embedding_res`, selected by two masks."""

    def __init__(self, token_embedding, pe, pe_res):
        super().__init__()
        self.token_embedding = token_embedding
        self.pe, self.pe_res = pe, pe_res
        self.mask1 = (torch.arange(len(pe)) < KEEP).float()[:, None]

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        x = self.token_embedding(input_ids)
        n = x.shape[1]
        return x + self.pe[:n] * self.mask1[:n] + self.pe_res[:n] * (1 - self.mask1[:n])


class _Pooled(torch.nn.Module):
    """transformers' SiglipTextModel as the pool graph's text_model: (ids, mask) -> pooler_output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).pooler_output


@pytest.fixture(scope="module")
def siglip_text():
    """(the authors' text tower: transformers' SiglipTextModel with their extended embeddings swapped in, the same
    tower with the two tables folded into one 196-row position embedding)."""
    from transformers import SiglipTextConfig, SiglipTextModel

    cfg = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=64,
               pad_token_id=1, eos_token_id=1, bos_token_id=None)
    authors = SiglipTextModel(SiglipTextConfig(max_position_embeddings=64, **cfg)).eval()
    _randomize(authors, 20, std=0.1)
    pe = _authors_extended_table(authors.embeddings.position_embedding.weight.detach())
    pe_res = pe + 0.1 * torch.randn(pe.shape, generator=torch.Generator().manual_seed(21))  # trained apart (SFT)
    authors.embeddings = _AuthorsExtendTextEmbeddings(authors.embeddings.token_embedding, pe, pe_res)
    folded = SiglipTextModel(SiglipTextConfig(max_position_embeddings=CTX, **cfg)).eval()
    state = {k: v for k, v in authors.state_dict().items() if not k.endswith(("pe", "pe_res"))}
    state["embeddings.position_embedding.weight"] = torch.cat((pe[:KEEP], pe_res[KEEP:]))
    missing = folded.load_state_dict(state, strict=False)
    assert not missing.missing_keys, missing
    return authors, folded


def _clip_inputs(words: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask as the authors' SiglipTokenizer call gives them (padding="max_length" to 196): the words, the
    EOS </s> (id 1), then pads (id 1, mask 0)."""
    ids = torch.ones(1, CTX, dtype=torch.int64)
    ids[0, :words] = torch.randint(3, 120, (words,), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, CTX, dtype=torch.int64)
    mask[0, : words + 1] = 1
    return ids, mask


def _authors_pool(text, ids, mask, keys, values, linear_2, scale, bias, grid, kernel, temp):
    """`LLaVASiglip3DMultiModalProjector.forward` after the tower, as a direct loop: g = softmax(cos * exp(scale) +
    bias) over every token, H = linear_2(values) (the authors apply it before pooling), then per window
    softmax(g / temp)-weighted sums of H in (t', row, col) order."""
    with torch.no_grad():
        q = text(input_ids=ids, attention_mask=mask).pooler_output
        q = q / q.norm(dim=-1, keepdim=True)
        g = torch.softmax((keys @ q[0]) * scale.exp() + bias, dim=0).reshape(values.shape[0], *grid)
        h = linear_2(values).reshape(values.shape[0], *grid, -1)
        kt, kh, kw = kernel
        out = []
        for t in range(values.shape[0] // kt):
            for r in range(grid[0] // kh):
                for c in range(grid[1] // kw):
                    win = (slice(t * kt, t * kt + kt), slice(r * kh, r * kh + kh), slice(c * kw, c * kw + kw))
                    a = torch.softmax(g[win].reshape(-1) / temp, dim=0)
                    out.append((a[:, None] * h[win].reshape(-1, h.shape[-1])).sum(0))
    return torch.stack(out), g


@pytest.mark.parametrize("kernel", [(2, 3, 3), (1, 3, 3)])
def test_siglip_pool_graph_equals_the_authors_projector(siglip_text, tmp_path, kernel):
    """prompt_pool (kernel (2,3,3)) and image_pool ((1,3,3)) of the SigLIP family, traced: ORT == the authors'
    projector maths (their extended embeddings in transformers' SiglipTextModel, logit_bias, a direct pooling loop)
    at frame / tile counts other than the traced one; the padding mask changes the answer (it is an input)."""
    from ppllava_edge.export.exporter import _onnx_export
    from ppllava_edge.export.graphs import SiglipPoolGraph
    from torch.export import Dim

    authors, folded = siglip_text
    gen = torch.Generator().manual_seed(5)
    grid, e, d, temp = (6, 6), 64, 48, 0.01
    linear_2 = torch.nn.Linear(d, d).eval()
    scale, bias = torch.tensor(2.3), torch.tensor(-4.0)
    graph = SiglipPoolGraph(_Pooled(folded), linear_2, torch.nn.Parameter(scale, requires_grad=False), grid, kernel, temp).eval()
    p = grid[0] * grid[1]

    def inputs(frames: int, words: int):
        keys = torch.nn.functional.normalize(torch.randn(frames * p, e, generator=gen), dim=-1)
        return (*_clip_inputs(words, frames), keys, torch.randn(frames, p, d, generator=gen))

    frames = Dim("frames", min=1, max=64)
    path = tmp_path / "pool.onnx"
    _onnx_export(graph, inputs(4, 9), path, ["clip_ids", "clip_mask", "keys", "values"], ["visual_tokens", "relevance"],
                 (None, None, {0: p * frames}, {0: frames}), 20, False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for count, words in ((2, 5), (6, 30), (5, 195)):  # 195 words: the EOS is the last position, no padding
        ids, mask, keys, values = inputs(count, words)
        tokens, g = sess.run(None, {"clip_ids": ids.numpy(), "clip_mask": mask.numpy(), "keys": keys.numpy(), "values": values.numpy()})
        ref_tokens, ref_g = _authors_pool(authors, ids, mask, keys, values, linear_2, scale, bias, grid, kernel, temp)
        assert tokens.shape == tuple(ref_tokens.shape) == (count // kernel[0] * 4, d)
        assert np.abs(g - ref_g.numpy()).max() <= 1e-5 * ref_g.max().item(), (count, words)
        assert np.abs(tokens - ref_tokens.numpy()).max() <= 1e-4 * ref_tokens.abs().max().item(), (count, words)
    ids, mask, keys, values = inputs(3, 12)
    g_mask = sess.run(None, {"clip_ids": ids.numpy(), "clip_mask": mask.numpy(), "keys": keys.numpy(), "values": values.numpy()})[1]
    g_ones = sess.run(None, {"clip_ids": ids.numpy(), "clip_mask": np.ones_like(mask.numpy()), "keys": keys.numpy(), "values": values.numpy()})[1]
    assert np.abs(g_mask - g_ones).max() > 1e-3 * g_mask.max()
    # the runtime's pool stage feeds the mask, and refuses to run this graph without one
    from ppllava_edge.errors import InferenceError
    from ppllava_edge.runtime.stages import pool

    _, g_stage = pool(sess, ids.numpy()[0], keys.numpy(), values.numpy(), mask.numpy()[0])
    assert np.array_equal(g_stage, g_mask)
    with pytest.raises(InferenceError, match="clip_mask"):
        pool(sess, ids.numpy(), keys.numpy(), values.numpy())


def test_siglip_fused_vision_graph_in_fp16(siglip, tmp_path):
    """fp16 exports write the SigLIP tower in fp16 (FastGelu, MultiHeadAttention and BiasGelu take it on the CPU
    provider): fp16 in and out, close to the fp32 graph."""
    from ppllava_edge.export.fusion import build_vision

    tower, _, state = siglip
    outs = {}
    px = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(3)).numpy()
    for dtype, np_dtype in (("fp32", np.float32), ("fp16", np.float16)):
        build_vision(lambda n: state[n], _siglip_dims(tower), tmp_path / f"{dtype}.onnx", dtype=dtype, external=False)
        sess = ort.InferenceSession(str(tmp_path / f"{dtype}.onnx"), providers=["CPUExecutionProvider"])
        outs[dtype] = sess.run(None, {"pixel_values": px.astype(np_dtype)})
    assert all(o.dtype == np.float16 for o in outs["fp16"])
    assert all(cosine(a.astype(np.float32), b) > 0.999 for a, b in zip(outs["fp16"], outs["fp32"]))


# ---- the family end to end: make-checkpoint qwen-tiny -> export -> ask / quantize / bench / serve -------------------
QUESTIONS = ("What is happening in this video?", "Describe the colours, please!")


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    from ppllava_edge.model.make import make_checkpoint

    return make_checkpoint("qwen-tiny", tmp_path_factory.mktemp("qwen") / "Q")


@pytest.fixture(scope="module")
def qwen_export(qwen_ckpt, tmp_path_factory):
    from ppllava_edge.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("qwen_e") / "E"
    export_checkpoint(qwen_ckpt, out, ExportOptions(frames=(2, 4, 8), tensorrt=True))
    return out


def test_qwen_tiny_export_writes_and_validates_every_graph(qwen_export):
    """`export` on a Qwen2 + SigLIP checkpoint: every graph validated against the PyTorch model (the SigLIP pools
    against the projector's own pool), every initializer traced to the checkpoint, the SigLIP contract recorded."""
    from ppllava_edge.manifest import load_manifest

    m = load_manifest(qwen_export)
    v = m.data["validation"]
    assert v["passed"] and v["mode"] == "full" and m.data["weights_check"]["passed"]
    checked = {c["graph"] for c in v["checks"]}
    assert checked == {"vision", "vision_trt", "prompt_pool", "image_pool", "projector_head", "decoder", "decoder_trt"}
    for g in ("prompt_pool", "image_pool"):
        assert [i["name"] for i in m.graph(g)["inputs"]] == ["clip_ids", "clip_mask", "keys", "values"]
        assert m.graph(g)["contract"] == "clip-ids-mask-v1"
    assert m.data["tokenizers"] == {"llama": "llama_tokenizer.json", "siglip": "siglip_spiece.model"}
    assert m.model["clip_text_length"] == 196 and m.data["family"] == "qwen-siglip"
    assert m.preprocess.name == "siglip" and m.image_rules["mean"] == [0.5, 0.5, 0.5]  # what ask's frames and tiles take
    vision = onnx.load(str(m.path("vision")), load_external_data=False).graph
    assert any(n.op_type == "FastGelu" for n in vision.node) and not any(n.op_type == "QuickGelu" for n in vision.node)
    assert m.graph("vision")["weights"]["map"]["multi_modal_projector.clip_visual_head.attention.in_proj_weight.v"][0] == "value_slice"


def test_ask_gives_generates_ids_on_a_qwen_export(qwen_ckpt, qwen_export, sample_video, tmp_path):
    """`ask E clip.mp4 "…"` == `generate Q clip.mp4 "…"`: the same SigLIP ids and mask, visual tokens and output ids,
    for a video and an image; and the CLI prints the answer."""
    from PIL import Image
    from click.testing import CliRunner

    from ppllava_edge.cli.main import cli
    from ppllava_edge.media import make_test_photo
    from ppllava_edge.model.generate import ReferenceModel
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline

    pipe, ref = Pipeline.from_export(qwen_export, provider="cpu"), ReferenceModel(qwen_ckpt)
    photo = tmp_path / "photo.png"
    Image.fromarray(make_test_photo(200, 150)).save(photo)
    for path, question in ((sample_video, QUESTIONS[0]), (sample_video, QUESTIONS[1]), (photo, "What is in the picture?")):
        a = pipe.ask(path, question, num_frames=4, generation=GenerationConfig(max_new_tokens=10), keep_arrays=True)
        r = ref.answer(path, question, num_frames=4, max_new_tokens=10)
        assert list(a.ids) == list(r.output_ids) and len(set(a.ids)) > 1, (path.name, question)
        assert np.array_equal(a.arrays["clip_ids"], r.arrays["clip_ids"]) and np.array_equal(a.arrays["clip_mask"], r.arrays["clip_mask"])
        np.testing.assert_array_equal(a.arrays["pixel_values"], r.arrays["pixel_values"])  # the SigLIP spec on both sides
        assert 0 < a.arrays["clip_mask"].sum() < 196  # a padded question: the mask is what the pool used
        np.testing.assert_allclose(a.arrays["visual_tokens"], r.arrays["visual_tokens"], atol=1e-4 * np.abs(r.arrays["visual_tokens"]).max())
    res = CliRunner().invoke(cli, ["ask", str(qwen_export), str(sample_video), QUESTIONS[0], "--frames", "4", "--max-new-tokens", "10", "--json"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.stdout)["ids"] == list(ref.answer(sample_video, QUESTIONS[0], num_frames=4, max_new_tokens=10).output_ids)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three test photos of different sizes (landscape, portrait, square)."""
    from PIL import Image

    from ppllava_edge.media import make_test_photo

    folder = tmp_path_factory.mktemp("qwen_photos")
    out = []
    for i, (w, h) in enumerate([(200, 120), (90, 150), (100, 100)]):
        out.append(folder / f"photo{i}.png")
        Image.fromarray(make_test_photo(w, h, seed=10 + i)).save(out[-1])
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_ask_gives_generates_ids_on_several_images_on_a_qwen_export(qwen_ckpt, qwen_export, photos, n):
    """Several images in one question on the Qwen2 + SigLIP family: the authors' multi-image path has no BT-Adapter
    here, so each image is an independent frame through the SigLIP tower; one relevance softmax over all of them,
    kernel (1,3,3), one `<image>\\n` slot per image in `plain_qwen`. `ask` == `generate`: ids exact, the same pixels
    (each image through the SigLIP spec's frame preprocessing, as the authors' LlavaOnevisionVidProcessor), SigLIP ids
    and mask and prompt ids, visual tokens and relevance <= 1e-4 (relative)."""
    from tokenizers import Tokenizer

    from ppllava_edge.media import CLIP, SIGLIP, preprocess_frames, read_image
    from ppllava_edge.model.generate import ReferenceModel
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline

    pipe, ref = Pipeline.from_export(qwen_export, provider="cpu"), ReferenceModel(qwen_ckpt)
    question = "Which picture is brighter?"
    a = pipe.ask(photos[:n], question, generation=GenerationConfig(max_new_tokens=10), keep_arrays=True)
    r = ref.answer(photos[:n], question, max_new_tokens=10)
    assert list(a.ids) == list(r.output_ids) and len(set(a.ids)) > 1
    for name in ("pixel_values", "clip_ids", "clip_mask", "input_ids"):
        np.testing.assert_array_equal(a.arrays[name], r.arrays[name], err_msg=name)
    size = pipe.manifest.model["image_size"]
    upright = [np.asarray(read_image(p)[0])[None] for p in photos[:n]]  # the authors' rawframe reader: one frame each
    siglip_frames = np.concatenate([preprocess_frames(img, size, SIGLIP) for img in upright])
    np.testing.assert_array_equal(a.arrays["pixel_values"], siglip_frames)  # LlavaOnevisionVidProcessor's frames
    assert np.abs(siglip_frames - np.concatenate([preprocess_frames(img, size, CLIP) for img in upright])).max() > 0.1  # not CLIP's
    prompt = Tokenizer.from_file(str(qwen_export / "llama_tokenizer.json")).decode(a.arrays["input_ids"].tolist(), skip_special_tokens=False)
    assert prompt == "<|im_start|>user\n" + "<image>\n" * n + question + "<|im_end|>\n<|im_start|>assistant\n"
    g = pipe.image_spec["pooled_grid"]
    assert a.visual_tokens == n * g * g and a.context_len == len(a.arrays["input_ids"]) - n + n * g * g
    for name in ("visual_tokens", "relevance"):
        want = r.arrays[name]
        assert a.arrays[name].shape == want.shape and np.abs(a.arrays[name] - want).max() <= 1e-4 * np.abs(want).max(), name
    assert r.arrays["relevance"].shape == (n, 6, 6) and abs(float(r.arrays["relevance"].sum()) - 1) < 1e-5  # one softmax
    with torch.no_grad():  # no temporal mixing in SigLIP: the clip's features are each image's own
        one_by_one = ref.model.encode_tiles(torch.from_numpy(r.arrays["pixel_values"])).numpy()
    np.testing.assert_allclose(r.arrays["features"], one_by_one, atol=1e-5)


def test_calibrate_quantize_and_gate_a_qwen_export(qwen_export, tmp_path):
    """calibrate stores SigLIP's clip_mask beside clip_ids and feeds it; `quantize` with the defaults (int8 vision
    and pools, int8-weight decoder / decoder_trt, q|k|v bias kept) passes the accuracy gate; the result answers."""
    import json

    from ppllava_edge.calibration.collect import collect_calibration
    from ppllava_edge.calibration.quantize import quantize_export
    from ppllava_edge.calibration.readers import load_calibration
    from ppllava_edge.media import write_test_video
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline

    videos = tmp_path / "videos"
    videos.mkdir()
    for i, (n, size) in enumerate([(24, (96, 64)), (30, (64, 64)), (20, (80, 64))]):
        write_test_video(videos / f"clip{i}.mp4", num_frames=n, size=size)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS) + "\n")
    collect_calibration(qwen_export, videos, questions, tmp_path / "calib", frames=[2, 4], samples=6, decode_steps=2)
    calib = load_calibration(tmp_path / "calib")
    feed = calib.feed("prompt_pool", calib.records("prompt_pool", "all")[0])
    assert set(feed) == {"clip_ids", "clip_mask", "keys", "values"} and 0 < feed["clip_mask"].sum() < 196
    res = quantize_export(qwen_export, tmp_path / "calib", tmp_path / "Q8", prefill_positions=3, greedy_tokens=4, quality_tokens=4)
    assert res.report.passed
    m = json.loads((tmp_path / "Q8" / "export.json").read_text())
    assert m["graphs"]["decoder"]["precision"] == "int8-weight" and m["graphs"]["prompt_pool"]["precision"] == "int8"
    decoder = onnx.load(str(tmp_path / "Q8" / m["graphs"]["decoder"]["file"]), load_external_data=False).graph
    producers = {o: n for n in decoder.node for o in n.output}
    biases = [n for n in decoder.node if n.op_type == "Add" and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "MatMulNBits"]
    assert len(biases) == m["model"]["num_layers"]  # each layer's q|k|v bias, after its quantized MatMul
    a = Pipeline.from_export(tmp_path / "Q8", provider="cpu").ask(videos / "clip0.mp4", QUESTIONS[0], num_frames=4, generation=GenerationConfig(max_new_tokens=4))
    assert len(a.ids) == 4


def test_bench_and_serve_a_qwen_export(qwen_export, sample_video, photos, tmp_path):
    """The bench times the ORT export and the PyTorch reference (SigLIP mask included) on a Qwen export; the server
    answers a chat completion with `ask`'s text, for a video and for two images in one message."""
    import json

    import shutil

    import openai
    from click.testing import CliRunner

    from ppllava_edge.cli.main import cli
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline

    from .serving import running_server

    report = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(qwen_export), "--video", str(sample_video), "--frames", "4", "--iterations", "1", "--warmup", "0",
                                   "--max-new-tokens", "4", "--questions", "1", "--backend", "ort,torch", "--no-hardware", "--json", str(report)])
    assert res.exit_code == 0, res.output
    runs = json.loads(report.read_text())
    pipe = Pipeline.from_export(qwen_export, provider="cpu")
    want = pipe.ask(sample_video, QUESTIONS[0], num_frames=4, generation=GenerationConfig(max_new_tokens=6))
    want_images = pipe.ask(photos[:2], QUESTIONS[1], generation=GenerationConfig(max_new_tokens=6))
    media = tmp_path / "media"
    media.mkdir()
    shutil.copyfile(sample_video, media / "clip.mp4")  # (a symlink out of the folder is refused)
    for p in photos[:2]:
        shutil.copyfile(p, media / p.name)
    with running_server(qwen_export, "--media-dir", str(media), "--frames", "4") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": QUESTIONS[0]}]}]
        r = c.chat.completions.create(model=qwen_export.name, messages=msg, max_tokens=6, temperature=0)
        parts = [{"type": "image_url", "image_url": {"url": p.name}} for p in photos[:2]]
        msg = [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTIONS[1]}]}]
        ri = c.chat.completions.create(model=qwen_export.name, messages=msg, max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == want.text
    assert (ri.choices[0].model_extra["token_ids"], ri.choices[0].message.content) == (want_images.ids, want_images.text)
    assert ri.usage.prompt_tokens == want_images.context_len
    assert sorted(v["backend"] for v in runs["variants"]) == ["ort", "torch"]
    assert all(v["visual_tokens"] == 8 and v["new_tokens"] == 4 for v in runs["variants"])  # 4 frames: 2 pairs x (6/3)^2


def test_triton_bls_stages_on_a_qwen_export(qwen_export, sample_video, tmp_path):
    """Triton's GPU layout (vision and the pools as their own models, called by BLS; here on CPU stand-ins for the
    onnxruntime backend): the pools' config takes clip_mask [1,196] INT64, and the streamed answer is `ask`'s."""
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline
    from ppllava_edge.triton.client import ask_triton
    from ppllava_edge.triton.repository import RepositoryOptions, write_repository
    from ppllava_edge.triton.server import TritonServer

    from .test_triton import dtype_name, free_ports, http_get, metric, metrics_when, need_triton, parse_config, use_cpu_standins

    need_triton()
    repo = write_repository(qwen_export, tmp_path / "repo", RepositoryOptions(kind="gpu", max_tokens=6))
    for pool in ("prompt_pool", "image_pool"):
        cfg = parse_config(repo / pool / "config.pbtxt")
        assert [(i.name, dtype_name(i.data_type), list(i.dims)) for i in cfg.input][:2] == [
            ("clip_ids", "TYPE_INT64", [1, 196]), ("clip_mask", "TYPE_INT64", [1, 196])]
    use_cpu_standins(repo)
    want = Pipeline.from_export(qwen_export, provider="cpu").ask(sample_video, QUESTIONS[1], num_frames=8, generation=GenerationConfig(max_new_tokens=6))
    ports = free_ports()
    with open(tmp_path / "server.log", "w") as log, TritonServer(repo, *ports, log=log) as server:
        a = ask_triton(server.grpc_url, sample_video, QUESTIONS[1], frames=8, timeout=180)
        text = metrics_when(lambda: http_get(server.metrics_url)[1], lambda t: metric(t, "nv_inference_request_success", model="prompt_pool") >= 1)
    assert (list(a.ids), a.text) == (list(want.ids), want.text)
    assert metric(text, "nv_inference_request_success", model="prompt_pool") == 1
