"""The in-memory make-checkpoint path as it was before streaming (test oracle only).

`legacy_random_state_dict` is the former `presets.random_state_dict` and `legacy_save_shards` the former
`checkpoint.save_shards` (safetensors' own `save_file`, one whole shard in memory), kept verbatim so the streamed
writer can be compared with them byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def legacy_random_state_dict(model, init_std: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        std = init_std["llm"] if name.startswith("language_model.") else init_std["vision"]
        if name.endswith("logit_scale"):
            t = torch.tensor(math.log(100.0))
        elif "norm" in name or "_ln." in name:
            t = (1.0 + 0.05 * torch.randn(p.shape, generator=gen)) if name.endswith("weight") else 0.02 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            t = std * torch.randn(p.shape, generator=gen)
        state[name] = t.to(torch.float32)
    emb = "multi_modal_projector.clip_text_model.embeddings."
    state[emb + "position_embedding_res"] = state[emb + "position_embedding"].clone()
    return state


def legacy_save_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 3) -> None:
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
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
