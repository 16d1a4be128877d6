"""What one quantization run is asked to do, as one frozen object (`QuantizeOptions`): the precision mode of each
graph, the conversion settings and the accuracy gate's thresholds. The CLI builds it once; `quantize_export`, the
per-graph conversion (`convert.py`) and the gate (`gate.py`) read it unchanged.

    options = QuantizeOptions(llm="int4-weight", block_size=32)
    quantize_export("export/", "calib/", "export-int4/", options)

A combination that can never work is refused when the object is built (`__post_init__`), so the CLI refuses it
before reading any file; what depends on the export (an fp16 source, a missing decoder_trt) is checked by
`quantize_export` against the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from .weight_algorithms import ALGORITHMS, check_algorithm

VISION_PRECISIONS = ("int8", "fp16", "fp32")
POOL_PRECISIONS = ("int8", "fp32")
LLM_PRECISIONS = ("auto", "int8-weight", "int4-weight", "fp32")  # the ONNX Runtime decoder ("int8": refused, see STATIC_INT8_DECODER)
LLM_TRT_PRECISIONS = ("auto", "int8", "int8-weight", "int4-weight", "fp32")  # TensorRT's decoder_trt
WEIGHT_ONLY = ("int8-weight", "int4-weight")
AUTO_LLM = "int8-weight"  # --llm auto: passes the trained-LLM gate with margin and decodes faster than fp32 (README)
STATIC_INT8_DECODER = (
    "--llm int8 (static Q/DQ) is not offered for ONNX Runtime's decoder: ONNX Runtime leaves its activations float and "
    "dequantizes every weight at every step (1.47 s per token against ~15 ms for fp32, README \"Quantization quality on "
    "trained weights\").\nHint: use --llm int8-weight (MatMulNBits: int8 weights, faster than fp32) or int4-weight; "
    "static INT8 with a TensorRT calibration cache stays available for TensorRT's decoder: --llm-trt int8 --trt-cache.")
METHODS = ("minmax", "percentile", "entropy")
OP_TYPES = ("weights", "matmul", "all")
GATE_MODES = ("auto", "full", "truncated")
ACCURACY_LEVEL = {8: 4, 4: 4}  # MatMulNBits accuracy_level per bit width when not given (README: measured on SmolLM2)
ASYMMETRIC = {8: False, 4: True}  # min/max blocks per bit width when not given (int4 b32 on SmolLM2: +2.0 % vs +62.6 %)
WEIGHT_ALGORITHM = {8: "rtn", 4: "rtn"}  # --weight-algorithm auto per bit width (README "Quantization quality on trained weights")


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds. None = reported only. The defaults suit the random-weight presets; `TRAINED` (chosen from the
    measurements on SmolLM2-135M-Instruct, README "Quantization quality on trained weights") applies when the
    export's LLM is a trained model (`export.json` llm.trained)."""

    cosine: float = 0.99  # vision / pool outputs
    decoder_cosine: float = 0.98  # last-position logits
    top1: float = 0.60  # prefill positions and teacher-forced decode steps (see gate.py's module doc)
    greedy: float | None = None  # mean fraction of greedy tokens before the first divergence
    # quality rows (calibration/quality.py), through the whole pipeline; higher is better unless noted
    quality_top1: float | None = None  # next-token top-1 agreement, prefill positions and decode steps
    quality_kl: float | None = None  # mean KL(fp32 || Q) in nats, lower is better
    quality_ppl: float | None = None  # relative perplexity change of the fp32 answers under Q, lower is better
    profile: str = "random-weight LLM"


# Set from the measurements on SmolLM2-135M-Instruct (README "Quantization quality on trained weights"; int8-weight:
# top-1 0.97 / 0.95, KL 0.005 / 0.006 nats, perplexity +1.5 %): the quality rows gate, with margin for the
# weight-only modes; the decoder rows keep the random-weight values (not re-measured on trained weights).
TRAINED = Thresholds(quality_top1=0.90, quality_kl=0.05, quality_ppl=0.10, profile="trained LLM")


def default_thresholds(manifest) -> Thresholds:
    """TRAINED when the export's LLM is a trained model (make-checkpoint --llm), else the random-weight defaults."""
    return TRAINED if manifest.trained_llm else Thresholds()


@dataclass(frozen=True)
class QuantizeOptions:
    """How `quantize_export` converts and gates an export (`dataclasses.replace` for a variant).

    Attributes:
        vision: "int8" | "fp16" | "fp32" (vision and vision_trt).
        pool: "int8" | "fp32" (prompt_pool and image_pool).
        llm: "auto" | "int8-weight" | "int4-weight" | "fp32": ONNX Runtime's decoder ("auto": AUTO_LLM). "int8" (static
            Q/DQ) is refused with STATIC_INT8_DECODER: ONNX Runtime runs it far slower than fp32.
        llm_trt: TensorRT's standard-ops decoder_trt (exports made with --tensorrt): "auto" (the --llm mode: int8 /
            int4 weight-only as DequantizeLinear weights, see weight_dq.py; fp32 copied), "int8" (static Q/DQ from
            CALIB, with `trt_cache` its calibration cache), "int8-weight", "int4-weight", "fp32".
        method: static calibration method "minmax" | "percentile" | "entropy".
        op_types: "weights" (default) | "matmul" | "all" (convert.py's module doc; "all" is the broken configuration).
        exclude_nodes: node names kept float ("graph:name" for one graph, or a plain name for every graph;
            names of the graph after ORT pre-processing, which keeps the exporter's names for MatMul/Gemm nodes).
        block_size: MatMulNBits block size (16, 32, 64, 128, ...).
        accuracy_level: MatMulNBits compute of the weight-only decoder: 0 (fp32 activations) or 4 (int8 activations
            inside the kernel); None: ACCURACY_LEVEL[bits] (README "Quantization quality on trained weights").
        asymmetric: weight-only min/max blocks with zero points instead of symmetric ones (ONNX Runtime's decoder only;
            TensorRT requires zero points of 0, so decoder_trt stays symmetric); None: ASYMMETRIC[bits].
        weight_algorithm: how the weight-only decoder's values are chosen on their grid: "rtn" | "hqq" | "gptq"
            (weight_algorithms.py; gptq calibrates on CALIB's decoder feeds); "auto": WEIGHT_ALGORITHM[bits].
        llm_activations: "fp32" (default; what a CPU runs fast) or "fp16": the activations of a weight-only decoder
            quantized from an fp16 export (an fp32 export stays fp32).
        trt_cache: also write `trt_calibration/<graph>.cache` (TensorRT text calibration cache) for int8 graphs.
        gate: "full" (the whole quantized export against the source), "truncated" (the decoder gate on depth-truncated
            decoders built from the checkpoint - the full fp16 reference of a 7B decoder needs 13.5 GB), or "auto".
        thresholds: gate thresholds (None: `default_thresholds` of the export: TRAINED for a trained LLM).
        prefill_positions: prefix cuts per held-out prompt for decoder top-1.
        greedy_tokens: tokens for the teacher-forced and the greedy pipeline comparison.
        quality_tokens / quality_pairs: answer length and pair count of the quality rows (0 tokens: skipped).
        accept_degraded: write the folder even when the gate fails (accuracy.json records the failure).
    """

    vision: str = "int8"
    pool: str = "int8"
    llm: str = "auto"
    llm_trt: str = "auto"
    method: str = "minmax"
    op_types: str = "weights"
    exclude_nodes: tuple[str, ...] = field(default=())
    block_size: int = 32
    accuracy_level: int | None = None
    asymmetric: bool | None = None
    weight_algorithm: str = "auto"
    llm_activations: str = "fp32"
    trt_cache: bool = False
    gate: str = "auto"
    thresholds: Thresholds | None = None
    prefill_positions: int = 8
    greedy_tokens: int = 16
    quality_tokens: int = 32
    quality_pairs: int | None = None
    accept_degraded: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        self._refuse_impossible()

    def _refuse_impossible(self) -> None:
        """Every combination that can never work, one InputError each (the manifest-free checks)."""
        if self.llm == "int8":
            raise InputError(STATIC_INT8_DECODER)
        for name, value, allowed in (("vision", self.vision, VISION_PRECISIONS), ("pool", self.pool, POOL_PRECISIONS),
                                     ("llm", self.llm, LLM_PRECISIONS), ("llm_trt", self.llm_trt, LLM_TRT_PRECISIONS),
                                     ("method", self.method, METHODS), ("op_types", self.op_types, OP_TYPES)):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.gate not in GATE_MODES:
            raise InputError(f"--gate {self.gate!r}: choose one of {', '.join(GATE_MODES)}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level must be 0..4 (ONNX Runtime MatMulNBits), got {self.accuracy_level!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.llm in WEIGHT_ONLY or self.weight_algorithm not in ALGORITHMS:
            bits = 8 if self.llm == "int8-weight" else 4
            check_algorithm(self.weight_algorithm, bits, not self.asymmetric_for(bits))

    @property
    def decoder_precision(self) -> str:
        """ONNX Runtime's decoder mode with "auto" resolved."""
        return AUTO_LLM if self.llm == "auto" else self.llm

    @property
    def decoder_trt_precision(self) -> str:
        """TensorRT's decoder_trt mode with "auto" resolved: the weight-only --llm mode as DequantizeLinear weights
        (weight_dq.py), or "int8": static Q/DQ (TensorRT builds it from the fp32 graph with the calibration cache)."""
        return self.decoder_precision if self.llm_trt == "auto" else self.llm_trt

    def precisions(self, graph_names) -> dict[str, str]:
        """Graph -> the mode it is converted at, for the graphs of an export (any other graph: "fp32", copied)."""
        modes = {"vision": self.vision, "prompt_pool": self.pool, "image_pool": self.pool, "decoder": self.decoder_precision,
                 "projector_head": "fp32", "decoder_trt": self.decoder_trt_precision, "vision_trt": self.vision}
        out = {g: p for g, p in modes.items() if g in graph_names}
        out.update({g: "fp32" for g in graph_names if g not in out})
        return out

    def asymmetric_for(self, bits: int) -> bool:
        return ASYMMETRIC[bits] if self.asymmetric is None else self.asymmetric

    def weight_only(self, bits: int, src_dtype: str) -> dict:
        """The `convert._quantize_nbits` settings of a `bits`-bit weight-only decoder quantized from a `src_dtype`
        export: activations upcast to fp32, MatMulNBits accuracy level, symmetric blocks (per-bit defaults where an
        option is None)."""
        return {"upcast": src_dtype == "fp16" and self.llm_activations == "fp32",
                "accuracy_level": ACCURACY_LEVEL[bits] if self.accuracy_level is None else self.accuracy_level,
                "symmetric": not self.asymmetric_for(bits)}

    def algorithm_for(self, bits: int) -> str:
        return WEIGHT_ALGORITHM[bits] if self.weight_algorithm == "auto" else self.weight_algorithm

    def record(self, llm_trt: str | None, gate: str) -> dict:
        """The options as `export.json` `quantization` records them: modes resolved; `llm_trt` (None: the export has
        no decoder_trt) and `gate` resolved against the export by the caller."""
        return {"vision": self.vision, "pool": self.pool, "llm": self.decoder_precision, "llm_trt": llm_trt, "method": self.method,
                "op_types": self.op_types, "block_size": self.block_size, "exclude_nodes": list(self.exclude_nodes),
                "accept_degraded": self.accept_degraded, "llm_activations": self.llm_activations, "gate": gate,
                "accuracy_level": self.accuracy_level, "asymmetric": self.asymmetric}
