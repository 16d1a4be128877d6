"""Independent reference implementations used only by tests.

- `port_hidden_states`: the BT-Adapter forward written from the authors' algorithm with einops and transformers'
  own CLIP layers (a different code path from ppllava_edge.model.clip), weights copied from our model.
- `pool_loop`: the per-window triple loop (the authors' reference pooling), in float64.
- `pool_authors_order`: linear_2 on every patch first, then unfold-based pooling, as the authors' projector does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPMLP


def _hf_vision_cfg(cfg) -> CLIPVisionConfig:
    v = cfg.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
    )


class PortTower(torch.nn.Module):
    """BT-Adapter tower from the algorithm description (§3), batch of B=1 video given as [B, T, 3, H, W]."""

    def __init__(self, model):
        super().__init__()
        cfg = model.cfg
        hf = _hf_vision_cfg(cfg)
        hf._attn_implementation = "eager"
        src = model.vision_tower.vision_model
        self.depth = cfg.vision.btadapter_depth
        self.src = src  # embeddings, pre_layrnorm, time embed, cls token come from here (plain parameters)
        self.layers = torch.nn.ModuleList([CLIPEncoderLayer(hf) for _ in range(cfg.vision.num_hidden_layers)])
        for mine, theirs in zip(src.encoder.layers, self.layers):
            theirs.load_state_dict(mine.state_dict())
        self.t_attn = torch.nn.ModuleList([CLIPAttention(hf) for _ in range(self.depth)])
        self.s_attn = torch.nn.ModuleList([CLIPAttention(hf) for _ in range(self.depth)])
        self.s_mlp = torch.nn.ModuleList([CLIPMLP(hf) for _ in range(self.depth)])
        for i in range(self.depth):
            self.t_attn[i].load_state_dict(src.btadapter_T_layers[i].self_attn.state_dict())
            self.s_attn[i].load_state_dict(src.btadapter_S_layers[i].self_attn.state_dict())
            self.s_mlp[i].load_state_dict(src.btadapter_S_layers[i].mlp.state_dict())

    def temporal(self, i, x, T):
        lay = self.src.btadapter_T_layers[i]
        cls, q = x[:, :1], x[:, 1:]
        b, pt, m = q.shape
        h = q.reshape(b * (pt // T), T, m)
        h = self.t_attn[i](lay.layer_norm1(h))[0]
        h = lay.temporal_fc(h).reshape(b, pt, m)
        return torch.cat((cls, q + h), 1)

    def spatial(self, i, x, T):
        lay = self.src.btadapter_S_layers[i]
        res = x
        cls, q = x[:, :1], x[:, 1:]
        b, pt, m = q.shape
        p = pt // T
        cls_rep = cls.unsqueeze(1).repeat(1, T, 1, 1).reshape(b * T, 1, m)
        q = rearrange(q, "b (p t) m -> (b t) p m", p=p, t=T)
        h = self.s_attn[i](lay.layer_norm1(torch.cat((cls_rep, q), 1)))[0]
        cls_out = h[:, :1].reshape(b, T, 1, m).mean(1)
        h = rearrange(h[:, 1:], "(b t) p m -> b (p t) m", p=p, t=T)
        x = res + torch.cat((cls_out, h), 1)
        return x + self.s_mlp[i](lay.layer_norm2(x))

    def init_adapter(self, x, T):
        cls_old = x[:, :, 0].mean(1).unsqueeze(1)
        x = x[:, :, 1:]
        B = x.shape[0]
        x = rearrange(x, "b t l d -> (b t) l d")
        x = torch.cat((self.src.btadapter_cls_token.expand(x.shape[0], 1, -1), x), 1)
        x = x + self.src.embeddings.position_embedding(torch.arange(x.shape[1]))[None]
        cls = x[:B, 0].unsqueeze(1)
        x = rearrange(x[:, 1:], "(b t) l d -> (b l) t d", b=B)
        x = x + self.src.btadapter_time_embed(torch.arange(T))[None]
        x = rearrange(x, "(b l) t d -> b (l t) d", b=B)
        return torch.cat(((cls_old + cls) / 2, x), 1)

    def adapter(self, x1, x2, i, T):
        x1 = rearrange(x1, "(b t) l d -> b t l d", t=T)
        if x2 is not None:
            cls = x1[:, :, 0].mean(1).unsqueeze(1)
            x = x2 + torch.cat((cls, rearrange(x1[:, :, 1:], "b t l d -> b (l t) d")), 1)
        else:
            x = x1
        if i == 0:
            x = self.init_adapter(x, T)
        return self.spatial(i, self.temporal(i, x, T), T)

    @staticmethod
    def combine(x, x2, T):
        p = x.shape[1] - 1
        return torch.cat((x[:, :1], (x[:, 1:] + rearrange(x2[:, 1:], "b (p t) m -> (b t) p m", p=p)) / 2), 1)

    def forward(self, video):  # video [B=1, T, 3, H, W]
        B, T = video.shape[:2]
        x = video.reshape(B * T, *video.shape[2:])
        emb = self.src.embeddings
        pe = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat((emb.class_embedding.expand(B * T, 1, -1), pe), 1) + emb.position_embedding.weight[None]
        x = self.src.pre_layrnorm(x)
        total, states, x2 = len(self.layers), [], None
        for idx, layer in enumerate(self.layers):
            states.append(x if x2 is None else self.combine(x, x2, T))
            x = layer(x, None)
            if idx >= total - self.depth:
                x2 = self.adapter(x, x2, idx + self.depth - total, T)
        states.append(self.combine(x, x2, T))
        return states


def hf_text_model(model) -> CLIPTextModel:
    """transformers' CLIPTextModel holding our folded 248-row position table (independent text encoder)."""
    ct = model.cfg.clip_text
    hf = CLIPTextModel(CLIPTextConfig(
        vocab_size=ct.vocab_size, hidden_size=ct.hidden_size, intermediate_size=ct.intermediate_size,
        num_hidden_layers=ct.num_hidden_layers, num_attention_heads=ct.num_attention_heads,
        max_position_embeddings=ct.context_length, hidden_act=ct.hidden_act, layer_norm_eps=ct.layer_norm_eps,
        eos_token_id=ct.eos_token_id, bos_token_id=0, pad_token_id=1,
    ))
    mine = model.multi_modal_projector.clip_text_model
    state = {k: v for k, v in mine.state_dict().items() if "position_embedding" not in k}
    state["embeddings.position_embedding.weight"] = mine.embeddings.position_table().detach()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf.eval()


def pool_loop(values, g, kernel, temperature):
    """Direct triple loop over output windows, float64. values [T, h*w, D], g [T, h, w] -> [N, D]."""
    kt, kh, kw = kernel
    T, h, w = g.shape
    v = values.double().reshape(T, h, w, -1)
    gd = g.double()
    out = []
    for t in range(T // kt):
        for i in range(h // kh):
            for j in range(w // kw):
                win_g = gd[t * kt:(t + 1) * kt, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].reshape(-1)
                win_v = v[t * kt:(t + 1) * kt, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].reshape(-1, v.shape[-1])
                a = torch.softmax(win_g / temperature, 0)
                out.append((a[:, None] * win_v).sum(0))
    return torch.stack(out)


def pool_authors_order(features, g, proj, kernel, temperature):
    """Authors' order: H = linear_2(GELU(linear_1(F))) on every patch, then unfold-based weighted pooling."""
    T, P, _ = features.shape
    side = g.shape[1]
    H = proj.linear_2(F.gelu(proj.linear_1(features)))  # [T, P, D]
    H = rearrange(H, "t (w h) d -> 1 d t w h", w=side)
    kt, kh, kw = kernel
    x = H.unfold(2, kt, kt).unfold(3, kh, kh).unfold(4, kw, kw)
    n, c, od, oh, ow = x.shape[:5]
    x = x.contiguous().view(n, c, od, oh, ow, -1)
    wts = g[None].unfold(1, kt, kt).unfold(2, kh, kh).unfold(3, kw, kw).contiguous().view(n, od, oh, ow, -1)
    wts = torch.softmax(wts / temperature, dim=-1)
    out = (x * wts.unsqueeze(1)).sum(-1)  # [1, D, T', h', w']
    return rearrange(out, "1 d t w h -> (t w h) d")
