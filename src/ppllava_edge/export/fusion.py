"""The vision graph written directly as a fused ONNX graph for ONNX Runtime (CPU and CUDA).

Same inputs, outputs and maths as the traced `VisionGraph` (pixel_values [T,3,H,W] -> values [T,P,D_llm],
keys [T*P,E]), built from the checkpoint's tensors with ONNX Runtime's fused operators:

    Conv (patch embedding) -> Transpose -> Concat(CLS) + positions -> LayerNorm (pre_layrnorm)
    per CLIP layer (the last one is dead compute and skipped):
        LayerNorm -> MatMul (packed q|k|v) -> Split -> MultiHeadAttention (com.microsoft; q/k/v biases fused)
        -> MatMul + bias (out_proj) -> residual Add -> LayerNorm -> MatMul + bias -> QuickGelu -> MatMul + bias
        -> residual Add
    per BT-Adapter step that runs (the last pair is dead compute and skipped), on the adapter state kept as
    CLS [1,1,D] + patches [T,P,D] (frame-major, so the spatial layer needs no transpose):
        temporal: LayerNorm -> Transpose [P,T,D] -> packed q|k|v -> MultiHeadAttention over T per patch
                  -> Transpose [T,P,D] -> out_proj -> temporal_fc -> residual
        spatial:  Concat(CLS per frame, patches) -> the attention block above -> CLS mean over frames
                  -> residuals -> LayerNorm -> MLP -> residual (CLS and patches)
    F = (main patches + adapter patches) / 2
    values = BiasGelu(F @ linear_1)     keys = l2norm(LayerNorm_clip(F) @ clip_visual_projection)

The SigLIP tower (the Qwen2 family, `VisionDims.tower == "siglip"`):

    Conv + bias (patch embedding) -> Transpose -> + positions (no CLS, no pre-layernorm)
    per SigLIP layer (every layer: the features are hidden_states[-1], strategy "full"): the CLIP layer above with
        FastGelu (com.microsoft, fc1's bias fused; SigLIP's gelu_pytorch_tanh) instead of QuickGelu
    F = the last layer's output (no post_layernorm)
    values = BiasGelu(F @ linear_1)
    keys = l2norm(v + MLP(LayerNorm_head(v))) with v = LayerNorm_clip(F) @ W_v + b_v: the value path of SigLIP's
           MAP head (`SiglipPoolingHead_PatchCLS`: the V slice of `clip_visual_head.attention.in_proj_*`, its
           layernorm and MLP with a residual; no probe attention, no out_proj)

MultiHeadAttention's CPU kernel runs fp32 self-attention without a mask as MLAS flash attention: the
[heads, S, S] score matrix of a frame is never materialised (577 x 577 per head and frame at 336 px), and the
head split/merge transposes of the traced graph disappear into the kernel.

Why these operators (measured, see README "Vision graph: fused attention"): SkipLayerNormalization is slower than
Add + LayerNormalization on ONNX Runtime 1.32's CPU kernel (3-30x on [8*577, 1024..128]), so residuals stay
Add + LayerNormalization; com.microsoft Attention (projection inside the op) materialises the score matrix.

Weights are read one tensor at a time from a `WeightSource` (checkpoint names) and appended to `<path>.data` as
they are converted, so the builder holds one tensor (or one packed q|k|v) at a time. Every initializer is
recorded in a `WeightMap` (export/weights_check.py): `identity`, `transpose` (Linear weights as MatMul operands)
and `concat_transpose` (packed q|k|v weights [D, 3D]; the packed q|k|v bias [3D] is the same transform on 1-D
tensors: the concatenation).

The exporter writes this graph as `vision.onnx` with external data (`vision.onnx.data`), reading the checkpoint's
shards one tensor at a time, so a 7B export's vision step holds one tensor, never the tower; fp16 exports get it in
fp16 (weights, activations, I/O; ONNX Runtime's CPU MultiHeadAttention takes fp16). TensorRT's ONNX parser does not
take com.microsoft operators: exports made with `--tensorrt` also trace the standard-ops graph as `vision_trt.onnx`
(export.json `backends.trt.vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import QWEN_SIGLIP
from ..external_data import ExternalData
from .decoder_builder import WeightSource
from .weights_check import WeightMap, apply_transform

TOWER = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
ADAPTER_LN_EPS = 1e-5  # the BT-Adapter layers use nn.LayerNorm defaults (clip.py)


@dataclass(frozen=True)
class VisionDims:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str  # quick_gelu | gelu
    layer_norm_eps: float
    btadapter_depth: int
    max_t: int
    values_size: int  # linear_1 output (the LLM width)
    keys_size: int  # clip_visual_projection output (SigLIP: the head's width, hidden_size)
    clip_ln_eps: float  # clip_visual_ln
    tower: str = "clip"  # clip (CLS, pre-layernorm, BT-Adapter, features of layer -2) | siglip (see the module doc)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_config(cls, cfg) -> VisionDims:
        """From a PPLLaVAConfig: the CLIP tower (keys through clip_visual_projection) or, for the Qwen2 + SigLIP
        family, the SigLIP tower (keys of the tower's width through the MAP head's value path, its LayerNorm eps)."""
        v, ct = cfg.vision, cfg.clip_text
        if cfg.projector_hidden_act != "gelu":
            raise NotImplementedError(f"vision builder: projector_hidden_act {cfg.projector_hidden_act!r}")
        siglip = cfg.family == QWEN_SIGLIP
        return cls(
            v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size,
            v.num_channels, v.hidden_act, v.layer_norm_eps, v.btadapter_depth, v.max_t, cfg.text.hidden_size,
            v.hidden_size if siglip else ct.projection_dim, v.layer_norm_eps if siglip else ct.layer_norm_eps,
            "siglip" if siglip else "clip",
        )


class _Inline:
    """Initializers kept in the proto (graphs under protobuf's 2 GB limit; what ORT's quantization tools read)."""

    bytes_written = 0

    def add(self, name: str, array: np.ndarray):
        from onnx import numpy_helper

        self.bytes_written += array.nbytes
        return numpy_helper.from_array(np.asarray(array), name)

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Writer:
    """Nodes, initializers and the weight map of one graph being written."""

    def __init__(self, data: ExternalData | _Inline, source: WeightSource, np_dtype):
        self.data, self.source, self.np_dtype = data, source, np_dtype
        self.nodes: list = []
        self.inits: list = []
        self.wmap = WeightMap()
        self._done: dict[str, str] = {}

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        from onnx import helper

        outs = [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, values, dtype=np.int64) -> str:
        """A small derived constant (shapes, axes, scalars)."""
        if name not in self._done:
            self.inits.append(self.data.add(name, np.asarray(values, dtype=dtype)))
            self.wmap.derived.append(name)
            self._done[name] = name
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, value, self.np_dtype)

    def tensor(self, src: str) -> str:
        """A checkpoint tensor as is (named like it)."""
        if src not in self._done:
            self.inits.append(self.data.add(src, np.asarray(self.source(src), dtype=np.float32).astype(self.np_dtype)))
            self.wmap.map[src] = ("identity", [src])
            self.wmap.expected.append(src)
            self._done[src] = src
        return src

    def linear_weight(self, *srcs: str) -> str:
        """[in, out] MatMul operand from torch Linear weights [out, in] (several: concatenated along out)."""
        name = srcs[0] if len(srcs) == 1 else srcs[0].replace("q_proj.", "qkv_proj.")
        if name not in self._done:
            parts = [np.asarray(self.source(s), dtype=np.float32) for s in srcs]
            array = (np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]).T
            self.inits.append(self.data.add(name, np.ascontiguousarray(array).astype(self.np_dtype)))
            self.wmap.map[name] = ("concat_transpose" if len(srcs) > 1 else "transpose", list(srcs))
            self.wmap.expected.extend(srcs)
            self._done[name] = name
        return name

    def value_slice(self, src: str) -> str:
        """The V third (rows [2E, 3E)) of a packed in-projection weight [3E, E] as a MatMul operand [E, E], or of
        its bias [3E] as [E]."""
        name = src + ".v"
        if name not in self._done:
            array = apply_transform("value_slice", [np.asarray(self.source(src), dtype=np.float32)])
            self.inits.append(self.data.add(name, np.ascontiguousarray(array).astype(self.np_dtype)))
            self.wmap.map[name] = ("value_slice", [src])
            self.wmap.expected.append(src)
            self._done[name] = name
        return name

    def packed_bias(self, *srcs: str) -> str:
        name = srcs[0].replace("q_proj.", "qkv_proj.")
        if name not in self._done:
            array = np.concatenate([np.asarray(self.source(s), dtype=np.float32) for s in srcs])
            self.inits.append(self.data.add(name, array.astype(self.np_dtype)))
            self.wmap.map[name] = ("concat_transpose", list(srcs))  # on 1-D tensors: the concatenation
            self.wmap.expected.extend(srcs)
            self._done[name] = name
        return name


class _VisionBuilder:
    def __init__(self, w: _Writer, dims: VisionDims, attention_op: str):
        self.w, self.d = w, dims
        self.attention_op = attention_op

    # ---- blocks ------------------------------------------------------------------------------------
    def layer_norm(self, x: str, prefix: str, name: str, eps: float) -> str:
        w = self.w
        return w.node("LayerNormalization", [x, w.tensor(prefix + "weight"), w.tensor(prefix + "bias")], name, axis=-1, epsilon=float(eps))

    def linear(self, x: str, prefix: str, name: str, bias: bool = True) -> str:
        w = self.w
        y = w.node("MatMul", [x, w.linear_weight(prefix + "weight")], name + "/MatMul")
        return w.node("Add", [y, w.tensor(prefix + "bias")], name + "/bias") if bias else y

    def attention(self, h: str, prefix: str, name: str) -> str:
        """Self-attention of h [B, S, D] (B sequences of S tokens): q, k, v MatMuls, MultiHeadAttention (adds the
        packed q|k|v bias while it splits heads), out_proj. Returns [B, S, D]."""
        w, d = self.w, self.d
        scale = float((d.hidden_size // d.num_heads) ** -0.5)
        ws = [prefix + f"{p}_proj.weight" for p in "qkv"]
        bias = self.w.packed_bias(*(prefix + f"{p}_proj.bias" for p in "qkv"))
        if self.attention_op == "Attention":  # measured alternative: projection inside the op, score matrix materialised
            a = w.node("Attention", [h, w.linear_weight(*ws), bias], name + "/Attention", domain="com.microsoft", num_heads=d.num_heads, scale=scale)
        else:
            q, k, v = (w.node("MatMul", [h, w.linear_weight(src)], f"{name}/{p}_proj") for src, p in zip(ws, "qkv"))
            a = w.node("MultiHeadAttention", [q, k, v, bias], name + "/MultiHeadAttention", domain="com.microsoft", num_heads=d.num_heads, scale=scale)
        return self.linear(a, prefix + "out_proj.", name + "/out_proj")

    def mlp(self, x: str, prefix: str, name: str) -> str:
        w = self.w
        if self.d.hidden_act == "gelu_pytorch_tanh":  # SigLIP: FastGelu adds fc1's bias itself
            h = w.node("MatMul", [x, w.linear_weight(prefix + "fc1.weight")], name + "/fc1/MatMul")
            h = w.node("FastGelu", [h, w.tensor(prefix + "fc1.bias")], name + "/act", domain="com.microsoft")
            return self.linear(h, prefix + "fc2.", name + "/fc2")
        h = self.linear(x, prefix + "fc1.", name + "/fc1")
        if self.d.hidden_act == "quick_gelu":
            h = w.node("QuickGelu", [h], name + "/act", domain="com.microsoft", alpha=1.702)
        elif self.d.hidden_act == "gelu":
            h = w.node("Gelu", [h], name + "/act")
        else:
            raise NotImplementedError(f"vision builder: hidden_act {self.d.hidden_act!r}")
        return self.linear(h, prefix + "fc2.", name + "/fc2")

    def residual_norm(self, x: str, delta: str, prefix: str, name: str, eps: float) -> tuple[str, str]:
        """(x + delta, LayerNorm(x + delta)): Add + LayerNormalization (faster than SkipLayerNormalization on CPU)."""
        s = self.w.node("Add", [x, delta], name + "/residual")
        return s, self.layer_norm(s, prefix, name, eps)

    def encoder_layer(self, x: str, prefix: str, name: str) -> str:
        """Pre-LN CLIP layer on x [T, S, D] (per-frame attention)."""
        eps = self.d.layer_norm_eps
        h = self.layer_norm(x, prefix + "layer_norm1.", name + "/layer_norm1", eps)
        a = self.attention(h, prefix + "self_attn.", name + "/self_attn")
        x, h = self.residual_norm(x, a, prefix + "layer_norm2.", name + "/layer_norm2", eps)
        return self.w.node("Add", [x, self.mlp(h, prefix + "mlp.", name + "/mlp")], name + "/mlp_residual")

    # ---- BT-Adapter -------------------------------------------------------------------------------
    def frame_slices(self, x: str, name: str) -> tuple[str, str]:
        """x [T, S, D] -> (CLS rows [T,1,D], patches [T,P,D])."""
        w, S = self.w, self.d.num_patches + 1
        cls = w.node("Slice", [x, w.const("slice.0", [0]), w.const("slice.1", [1]), w.const("axis.1", [1])], name + "/slice_cls")
        patches = w.node("Slice", [x, w.const("slice.1", [1]), w.const("slice.S", [S]), w.const("axis.1", [1])], name + "/slice_patches")
        return cls, patches

    def frame_mean(self, x: str, name: str) -> str:
        return self.w.node("ReduceMean", [x, self.w.const("axis.0", [0])], name, keepdims=1)

    def adapter_init(self, x: str, frames: str, name: str) -> tuple[str, str]:
        """`_adapter_init`: (CLS [1,1,D], patches [T,P,D]) from the main-stream output x [T,S,D]."""
        w, d = self.w, self.d
        D = d.hidden_size
        pos = w.tensor(TOWER + "embeddings.position_embedding.weight")
        cls_main, patches = self.frame_slices(x, name)
        cls_old = self.frame_mean(cls_main, name + "/cls_old")
        pos0 = w.node("Slice", [pos, w.const("slice.0", [0]), w.const("slice.1", [1]), w.const("axis.0", [0])], name + "/pos0")
        cls_new = w.node("Add", [w.tensor(TOWER + "btadapter_cls_token"), pos0], name + "/cls_new")
        cls = w.node("Div", [w.node("Add", [cls_old, cls_new], name + "/cls_sum"), w.scalar("two", 2.0)], name + "/cls")
        pos_p = w.node("Slice", [pos, w.const("slice.1", [1]), w.const("slice.S", [d.num_patches + 1]), w.const("axis.0", [0])], name + "/pos_patches")
        patches = w.node("Add", [patches, pos_p], name + "/patches_pos")
        table = w.tensor(TOWER + "btadapter_time_embed.weight")
        times = w.node("Slice", [table, w.const("slice.0", [0]), frames, w.const("axis.0", [0])], name + "/time_rows")  # [T, D]
        times = w.node("Reshape", [times, w.const("shape.time", [-1, 1, D])], name + "/time")  # [T, 1, D]
        return cls, w.node("Add", [patches, times], name + "/patches_time")

    def temporal_layer(self, patches: str, prefix: str, name: str) -> str:
        """`CLIPLayer_AttnTime` on patches [T,P,D]: attention over T per patch, temporal_fc, residual."""
        w, d = self.w, self.d
        h = self.layer_norm(patches, prefix + "layer_norm1.", name + "/layer_norm1", ADAPTER_LN_EPS)
        h = w.node("Transpose", [h], name + "/to_patch_major", perm=[1, 0, 2])  # [P, T, D]
        a = self.attention(h, prefix + "self_attn.", name + "/self_attn")
        a = w.node("Transpose", [a], name + "/to_frame_major", perm=[1, 0, 2])  # [T, P, D]
        a = self.linear(a, prefix + "temporal_fc.", name + "/temporal_fc")
        return w.node("Add", [patches, a], name + "/residual")

    def spatial_layer(self, cls: str, patches: str, frames: str, prefix: str, name: str) -> tuple[str, str]:
        """`CLIPLayer_Spatial`: per frame attention over (CLS + P patches), CLS outputs averaged over T, MLP."""
        w, d = self.w, self.d
        D = d.hidden_size
        shape = w.node("Concat", [frames, w.const("one.one_D", [1, D])], name + "/cls_shape", axis=0)
        h = w.node("Concat", [w.node("Expand", [cls, shape], name + "/cls_per_frame"), patches], name + "/tokens", axis=1)  # [T, S, D]
        h = self.layer_norm(h, prefix + "layer_norm1.", name + "/layer_norm1", ADAPTER_LN_EPS)
        a = self.attention(h, prefix + "self_attn.", name + "/self_attn")
        a_cls, a_patches = self.frame_slices(a, name + "/attn")
        out = []
        for part, res in (("cls", w.node("Add", [cls, self.frame_mean(a_cls, name + "/cls_mean")], name + "/cls_residual")),
                          ("patches", w.node("Add", [patches, a_patches], name + "/patches_residual"))):
            h = self.layer_norm(res, prefix + "layer_norm2.", f"{name}/{part}/layer_norm2", ADAPTER_LN_EPS)
            out.append(w.node("Add", [res, self.mlp(h, prefix + "mlp.", f"{name}/{part}/mlp")], f"{name}/{part}/mlp_residual"))
        return out[0], out[1]

    # ---- the graph ------------------------------------------------------------------------------------
    def patches(self) -> str:
        """pixel_values -> patch embeddings [T, P, D] (Conv, flatten, transpose)."""
        w, d = self.w, self.d
        bias = [w.tensor(TOWER + "embeddings.patch_embedding.bias")] if d.tower == "siglip" else []
        x = w.node("Conv", ["pixel_values", w.tensor(TOWER + "embeddings.patch_embedding.weight"), *bias], "/embeddings/patch_embedding",
                   kernel_shape=[d.patch_size, d.patch_size], strides=[d.patch_size, d.patch_size])  # [T, D, g, g]
        x = w.node("Reshape", [x, w.const("shape.conv", [0, d.hidden_size, -1])], "/embeddings/flatten")
        return w.node("Transpose", [x], "/embeddings/transpose", perm=[0, 2, 1])

    def values(self, feats: str) -> None:
        """values = GELU(linear_1(F)) [T,P,D_llm] (projector_hidden_act 'gelu', both families)."""
        w = self.w
        v = w.node("MatMul", [feats, w.linear_weight(PROJECTOR + "linear_1.weight")], "/values/linear_1")
        w.node("BiasGelu", [v, w.tensor(PROJECTOR + "linear_1.bias")], "/values/gelu", outputs=["values"], domain="com.microsoft")

    def l2_keys(self, k: str) -> None:
        """keys = the rows of k flattened to [T*P, E], each divided by its L2 norm."""
        w = self.w
        k = w.node("Reshape", [k, w.const("shape.keys", [-1, self.d.keys_size])], "/keys/flatten")
        sq = w.node("ReduceSum", [w.node("Mul", [k, k], "/keys/square"), w.const("axis.-1", [-1])], "/keys/sum", keepdims=1)
        inv = w.node("Reciprocal", [w.node("Sqrt", [sq], "/keys/norm")], "/keys/inv_norm")
        w.node("Mul", [k, inv], "/keys/normalize", outputs=["keys"])

    def build_siglip(self) -> None:
        """The SigLIP tower, then values and the MAP head's value path as keys (see the module doc)."""
        w, d = self.w, self.d
        x = w.node("Add", [self.patches(), w.tensor(TOWER + "embeddings.position_embedding.weight")], "/embeddings/positions")
        for idx in range(d.num_layers):
            x = self.encoder_layer(x, f"{TOWER}encoder.layers.{idx}.", f"/layers.{idx}")
        self.values(x)
        head = PROJECTOR + "clip_visual_head."
        k = self.layer_norm(x, PROJECTOR + "clip_visual_ln.", "/keys/clip_visual_ln", d.clip_ln_eps)
        k = w.node("MatMul", [k, w.value_slice(head + "attention.in_proj_weight")], "/keys/head/v_proj")
        v = w.node("Add", [k, w.value_slice(head + "attention.in_proj_bias")], "/keys/head/v_bias")
        h = self.layer_norm(v, head + "layernorm.", "/keys/head/layernorm", d.layer_norm_eps)
        self.l2_keys(w.node("Add", [v, self.mlp(h, head + "mlp.", "/keys/head/mlp")], "/keys/head/residual"))

    def build(self) -> None:
        if self.d.tower == "siglip":
            return self.build_siglip()
        w, d = self.w, self.d
        D = d.hidden_size
        frames = w.node("Shape", ["pixel_values"], "/frames", start=0, end=1)  # [T]
        x = self.patches()  # [T, P, D]
        cls = w.node("Reshape", [w.tensor(TOWER + "embeddings.class_embedding"), w.const("shape.cls", [1, 1, D])], "/embeddings/cls")
        shape = w.node("Concat", [frames, w.const("one.one_D", [1, D])], "/embeddings/cls_shape", axis=0)
        x = w.node("Concat", [w.node("Expand", [cls, shape], "/embeddings/cls_per_frame"), x], "/embeddings/tokens", axis=1)
        x = w.node("Add", [x, w.tensor(TOWER + "embeddings.position_embedding.weight")], "/embeddings/positions")
        x = self.layer_norm(x, TOWER + "pre_layrnorm.", "/pre_layrnorm", d.layer_norm_eps)
        total, depth = d.num_layers, d.btadapter_depth
        a_cls = a_patches = None
        for idx in range(total - 1):  # the last layer only feeds hidden_states[-1] (dead)
            x = self.encoder_layer(x, f"{TOWER}encoder.layers.{idx}.", f"/layers.{idx}")
            if idx >= total - depth:
                step = idx - (total - depth)
                name = f"/btadapter.{step}"
                if a_cls is None:
                    a_cls, a_patches = self.adapter_init(x, frames, name + "/init")
                else:
                    cls_main, patches_main = self.frame_slices(x, name + "/main")
                    a_cls = w.node("Add", [a_cls, self.frame_mean(cls_main, name + "/main/cls_mean")], name + "/cls_in")
                    a_patches = w.node("Add", [a_patches, patches_main], name + "/patches_in")
                a_patches = self.temporal_layer(a_patches, f"{TOWER}btadapter_T_layers.{step}.", name + "/temporal")
                a_cls, a_patches = self.spatial_layer(a_cls, a_patches, frames, f"{TOWER}btadapter_S_layers.{step}.", name + "/spatial")
        _, feats = self.frame_slices(x, "/features")
        if a_patches is not None:
            feats = w.node("Div", [w.node("Add", [feats, a_patches], "/features/merge_sum"), w.scalar("two", 2.0)], "/features/merge")
        # heads: values = GELU(linear_1(F)) [T,P,D_llm]; keys = l2norm(clip_visual_projection(clip_visual_ln(F))) [T*P,E]
        self.values(feats)
        k = self.layer_norm(feats, PROJECTOR + "clip_visual_ln.", "/keys/clip_visual_ln", d.clip_ln_eps)
        self.l2_keys(w.node("MatMul", [k, w.linear_weight(PROJECTOR + "clip_visual_projection.weight")], "/keys/projection"))


def build_vision(
    source: WeightSource,
    dims: VisionDims,
    path: Path,
    dtype: str = "fp32",
    opset: int = 20,
    external: bool = True,
    attention_op: str = "MultiHeadAttention",
) -> dict:
    """Write `path` (with `external`: + `path.data`, tensors streamed one at a time): the fused vision graph.
    Returns {'bytes', 'initializers', 'nodes', 'weights'} ('weights': the WeightMap tracing every initializer to
    its checkpoint tensors, see export/weights_check.py).

    Args:
        source: checkpoint tensors by name (e.g. 'vision_tower.vision_model.embeddings.class_embedding').
        dims: the tower's dimensions (`VisionDims.from_config`).
        dtype: 'fp32' or 'fp16' (weights, activations, inputs and outputs).
        external: initializers in `path.data`, streamed (the export's choice: memory-bounded, and above protobuf's
            2 GB limit); False keeps them in the proto (small test graphs).
        attention_op: 'MultiHeadAttention' (the export's choice), or 'Attention' (com.microsoft Attention, with the
            q|k|v projection inside the op) to measure that alternative.
    """
    import onnx
    from onnx import TensorProto, helper

    np_dtype = np.float16 if dtype == "fp16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    path = Path(path)
    with (ExternalData(path.with_name(path.name + ".data")) if external else _Inline()) as data:
        w = _Writer(data, source, np_dtype)
        _VisionBuilder(w, dims, attention_op).build()
    d = dims
    graph = helper.make_graph(
        w.nodes,
        "ppllava_vision",
        [helper.make_tensor_value_info("pixel_values", elem, ["frames", d.num_channels, d.image_size, d.image_size])],
        [
            helper.make_tensor_value_info("values", elem, ["frames", d.num_patches, d.values_size]),
            helper.make_tensor_value_info("keys", elem, [f"{d.num_patches}*frames", d.keys_size]),
        ],
        w.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="ppllava-edge")
    model.ir_version = 10
    onnx.save_model(model, str(path))
    return {"bytes": data.bytes_written, "initializers": len(w.inits), "nodes": len(w.nodes), "weights": w.wmap}


FUSED_OPS = "com.microsoft MultiHeadAttention (flash attention on CPU), QuickGelu, BiasGelu; ONNX Runtime only"
TRT_OPS = "standard ONNX ops, traced (TensorRT's parser takes them)"
