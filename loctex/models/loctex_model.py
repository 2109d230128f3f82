"""The LocTex model: visual backbone + textual backbone + heads. The objective is
``loctex.losses.LocTexLoss``; the model computes what it needs.

``forward(batch)`` consumes the batch contract of DESIGN §2.4 and returns

    image_emb, text_emb  L2-normalized [B, embed_dim], in the heads' dtype (bf16 under bf16)
    logit_scale        the learned log temperature, a 0-dim tensor made in this forward (under
                       ZeRO-3 the parameter itself is released once forward returns)
    queries            [B, L, attention_dim] cross-modal attention queries (one per token)
    keys               [B, H*W, attention_dim] keys of the stride-32 grid cells, row-major (h, w)
    grid_hw            (H, W) of that grid
    attention_scale    the attention's logit multiplier (a float): A = softmax(scale · q·k)
    attention          [B, L, H, W] attention maps, only with ``forward(batch, return_attention=True)``
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

import loctex.kernels as K

from .heads import AttentionHead, ContrastiveHead
from .resnet import build_resnet
from .text import TextEncoder

if TYPE_CHECKING:  # loctex.config imports the backbone registry from here
    from loctex.config import Config, OptimConfig


class LocTexModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, pad_token_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.visual = build_resnet(m.visual, zero_init_residual=m.zero_init_residual)
        # fc is there only so the state-dict keys are torchvision's; pre-training never uses it,
        # and a trainable parameter without a gradient trips DDP / ZeRO.
        self.visual.fc.requires_grad_(False)
        self.text = TextEncoder(m.text, vocab_size, pad_token_id)
        visual_dim, text_dim = self.visual.out_channels, m.text.width
        self.contrastive = ContrastiveHead(visual_dim, text_dim, m.embed_dim, m.logit_scale_init)
        self.attention = AttentionHead(visual_dim, text_dim, m.attention_dim)
        if cfg.loss.localization_weight == 0:
            # contrastive-only baseline: keep the head (same checkpoint layout, attention_maps still
            # callable) but frozen, since it gets no gradient
            self.attention.requires_grad_(False)
        self.attention_scale = cfg.loss.attention_scale or 1.0 / math.sqrt(m.attention_dim)
        self.channels_last = False
        if m.channels_last:
            self.set_channels_last()

    def set_channels_last(self, enabled: bool = True) -> "LocTexModel":
        """Keep the visual backbone's weights, and the images it gets, in channels-last (NHWC)
        memory format: what cuDNN's tensor-core convolutions want. Numbers are unchanged."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.visual.to(memory_format=fmt)
        self.channels_last = enabled
        return self

    # ---- encoders ---------------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> (feature map [B, C, S/32, S/32], pooled [B, C]).

        Images are cast to the backbone's dtype (bf16 under DeepSpeed) and memory format."""
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        images = images.to(dtype=self.visual.conv1.weight.dtype, memory_format=fmt)
        return self.visual(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """-> L2-normalized image embeddings [B, embed_dim] (the heads' dtype)."""
        return self.contrastive.embed_image(self.visual_features(images)[1])

    def encode_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> L2-normalized caption embeddings [B, embed_dim] (the heads' dtype)."""
        return self.contrastive.embed_text(self.text(tokens, attention_mask)[1])

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        fmap, pooled = self.visual_features(batch["images"])
        token_feats, caption = self.text(batch["tokens"], batch["attention_mask"])
        queries = self.attention.queries(token_feats)
        keys = self.attention.keys(fmap)
        out = {
            "image_emb": self.contrastive.embed_image(pooled),
            "text_emb": self.contrastive.embed_text(caption),
            "logit_scale": self.contrastive.log_scale(),
            "queries": queries,
            "keys": keys,
            "grid_hw": tuple(fmap.shape[-2:]),
            "attention_scale": self.attention_scale,
        }
        if return_attention:
            out["attention"] = self._attention(queries.detach(), keys.detach(), out["grid_hw"])
        return out

    # ---- evaluation -------------------------------------------------------------------------
    def _attention(self, queries: torch.Tensor, keys: torch.Tensor, grid_hw) -> torch.Tensor:
        logits = K.reference.attention_logits(queries, keys, self.attention_scale)  # float32 accumulation
        B, L = queries.shape[:2]
        return torch.softmax(logits, dim=-1).reshape(B, L, *grid_hw)

    @torch.no_grad()
    def attention_maps(self, batch: dict) -> torch.Tensor:
        """Cross-modal attention ``softmax_{h,w}(scale · q·k)`` of every token: float32 [B, L, H, W]
        on the stride-32 grid (rows of padding tokens are computed too; mask with attention_mask).
        Call ``model.eval()`` first: in train mode BatchNorm would update its running statistics."""
        fmap, _ = self.visual_features(batch["images"])
        token_feats, _ = self.text(batch["tokens"], batch["attention_mask"])
        return self._attention(self.attention.queries(token_feats), self.attention.keys(fmap),
                               tuple(fmap.shape[-2:]))

    # ---- optimizer --------------------------------------------------------------------------
    def param_groups(self, optim: OptimConfig | None = None) -> list[dict]:
        """Optimizer parameter groups, ready for ``torch.optim.AdamW(...)`` or DeepSpeed.

        ``visual`` (visual backbone and all heads, lr = optim.lr), ``textual`` (textual backbone,
        lr = optim.text_lr), each with weight decay, and ``visual_no_decay`` / ``textual_no_decay``
        holding the tensors with ndim < 2 (biases, BatchNorm/LayerNorm weights, logit_scale) at
        weight decay 0. Frozen parameters (``visual.fc``; the attention head in the contrastive-only
        baseline) are left out, and so are empty groups. Each group has a ``name`` key."""
        optim = optim or self.cfg.optim
        buckets: dict[str, list[nn.Parameter]] = {
            "visual": [], "visual_no_decay": [], "textual": [], "textual_no_decay": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            tower = "textual" if name.startswith("text.") else "visual"
            buckets[tower + ("_no_decay" if p.ndim < 2 else "")].append(p)
        groups = []
        for name, params in buckets.items():
            if params:
                groups.append({
                    "name": name, "params": params,
                    "lr": optim.text_lr if name.startswith("textual") else optim.lr,
                    "weight_decay": 0.0 if name.endswith("_no_decay") else optim.weight_decay,
                })
        return groups


def build_model(cfg: Config, vocab_size: int, pad_token_id: int | None = None) -> LocTexModel:
    """The LocTex model for ``cfg``; ``vocab_size`` is the tokenizer's (``tok.get_vocab_size()``).
    ``pad_token_id`` (optional) gives the padding token a fixed zero embedding; padding is masked
    by ``attention_mask`` either way."""
    return LocTexModel(cfg, vocab_size, pad_token_id)
