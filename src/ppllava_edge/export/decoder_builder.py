"""The LLaMA / Qwen2 decoder written directly as an ONNX graph for ONNX Runtime, with an in-place KV cache.

One graph serves prefill and decode. Per layer:

    SimplifiedLayerNorm -> MatMul (packed q|k|v) [-> Add (packed q|k|v bias, Qwen2)] -> GroupQueryAttention (RoPE fused, past/present share one buffer)
    -> MatMul (o) -> SkipSimplifiedLayerNorm (residual) -> MatMul (packed gate|up) -> Split -> SiLU * up -> MatMul (down)
    -> SkipSimplifiedLayerNorm (residual + next layer's input norm, or the final norm)

then the last position only: Gather -> MatMul (lm_head) -> logits [B, V].

Qwen2 is the same graph with a q|k|v bias (`qkv_bias`: an Add after the packed MatMul; GroupQueryAttention takes no
bias input, and keeping it a separate Add leaves the MatMul a plain weight MatMul for the weight-only quantizers,
which rewrite MatMul nodes only), its own rope theta (in the cos/sin tables the caller passes), GQA and an untied
head over the padded vocabulary (V = the embedding rows, more than the tokenizer's ids: the logits keep every row,
as transformers' do).

Contract (the runtime's `InplaceKVDecoder` binds it):

    inputs_embeds [batch, seq, D]                     the new positions
    seqlens_k int32 [batch]                           total length - 1 (cached + new positions, minus one)
    total_sequence_length int32 []                    total length
    past.{i}.key / past.{i}.value [batch, kv, capacity, head_dim]
    -> logits [batch, V]
       present.{i}.key / present.{i}.value [batch, kv, capacity, head_dim]

When `past.*` and `present.*` are bound to the same buffer (capacity >= total length), GroupQueryAttention writes
only the new positions' keys/values and reads the rest where they lie: nothing is copied per step. With plain
`run()` and a past of exactly the cached length, present is a new [batch, kv, total, head_dim] array (the layout
the calibration and validation feeds use).

Weights are read one tensor at a time from a `WeightSource` and appended to the external-data file as they are
converted, so the builder never holds more than one layer's tensors (this is what lets a 7B decoder be written on
a machine with far less memory than its fp32 weights). Written with the `onnx` helper API only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import LlamaTextConfig
from ..external_data import ExternalData
from ..runtime.decoder import kv_names
from .weights_check import WeightMap

PREFIX = "language_model."
CONTRACT = "gqa-inplace-v1"


class WeightSource(Protocol):
    def __call__(self, name: str) -> np.ndarray:
        """The checkpoint tensor `name` (e.g. 'language_model.lm_head.weight') as a numpy array."""
        ...


@dataclass(frozen=True)
class DecoderDims:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tied: bool
    attention_bias: bool  # LLaMA's: q, k, v and o biases (not supported)
    mlp_bias: bool
    qkv_bias: bool = False  # Qwen2's: q, k and v biases, none on o_proj

    @classmethod
    def from_config(cls, t: LlamaTextConfig) -> DecoderDims:
        """Qwen2's q/k/v biases without `attention_bias` (LLaMA's, which biases o_proj too: refused by the builder)."""
        return cls(
            t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size,
            t.vocab_size, t.rms_norm_eps, t.tie_word_embeddings, t.attention_bias, t.mlp_bias, t.qkv_bias and not t.attention_bias,
        )


def past_names(num_layers: int) -> list[str]:
    return kv_names(num_layers)[0]


def present_names(num_layers: int) -> list[str]:
    return kv_names(num_layers)[1]


def build_decoder(
    source: WeightSource,
    dims: DecoderDims,
    cos: np.ndarray,
    sin: np.ndarray,
    path: Path,
    dtype: str = "fp32",
    opset: int = 20,
    on_layer: Callable[[int, int], None] | None = None,
) -> dict:
    """Write `path` (+ `path.data`): the in-place KV-cache decoder. Returns {'bytes', 'initializers', 'weights'}
    ('weights': the WeightMap tracing every initializer to its checkpoint tensors, see export/weights_check.py).

    Args:
        source: checkpoint tensors by name (transposed and cast here, one at a time).
        dims: the LLM's dimensions.
        cos, sin: rotary tables [max_positions, head_dim / 2] (as transformers computes them, float32).
        dtype: 'fp32' or 'fp16' for weights, activations and the KV cache.
        on_layer: progress callback (layers done, total).
    """
    import onnx
    from onnx import TensorProto, helper

    np_dtype = np.float16 if dtype == "fp16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    d, L, H, KV, HD, I = dims.hidden_size, dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.intermediate_size
    if dims.attention_bias or dims.mlp_bias:
        raise NotImplementedError("decoder builder: attention_bias / mlp_bias LLaMA variants are not supported")
    path = Path(path)
    data = ExternalData(path.with_name(path.name + ".data"))
    nodes: list = []
    inits: list = []

    wmap = WeightMap()

    def weight(name: str, array: np.ndarray, transform: str | None = None, sources: list[str] | None = None) -> str:
        inits.append(data.add(name, np.asarray(array).astype(np_dtype, copy=False)))
        if transform is None:
            wmap.derived.append(name)
        else:
            wmap.map[name] = (transform, sources)
            wmap.expected.extend(sources)
        return name

    def norm_weight(name: str, src: str) -> str:
        return weight(name, source(PREFIX + src), "identity", [PREFIX + src])

    def linear(name: str, *srcs: str) -> str:
        """[in, out] MatMul weight: the torch Linear weights [out, in] concatenated along out, transposed."""
        parts = [np.asarray(source(PREFIX + n), dtype=np.float32) for n in srcs]
        array = np.concatenate(parts, axis=0).T if len(parts) > 1 else parts[0].T
        return weight(name, array, "concat_transpose" if len(parts) > 1 else "transpose", [PREFIX + n for n in srcs])

    def packed_bias(name: str, *srcs: str) -> str:
        """The q|k|v biases concatenated (the weight map's concat_transpose on 1-D tensors: the concatenation)."""
        array = np.concatenate([np.asarray(source(PREFIX + n), dtype=np.float32) for n in srcs])
        return weight(name, array, "concat_transpose", [PREFIX + n for n in srcs])

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    eps = float(dims.rms_norm_eps)
    cos_name = weight("rotary.cos_cache", cos)
    sin_name = weight("rotary.sin_cache", sin)
    split_name = "mlp.split_sizes"
    inits.append(helper.make_tensor(split_name, TensorProto.INT64, [2], [I, I]))
    inits.append(helper.make_tensor("last_position", TensorProto.INT64, [], [-1]))
    wmap.derived += [split_name, "last_position"]

    pasts, presents = past_names(L), present_names(L)
    x = "inputs_embeds"
    resid = x
    norm = f"/layers.0/input_layernorm/out"
    node("SimplifiedLayerNormalization", [x, norm_weight("layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight")],
         [norm], "/layers.0/input_layernorm", axis=-1, epsilon=eps, stash_type=1)
    for i in range(L):
        p = f"model.layers.{i}."
        n = f"/layers.{i}"
        qkv = linear(f"layers.{i}.attn.qkv_proj.weight", *(p + f"self_attn.{k}_proj.weight" for k in "qkv"))
        packed = f"{n}/attn/qkv"
        node("MatMul", [norm, qkv], [packed], f"{n}/attn/qkv_proj")
        if dims.qkv_bias:
            bias = packed_bias(f"layers.{i}.attn.qkv_proj.bias", *(p + f"self_attn.{k}_proj.bias" for k in "qkv"))
            node("Add", [packed, bias], [f"{n}/attn/qkv_biased"], f"{n}/attn/qkv_bias")
            packed = f"{n}/attn/qkv_biased"
        node(
            "GroupQueryAttention",
            [packed, "", "", pasts[2 * i], pasts[2 * i + 1], "seqlens_k", "total_sequence_length", cos_name, sin_name],
            [f"{n}/attn/out", presents[2 * i], presents[2 * i + 1]],
            f"{n}/attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=H, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0, scale=float(HD) ** -0.5,
        )
        o = linear(f"layers.{i}.attn.o_proj.weight", p + "self_attn.o_proj.weight")
        node("MatMul", [f"{n}/attn/out", o], [f"{n}/attn/o"], f"{n}/attn/o_proj")
        post = norm_weight(f"layers.{i}.post_attention_layernorm.weight", p + "post_attention_layernorm.weight")
        node("SkipSimplifiedLayerNormalization", [f"{n}/attn/o", resid, post], [f"{n}/post_norm/out", "", "", f"{n}/post_norm/resid"],
             f"{n}/post_attention_layernorm", domain="com.microsoft", epsilon=eps)
        resid = f"{n}/post_norm/resid"
        gate_up = linear(f"layers.{i}.mlp.gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        node("MatMul", [f"{n}/post_norm/out", gate_up], [f"{n}/mlp/gate_up"], f"{n}/mlp/gate_up_proj")
        node("Split", [f"{n}/mlp/gate_up", split_name], [f"{n}/mlp/gate", f"{n}/mlp/up"], f"{n}/mlp/split", axis=-1)
        node("QuickGelu", [f"{n}/mlp/gate"], [f"{n}/mlp/act"], f"{n}/mlp/silu", domain="com.microsoft", alpha=1.0)  # x*sigmoid(x)
        node("Mul", [f"{n}/mlp/act", f"{n}/mlp/up"], [f"{n}/mlp/prod"], f"{n}/mlp/mul")
        down = linear(f"layers.{i}.mlp.down_proj.weight", p + "mlp.down_proj.weight")
        node("MatMul", [f"{n}/mlp/prod", down], [f"{n}/mlp/out"], f"{n}/mlp/down_proj")
        last = i == L - 1
        nxt_w = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        nxt_name = "norm.weight" if last else f"layers.{i + 1}.input_layernorm.weight"
        norm = "/norm/out" if last else f"/layers.{i + 1}/input_layernorm/out"
        outs = [norm] if last else [norm, "", "", f"/layers.{i + 1}/resid"]
        node("SkipSimplifiedLayerNormalization", [f"{n}/mlp/out", resid, norm_weight(nxt_name, nxt_w)], outs,
             "/norm" if last else f"/layers.{i + 1}/input_layernorm", domain="com.microsoft", epsilon=eps)
        resid = f"/layers.{i + 1}/resid"
        if on_layer is not None:
            on_layer(i + 1, L)
    node("Gather", [norm, "last_position"], ["/lm_head/last"], "/lm_head/last_position", axis=1)  # [B, D]
    head_src = "model.embed_tokens.weight" if dims.tied else "lm_head.weight"
    node("MatMul", ["/lm_head/last", linear("lm_head.weight", head_src)], ["logits"], "/lm_head/MatMul")
    data.close()

    kv_dims = ["batch", KV, "capacity", HD]
    graph = helper.make_graph(
        nodes,
        "ppllava_decoder",
        [
            helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", d]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            *[helper.make_tensor_value_info(nm, elem, kv_dims) for nm in pasts],
        ],
        [
            helper.make_tensor_value_info("logits", elem, ["batch", dims.vocab_size]),
            *[helper.make_tensor_value_info(nm, elem, ["batch", KV, "present_len", HD]) for nm in presents],
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="ppllava-edge")
    model.ir_version = 10
    onnx.save_model(model, str(path))
    return {"bytes": data.bytes_written, "initializers": len(inits), "weights": wmap}
