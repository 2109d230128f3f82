"""Heads on top of the two backbones.

* ``ContrastiveHead``: linear projections of the pooled image vector and the caption vector into the
  shared embedding (``model.embed_dim``), L2-normalized, and the learned ``logit_scale`` (CLIP's
  init ``log(1/0.07)``; the clamp ``exp(logit_scale) <= 100`` happens inside the loss, DESIGN §3).
* ``AttentionHead``: cross-modal attention projections, queries from the token features and keys
  from the cells of the stride-32 feature map, both of width ``model.attention_dim``. The softmax
  over cells lives in the loss (``K.trace_attention_loss``) and in ``attention_maps``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveHead(nn.Module):
    def __init__(self, visual_dim: int, text_dim: int, embed_dim: int, logit_scale_init: float):
        super().__init__()
        self.image_proj = nn.Linear(visual_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        # shape [1], not []: DeepSpeed broadcasts and partitions parameters through byte views
        # (``p.data.view(torch.uint8)``), which a 0-dim tensor cannot take
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init)))

    def log_scale(self) -> torch.Tensor:
        """The learned log temperature as a new 0-dim tensor (what the losses take). A copy, not a
        view: ZeRO-3 frees the parameter's storage once the forward that read it returns."""
        return self.logit_scale[0].clone()

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, C] -> L2-normalized [B, embed_dim] in the head's dtype."""
        return _unit(self.image_proj(pooled))

    def embed_text(self, caption: torch.Tensor) -> torch.Tensor:
        """[B, W] -> L2-normalized [B, embed_dim] in the head's dtype."""
        return _unit(self.text_proj(caption))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1, the norm taken in float32; returned in ``x``'s dtype, so that under
    bf16 the contrastive kernel reads bf16 (half the bytes, tensor-core MMAs; it accumulates in
    float32 either way)."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


class AttentionHead(nn.Module):
    def __init__(self, visual_dim: int, text_dim: int, attention_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(text_dim, attention_dim)
        self.key_proj = nn.Linear(visual_dim, attention_dim)

    def queries(self, token_feats: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> [B, L, attention_dim]."""
        return self.query_proj(token_feats)

    def keys(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, H, W] -> [B, H*W, attention_dim], cells row-major (h, w) as in the
        reference's grid. ``permute`` then ``reshape`` is a view for channels-last maps."""
        B, C, H, W = fmap.shape
        cells = fmap.permute(0, 2, 3, 1).reshape(B, H * W, C)
        return self.key_proj(cells)
