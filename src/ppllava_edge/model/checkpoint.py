"""Released-checkpoint IO: config.json + model.safetensors.index.json + shards (safetensors only, never pickle).

Shards are read and written tensor by tensor (`shards.py`): `read_state_dict(folder, prefix=...)` reads only the
bytes of the tensors it returns, `build_skeleton` + `load_weights` materialise one sub-module of a meta-device
model at a time, and `write_shards` streams tensors to disk without holding a shard in memory.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import PPLLaVAConfig, load_config
from ..errors import CheckpointError
from ..memory import trim_heap
from .ppllava import PPLLaVAForConditionalGeneration
from .shards import READ_BLOCK_BYTES, SafetensorsFile, SafetensorsWriter, TensorSpec, plan_shards

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Non-persistent buffers that some transformers versions wrote into checkpoints; harmless if present.
_IGNORABLE_SUFFIXES = ("embeddings.position_ids",)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
ProgressFn = Callable[[int, int], None]


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
        with SafetensorsFile(single) as f:
            return {k: SINGLE_NAME for k in f.tensors}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (*.bin/*.pt) found; ppllava-edge loads safetensors only (never unpickles).")
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint folder.")


class CheckpointReader:
    """Reads single tensors of a checkpoint folder by name; shards are opened on first use.

    Only the bytes of the tensors asked for are read (`bytes_read` counts them), so a caller can load one
    sub-model (say `vision_tower.*`) of a 7B checkpoint without touching the LLM's 13 GB.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.weight_map = shard_files(self.folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._rows: dict[str, int] = {}

    def first_rows(self, limits: dict[str, int]) -> CheckpointReader:
        """A view of this reader (sharing its open shards; close the original, not the view) in which each tensor
        named in `limits` holds only its first rows: `spec`, `read` and `read_numpy` give `[rows, ...]` and read only
        those bytes. Validation of a depth-truncated copy uses it for a large vocabulary's head."""
        view = copy.copy(self)
        view._rows = {**self._rows, **limits}
        return view

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with `prefix`, in file and data order (sequential reads)."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return sorted(names, key=lambda n: (self.weight_map[n], self._stored(n).begin))

    def _file(self, name: str) -> SafetensorsFile:
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.folder / shard)
        return self._files[shard]

    def _stored(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r} in the checkpoint.")
        f = self._file(name)
        if name not in f.tensors:
            raise CheckpointError(f"{self.folder / INDEX_NAME} maps '{name}' to {f.path.name}, but that shard does not hold it.")
        return f.tensors[name]

    def spec(self, name: str) -> TensorSpec:
        spec = self._stored(name).spec
        rows = self._rows.get(name)
        if rows is None or not spec.shape or rows >= spec.shape[0]:
            return spec
        return TensorSpec(spec.name, (rows, *spec.shape[1:]), spec.dtype)

    def _fill(self, name: str, flat) -> None:
        """The first `len(flat)` stored elements of `name` into `flat` (a torch or numpy 1-D array), block by block."""
        n, to_numpy = len(flat), isinstance(flat, np.ndarray)
        item = self._stored(name).spec.dtype.itemsize
        for start, block in self._file(name).blocks(name, min(READ_BLOCK_BYTES, max(n, 1) * item)):
            block = block[: n - start]
            flat[start : start + block.numel()] = block.to(torch.float32).numpy() if to_numpy else block
            if start + block.numel() >= n:
                break  # (before the generator reads a block past the rows)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name`; floating tensors are converted to `dtype` when given, block by block (the same values as
        `.to(dtype)` of the stored tensor, without holding the stored copy beside the converted one)."""
        spec = self.spec(name)
        whole = spec.shape == self._stored(name).spec.shape  # (not cut to its first rows by `first_rows`)
        if whole and (dtype is None or dtype == spec.dtype or not spec.dtype.is_floating_point):
            return self._file(name).read(name)
        out = torch.empty(spec.shape, dtype=dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype)
        self._fill(name, out.view(-1))
        return out

    def read_numpy(self, name: str, dtype) -> np.ndarray:
        """Tensor `name` as a numpy array of `dtype` (float32 / float16): each block converted to float32 by torch
        and cast by numpy, the values of `read(name, torch.float32).numpy().astype(dtype)`, but without the whole
        float32 copy (2.2 GB for a 7B Qwen2 lm_head, 4x the fp16 result). Non-floating tensors as stored."""
        spec = self.spec(name)
        if not spec.dtype.is_floating_point:
            return self.read(name).numpy()
        out = np.empty(spec.shape, dtype)
        self._fill(name, out.reshape(-1))
        return out

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def read_state_dict(folder: str | Path, dtype: torch.dtype = torch.float32, names: Iterable[str] | None = None, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint folder: all of them, the given `names`, or those starting with `prefix`.

    Floating tensors are converted to `dtype`. Only the selected tensors' bytes are read.

    Raises:
        CheckpointError: a requested name is not in the checkpoint, or a shard is missing or corrupt.
    """
    if names is not None and prefix is not None:
        raise ValueError("pass names or prefix, not both")
    with CheckpointReader(folder) as ck:
        if names is None:
            wanted = ck.names(prefix or "")
        else:
            wanted = list(names)
            unknown = [n for n in wanted if n not in ck.weight_map]
            if unknown:
                raise CheckpointError(f"{folder}: {len(unknown)} requested tensor(s) are not in the checkpoint:\n{_listing(unknown)}")
        return {name: ck.read(name, dtype) for name in wanted}


def _listing(names: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {shown}{more}"


def build_skeleton(source: str | Path | PPLLaVAConfig, attn_implementation: str = "sdpa") -> PPLLaVAForConditionalGeneration:
    """The model for a checkpoint folder (or config) on the meta device: names, shapes, no memory."""
    cfg = source if isinstance(source, PPLLaVAConfig) else load_config(source)
    with torch.device("meta"):
        return PPLLaVAForConditionalGeneration(cfg, attn_implementation=attn_implementation)


def _rebuild_meta_buffers(module: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild modules that still hold meta ones."""
    for name, sub in list(module.named_modules()):
        if hasattr(sub, "config") and any(b.is_meta for b in sub.buffers(recurse=False)):
            fresh = type(sub)(sub.config)  # e.g. LlamaRotaryEmbedding: inv_freq stays fp32
            if name:
                parent, _, attr = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, attr, fresh)


def load_weights(
    model: nn.Module,
    folder: str | Path,
    prefix: str = "",
    dtype: str | torch.dtype = "fp32",
    exclude: tuple[str, ...] = (),
    reader: CheckpointReader | None = None,
) -> nn.Module:
    """Materialise the sub-module of `model` at `prefix` (e.g. "vision_tower", "language_model.model.layers.3")
    with its tensors from the checkpoint; only those tensors are read. Returns the sub-module.

    `model` is usually a `build_skeleton` model on the meta device; `release_weights` sends a sub-module back.
    Tensors whose full name starts with one of `exclude` (e.g. "language_model.model.layers.") are neither read
    nor checked and stay on the meta device. `reader` lets several calls share open shards.

    Raises:
        CheckpointError: tensors under `prefix` are missing, unexpected or of the wrong shape.
    """
    folder = Path(folder)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    module = model.get_submodule(prefix) if prefix else model
    head = f"{prefix}." if prefix else ""
    aliases = tied_aliases(module)  # e.g. lm_head.weight -> model.embed_tokens.weight (tied embeddings): not stored
    expected = {head + k: v for k, v in module.state_dict().items() if not (head + k).startswith(exclude) and k not in aliases}
    ck = reader or CheckpointReader(folder)
    try:
        stored = {k for k in ck.names(head) if not k.startswith(exclude)}
        missing = sorted(set(expected) - stored)
        unexpected = sorted(k for k in stored - set(expected) if not k.endswith(_IGNORABLE_SUFFIXES))
        if missing or unexpected:
            where = f" under '{prefix}'" if prefix else ""
            parts = [f"{folder}: checkpoint tensors{where} do not match the model built from config.json."]
            if missing:
                parts.append(f"Missing {len(missing)} tensor(s):\n{_listing(missing)}")
            if unexpected:
                parts.append(f"Unexpected {len(unexpected)} tensor(s):\n{_listing(unexpected)}")
            parts.append("Hint: check config.json dims (vision_config, text_config, clip_weight) against the shards.")
            raise CheckpointError("\n".join(parts))
        bad = [f"{k}: checkpoint {list(ck.spec(k).shape)} vs model {list(v.shape)}" for k, v in expected.items() if tuple(ck.spec(k).shape) != tuple(v.shape)]
        if bad:
            raise CheckpointError(f"{folder}: tensor shapes do not match config.json:\n{_listing(bad)}")
        state = {k[len(head):]: ck.read(k, torch_dtype) for k in expected}
    finally:
        if reader is None:
            ck.close()
    module.load_state_dict(state, assign=True, strict=not exclude and not aliases)
    for alias, source in aliases.items():  # assign=True replaced the shared parameter: tie again
        parent, _, attr = alias.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, module.get_parameter(source))
    module.to(torch_dtype)
    _rebuild_meta_buffers(module)
    return module


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names that hold the same parameter as an earlier name (tied input/output embeddings:
    `lm_head.weight` -> `model.embed_tokens.weight`). Checkpoints store the earlier name only, as transformers does."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def release_weights(module: nn.Module) -> None:
    """Send a materialised sub-module back to the meta device, freeing its weights (and returning them to the OS).
    The cycle collector runs first: a torch.onnx.export program traced from the module is cyclic garbage still
    holding its parameters (0.86 GB of the SigLIP side at qwen-7b fp16 stayed resident until the next collection)."""
    module.to("meta")
    gc.collect()
    trim_heap()


def load_model(folder: str | Path, dtype: str | torch.dtype = "fp32", attn_implementation: str = "sdpa") -> PPLLaVAForConditionalGeneration:
    """Load a released-layout checkpoint folder into the PyTorch reference model (eval mode).

    bf16/fp16 tensors are upcast to `dtype` (fp32 by default). Missing or unexpected tensors raise
    CheckpointError listing them: nothing is ever left randomly initialised.
    """
    model = build_skeleton(folder, attn_implementation)
    load_weights(model, folder, "", dtype)
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


def write_shards(
    folder: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor | Iterable[torch.Tensor]]],
    num_shards: int = 3,
    progress: ProgressFn | None = None,
) -> None:
    """Stream tensors into `model-0000i-of-0000n.safetensors` shards + `model.safetensors.index.json` like the release.

    `tensors` yields (name, tensor or row chunks) in `specs` order; each is written and dropped before the next is
    asked for, so memory holds one tensor (or one chunk) at a time. `progress(bytes_done, bytes_total)`.
    """
    shards = plan_shards(specs, num_shards)
    total = sum(s.nbytes for s in specs)
    stream = iter(tensors)
    done, n = 0, len(shards)
    weight_map = {}
    for i, group in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        with SafetensorsWriter(folder / file, group) as writer:
            for spec in group:
                name, data = next(stream, (None, None))
                if name != spec.name:
                    raise CheckpointError(f"the tensor stream gave {name!r} where {spec.name!r} was expected")
                done += writer.write(name, data)
                del data
                if progress:
                    progress(done, total)
        weight_map.update({s.name: file for s in group})
    extra = next(stream, None)
    if extra is not None:
        raise CheckpointError(f"the tensor stream has a tensor {extra[0]!r} that no spec declares")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 3) -> None:
    """Write an in-memory state dict as released-layout shards + index (`write_shards` for tensors in memory)."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    write_shards(folder, specs, state.items(), num_shards)
