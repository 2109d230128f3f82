"""The LocTex model: visual backbone + textual backbone + heads, and its training losses.

``forward(batch)`` consumes the batch contract of DESIGN §2.4 and returns

    loss               contrastive + loss.localization_weight * localization   (what to backward)
    loss_contrastive   symmetric InfoNCE over the global batch (all ranks)
    loss_localization  KL (or ce/l1/mse) between trace heat maps and cross-modal attention;
                       a constant 0 when loss.localization_weight == 0 (the compute is skipped)
    logit_scale        exp(logit_scale) clamped at 100, i.e. the temperature the loss used (detached)
    image_emb, text_emb  L2-normalized float32 [B, embed_dim] (detached; for retrieval metrics)
    num_loc_targets    how many tokens of the batch have loc_mask set (detached int64)
    attention          [B, L, H, W] attention maps, only with ``forward(batch, return_attention=True)``

Both losses go through ``loctex.kernels`` so the fused kernels replace the references transparently.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import loctex.kernels as K

from ..config import Config, OptimConfig
from .heads import AttentionHead, ContrastiveHead
from .resnet import build_resnet
from .text import TextEncoder


def _distributed_world() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


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
        self.localization_weight = float(cfg.loss.localization_weight)
        if self.localization_weight == 0:
            # contrastive-only baseline: keep the head (same checkpoint layout, attention_maps still
            # callable) but frozen, since it gets no gradient
            self.attention.requires_grad_(False)
        self.attention_scale = cfg.loss.attention_scale or 1.0 / math.sqrt(m.attention_dim)
        self.channels_last = m.channels_last
        if self.channels_last:
            self.visual.to(memory_format=torch.channels_last)

    # ---- encoders ---------------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> (feature map [B, C, S/32, S/32], pooled [B, C]).

        Images are cast to the backbone's dtype (bf16 under DeepSpeed) and memory format."""
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        images = images.to(dtype=self.visual.conv1.weight.dtype, memory_format=fmt)
        return self.visual(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """-> L2-normalized float32 image embeddings [B, embed_dim]."""
        return self.contrastive.embed_image(self.visual_features(images)[1])

    def encode_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> L2-normalized float32 caption embeddings [B, embed_dim]."""
        return self.contrastive.embed_text(self.text(tokens, attention_mask)[1])

    # ---- losses -----------------------------------------------------------------------------
    def contrastive_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        if _distributed_world() > 1:
            return K.distributed_contrastive_loss(image_emb, text_emb, self.contrastive.log_scale())
        return K.contrastive_loss(image_emb, text_emb, self.contrastive.log_scale())

    def localization_loss(self, batch: dict, token_feats: torch.Tensor, fmap: torch.Tensor):
        loss = self.cfg.loss
        q = self.attention.queries(token_feats)
        k = self.attention.keys(fmap)
        return K.trace_attention_loss(
            q, k, batch["points_xy"], batch["point_weights"], batch["token_ranges"],
            batch["loc_mask"], tuple(fmap.shape[-2:]), loss.sigma,
            scale=self.attention_scale, loss_type=loss.localization_type)

    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        fmap, pooled = self.visual_features(batch["images"])
        token_feats, caption = self.text(batch["tokens"], batch["attention_mask"])
        image_emb = self.contrastive.embed_image(pooled)
        text_emb = self.contrastive.embed_text(caption)

        loss_contrastive = self.contrastive_loss(image_emb, text_emb)
        if self.localization_weight > 0:
            loss_localization = self.localization_loss(batch, token_feats, fmap)
            loss = loss_contrastive + self.localization_weight * loss_localization
        else:
            loss_localization = torch.zeros((), device=loss_contrastive.device)
            loss = loss_contrastive

        out = {
            "loss": loss,
            "loss_contrastive": loss_contrastive,
            "loss_localization": loss_localization,
            "logit_scale": self.contrastive.log_scale().detach().float().exp()
                               .clamp(max=K.reference.MAX_LOGIT_SCALE),
            "image_emb": image_emb.detach(),
            "text_emb": text_emb.detach(),
            "num_loc_targets": batch["loc_mask"].sum().detach(),
        }
        if return_attention:
            out["attention"] = self._attention(token_feats.detach(), fmap.detach())
        return out

    # ---- evaluation -------------------------------------------------------------------------
    def _attention(self, token_feats: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        q = self.attention.queries(token_feats)
        k = self.attention.keys(fmap)
        logits = K.reference.attention_logits(q, k, self.attention_scale)  # float32 accumulation
        B, L = q.shape[:2]
        return torch.softmax(logits, dim=-1).reshape(B, L, *fmap.shape[-2:])

    @torch.no_grad()
    def attention_maps(self, batch: dict) -> torch.Tensor:
        """Cross-modal attention ``softmax_{h,w}(scale · q·k)`` of every token: float32 [B, L, H, W]
        on the stride-32 grid (rows of padding tokens are computed too; mask with attention_mask).
        Call ``model.eval()`` first: in train mode BatchNorm would update its running statistics."""
        fmap, _ = self.visual_features(batch["images"])
        token_feats, _ = self.text(batch["tokens"], batch["attention_mask"])
        return self._attention(token_feats, fmap)

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
