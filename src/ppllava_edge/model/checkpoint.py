"""Released-checkpoint IO: config.json + model.safetensors.index.json + shards (safetensors only, never pickle)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..config import load_config
from ..errors import CheckpointError
from .ppllava import PPLLaVAForConditionalGeneration

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Non-persistent buffers that some transformers versions wrote into checkpoints; harmless if present.
_IGNORABLE_SUFFIXES = ("embeddings.position_ids",)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def shard_files(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or a single model.safetensors)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc}); expected a JSON object with a 'weight_map'.") from exc
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing from {folder}: {', '.join(missing)}")
        return weight_map
    single = folder / SINGLE_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (*.bin/*.pt) found; ppllava-edge loads safetensors only (never unpickles).")
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint folder.")


def read_state_dict(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in shard_files(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{folder / INDEX_NAME} maps '{name}' to {file}, but that shard does not hold it.")
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if t.is_floating_point() else t
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises plain exceptions for corrupt headers
            raise CheckpointError(f"{folder / file}: cannot read safetensors shard ({exc})") from exc
    return out


def _listing(names: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {shown}{more}"


def load_model(folder: str | Path, dtype: str | torch.dtype = "fp32", attn_implementation: str = "sdpa") -> PPLLaVAForConditionalGeneration:
    """Load a released-layout checkpoint folder into the PyTorch reference model (eval mode).

    bf16/fp16 tensors are upcast to `dtype` (fp32 by default). Missing or unexpected tensors raise
    CheckpointError listing them: nothing is ever left randomly initialised.
    """
    folder = Path(folder)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = load_config(folder)
    state = read_state_dict(folder, torch_dtype)
    with torch.device("meta"):
        model = PPLLaVAForConditionalGeneration(cfg, attn_implementation=attn_implementation)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith(_IGNORABLE_SUFFIXES))
    if missing or unexpected:
        parts = [f"{folder}: checkpoint tensors do not match the model built from config.json."]
        if missing:
            parts.append(f"Missing {len(missing)} tensor(s):\n{_listing(missing)}")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} tensor(s):\n{_listing(unexpected)}")
        parts.append("Hint: check config.json dims (vision_config, text_config, clip_weight) against the shards.")
        raise CheckpointError("\n".join(parts))
    bad = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"{folder}: tensor shapes do not match config.json:\n{_listing(bad)}")
    model.load_state_dict({k: state[k] for k in expected}, assign=True, strict=True)
    model.to(torch_dtype)
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild that module on CPU
    lm = model.language_model.model
    lm.rotary_emb = type(lm.rotary_emb)(lm.rotary_emb.config)  # inv_freq stays fp32
    model.requires_grad_(False)
    model.eval()
    return model


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over config.json and the index (cheap and stable; shard contents are named by the index)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("config.json", INDEX_NAME, SINGLE_NAME):
        p = folder / name
        if p.is_file() and (name != SINGLE_NAME or not (folder / INDEX_NAME).is_file()):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def save_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 3) -> None:
    """Write `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json` like the release."""
    from safetensors.torch import save_file

    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    target = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > target and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, group in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in group}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
