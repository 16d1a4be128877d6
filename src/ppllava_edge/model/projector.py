"""The value MLP both projector families share (`linear_1`, GELU, `linear_2`: LLaVA-NeXT's projector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PPLLaVAConfig


class ProjectorMLP(nn.Module):
    """`multi_modal_projector.linear_1` / `linear_2`; subclasses add the relevance side (CLIP or SigLIP)."""

    def __init__(self, cfg: PPLLaVAConfig):
        super().__init__()
        self.cfg = cfg
        dv, dl = cfg.vision.hidden_size, cfg.text.hidden_size
        self.linear_1 = nn.Linear(dv, dl)
        self.linear_2 = nn.Linear(dl, dl)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.projector_hidden_act != "gelu":
            raise NotImplementedError(self.cfg.projector_hidden_act)
        return F.gelu(x)  # exact erf GELU

    def values(self, features: torch.Tensor) -> torch.Tensor:
        """GELU(linear_1(F)): [T, P, D_llm] (linear_2 runs after pooling, §6.1 rewrite)."""
        return self.act(self.linear_1(features))
