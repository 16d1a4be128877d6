"""Prompt-guided pooling (§4, §6.1): relevance softmax over the whole clip, then windowed weighted pooling.

Written with reshape/permute only (no Unfold) so the same code exports to ONNX with a dynamic T.
"""

from __future__ import annotations

import torch


def relevance(
    keys: torch.Tensor, query: torch.Tensor, logit_scale: torch.Tensor, num_frames: int, grid: tuple[int, int], logit_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """g = softmax over all T*P tokens of exp(logit_scale) * <query, key> (+ logit_bias: SigLIP), computed in fp32.

    Args:
        keys: [T*P, E] L2-normalised visual keys.
        query: [E] or [1, E] L2-normalised text query.
        logit_scale: scalar parameter (ln 100 in OpenAI CLIP; whatever the checkpoint stores).
        logit_bias: SigLIP's scalar bias, added before the softmax as the authors' SigLIP projector does (a constant
            shift, so it changes g only through fp32 rounding; kept for faithfulness).
    Returns:
        g: [T, h, w] float32, sums to 1 over the clip.
    """
    logits = keys.float() @ query.float().reshape(-1, 1)  # [T*P, 1]
    logits = logits.reshape(-1) * logit_scale.float().exp()
    if logit_bias is not None:
        logits = logits + logit_bias.float()
    return torch.softmax(logits, dim=0).reshape(num_frames, grid[0], grid[1])


def pool_windows(values: torch.Tensor, g: torch.Tensor, kernel: tuple[int, int, int], temperature: float) -> torch.Tensor:
    """Weighted pooling with kernel == stride: per window softmax(g / temperature), then sum of weights * values.

    Args:
        values: [T, h*w, D] per-patch values (any float dtype).
        g: [T, h, w] float32 relevance.
        kernel: (kt, kh, kw); T is floored to a multiple of kt (an odd T drops its last frame, as the authors' unfold).
    Returns:
        [T' * h/kh * w/kw, D] in (t', row, col) order, dtype of `values`.
    """
    kt, kh, kw = kernel
    t, hh, ww = g.shape
    d = values.shape[-1]
    t_out = t // kt
    h_out, w_out = hh // kh, ww // kw
    v = values[: t_out * kt].reshape(t_out, kt, h_out, kh, w_out, kw, d)
    v = v.permute(0, 2, 4, 1, 3, 5, 6).reshape(t_out * h_out * w_out, kt * kh * kw, d)
    w = g[: t_out * kt].reshape(t_out, kt, h_out, kh, w_out, kw)
    w = w.permute(0, 2, 4, 1, 3, 5).reshape(t_out * h_out * w_out, kt * kh * kw)
    w = torch.softmax(w.float() / temperature, dim=-1).to(v.dtype)
    return torch.bmm(w.unsqueeze(1), v).squeeze(1)
