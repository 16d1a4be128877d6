"""The export folder contract (`export.json`), read by the torch-free runtime, calibration, engine and bench."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .conversation import ConversationTemplate
from .errors import ConfigError
from .jsonfile import read_json
from .media.anyres import ImageLayout, image_layout, single_tile_layout
from .media.spec import PreprocessSpec, spec_named

MANIFEST_NAME = "export.json"
MANIFEST_FORMAT = "ppllava-edge-export"
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT: "  # the authors' plain_v1 one-question prompt (exports before templates)
GRAPHS = ("vision", "prompt_pool", "image_pool", "projector_head", "decoder")
# Stages of an answer; `export.json` maps each (backend, stage) to one of its graphs (see ExportManifest.graph_for).
STAGES = GRAPHS
BACKENDS = ("ort", "trt")
SHARED_DATA = ("pools.onnx.data",)  # external data shared by several graphs (exporter.POOL_DATA)
WEIGHTS_KEY = "weights"  # export.json: file name -> {"bytes", "sha256", "sampled_sha256"} (integrity.py)


def graph_files(path: Path) -> list[Path]:
    """A graph file and the external-data files next to it that it may name (`decoder.onnx.data`, the shared
    `pools.onnx.data`); cheap: no parsing."""
    return [path, *sorted(p for p in path.parent.glob("*.data") if p.name.startswith(path.name) or p.name in SHARED_DATA)]


@dataclass(frozen=True)
class ExportManifest:
    folder: Path
    data: dict

    def path(self, name: str) -> Path:
        """File of a graph ('vision', ...), of `embeddings`, of `image_newline` or an entry of `tokenizers`."""
        if name in self.data["graphs"]:
            return self.folder / self.data["graphs"][name]["file"]
        if name == "embeddings":
            return self.folder / self.data["embeddings"]["file"]
        if name == "image_newline":
            return self.folder / self.data["image"]["newline"]["file"]
        return self.folder / self.data["tokenizers"][name]

    def data_files(self) -> list[Path]:
        """The files besides the graphs that the runtime reads: embedding table, tokenizers, image newline row."""
        names = ["embeddings", *self.data["tokenizers"]]
        if (self.data.get("image") or {}).get("newline"):
            names.append("image_newline")
        return [self.path(n) for n in names]

    def graph(self, name: str) -> dict:
        """A graph's entry: file, inputs / outputs with their dims, precision, contract, ops, quantization."""
        return self.data["graphs"][name]

    def has_graph(self, name: str) -> bool:
        return name in self.data["graphs"]

    def files(self) -> list[Path]:
        """Every file of the export that export.json names or that a graph reads (external data), sorted."""
        files = set(self.data_files())
        for graph in self.data["graphs"]:
            files.update(graph_files(self.path(graph)))
        return sorted(files)

    def to_dict(self) -> dict:
        """A deep copy of export.json's content: the start of a derived export's manifest (`quantize`)."""
        return json.loads(json.dumps(self.data))

    def graph_for(self, stage: str, backend: str = "ort") -> str:
        """The graph (a key of `graphs`) that `backend` ('ort' or 'trt') runs for `stage`.

        An export may hold two graphs for one stage: a fused one for ONNX Runtime (com.microsoft contrib ops such
        as GroupQueryAttention) and one of standard ONNX ops that TensorRT's parser takes. `export.json` records
        the choice under `backends`; exports without that entry use the stage's own graph for every backend.
        """
        return self.data.get("backends", {}).get(backend, {}).get(stage, stage)

    def backend_graphs(self, backend: str = "ort") -> dict[str, str]:
        """stage -> graph for every stage this export has, as `backend` runs them."""
        out = {}
        for stage in STAGES:
            graph = self.graph_for(stage, backend)
            if self.has_graph(graph):
                out[stage] = graph
        return out

    @property
    def model(self) -> dict:
        return self.data["model"]

    # ---- the export.json fields, one accessor each (nothing outside this file reads `data` by key) --------------
    @property
    def dtype(self) -> str:
        """The export's float dtype ("fp32" | "fp16")."""
        return self.data.get("dtype", "fp32")

    @property
    def graph_names(self) -> list[str]:
        return list(self.data["graphs"])

    def precision(self, graph: str) -> str:
        """The precision of a graph: its own (a quantized export records one per graph), else the export's dtype."""
        return self.graph(graph).get("precision", self.dtype)

    @property
    def created(self) -> str | None:
        return self.data.get("created")

    @property
    def checkpoint(self) -> dict:
        """{"path", "sha256", ...} of the checkpoint the export was made from."""
        return self.data["checkpoint"]

    @property
    def export_id(self) -> str:
        """Identity of this export's numbers (feature caches must not mix exports): creation time + checkpoint digest."""
        return (self.created or "") + self.checkpoint["sha256"]

    @property
    def image_token_id(self) -> int:
        return int(self.data["image_token_id"])

    @property
    def weights(self) -> dict | None:
        """`weights`: each file's size and digests (integrity.py); None for an export made before they were recorded."""
        return self.data.get(WEIGHTS_KEY)

    @property
    def image_tokens(self) -> int:
        """Visual tokens of the largest image (anyres tiles), 0 for an export made before image tiles."""
        return int(self.data.get("image_tokens", 0))

    @property
    def image_rules(self) -> dict | None:
        """The anyres rules (`image`), None for an export made before image tiles."""
        return self.data.get("image")

    @property
    def preprocess(self) -> PreprocessSpec:
        """How frames and image tiles become pixel values (`image.preprocess.name`); exports made before the
        Qwen/SigLIP family recorded it are CLIP's."""
        return spec_named(((self.data.get("image") or {}).get("preprocess") or {}).get("name"), f"{self.folder}/export.json image.preprocess")

    @property
    def quantization(self) -> dict:
        """The `quantization` block of a quantized export ({} for an fp32 / fp16 export)."""
        return self.data.get("quantization") or {}

    @property
    def trained_llm(self) -> bool:
        """The checkpoint's LLM is a trained model (make-checkpoint --llm)."""
        return bool((self.data.get("llm") or {}).get("trained"))

    @property
    def preset(self) -> str | None:
        return self.data.get("preset")

    @property
    def opset(self) -> int:
        return int(self.data.get("opset", 20))

    @property
    def conversation(self) -> ConversationTemplate:
        """The LLM's conversation template (`conversation_template`; exports made before it: the authors' plain_v1)."""
        return ConversationTemplate.from_dict(self.data.get("conversation_template"))

    @property
    def eos_token_id(self) -> int:
        return int(self.data["special_tokens"]["eos"])

    def llama_tokenizer(self):
        """The prompt tokenizer (tokenization.LlamaPromptTokenizer) with this export's template and image id."""
        from .tokenization import LlamaPromptTokenizer

        return LlamaPromptTokenizer.from_file(self.path("llama"), image_token_id=self.image_token_id, template=self.conversation)

    def relevance_tokenizer(self):
        """The pools' text-tower tokenizer: SigLIP's sentencepiece model (Qwen2 + SigLIP exports) or CLIP's BPE."""
        from .tokenization import ClipTokenizer, SiglipTextTokenizer

        if "siglip" in self.data["tokenizers"]:
            return SiglipTextTokenizer.from_file(self.path("siglip"))
        return ClipTokenizer.from_file(self.path("clip"))

    @property
    def llm_note(self) -> str | None:
        """'real LLM <name>, untrained vision weights' when the checkpoint's LLM is a trained model (make-checkpoint --llm)."""
        llm = self.data.get("llm")
        if not llm or not llm.get("trained"):
            return None
        return f"real LLM ({llm.get('name')}) with untrained (random) vision weights: the text is fluent, it does not describe the video"

    @property
    def frames(self) -> tuple[int, int, int]:
        f = self.data["frames"]
        return f["min"], f["opt"], f["max"]

    def image_layout(self, image_size: tuple[int, int] | None) -> ImageLayout:
        """Token layout of an image of (H, W) pixels under this export's anyres rules (`image` in export.json);
        None: a lone tile (g*g tokens + one newline).

        Raises:
            ConfigError: the export predates image tiles (no `image` entry).
        """
        rules = self.data.get("image")
        if rules is None:
            raise ConfigError(
                f"{self.folder}: this export predates image tiles (no 'image' entry in export.json), so it cannot answer "
                "about images the way the released model does.\nHint: re-export the checkpoint with `ppllava-edge export`."
            )
        args = (rules["tile_size"], rules["pooled_grid"], rules["newline"] is not None)
        if image_size is None:
            return single_tile_layout(*args)
        return image_layout(image_size, rules["grid_pinpoints"], *args)

    def visual_tokens(self, num_frames: int) -> int:
        return (num_frames // self.data["pooling"]["kernel"][0]) * self.data["visual_tokens_per_frame_pair"]


def load_manifest(folder: str | Path) -> ExportManifest:
    """Read and check `<folder>/export.json` (every file it names must exist)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such export folder.\nHint: create one with `ppllava-edge export CHECKPOINT {folder}`.")
    data = read_json(path, f"missing; {folder} is not an export folder.\nHint: create one with `ppllava-edge export CHECKPOINT OUT`.", fmt=MANIFEST_FORMAT)
    manifest = ExportManifest(folder, data)
    files = [manifest.path(n) for n in data["graphs"]] + manifest.data_files()
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{path}: files named by the manifest are missing: {', '.join(missing)}")
    return manifest
