"""The LocTex objective (DESIGN §3): contrastive + ``loss.localization_weight`` x localization.

``LocTexLoss(cfg.loss)(out, batch)`` takes what ``LocTexModel.forward`` returns (embeddings,
queries, keys, the learned log temperature) and the §2.4 batch, and returns

    loss               contrastive + localization_weight * localization   (what to backward)
    loss_contrastive   symmetric InfoNCE over the global batch (every rank's rows)
    loss_localization  KL (or ce/l1/mse) between the rendered traces and the cross-modal attention;
                       a constant 0 when localization_weight == 0 (then it is not computed)
    logit_scale_exp    exp(logit_scale) clamped at 100: the logit multiplier the loss used (detached)
    num_loc_targets    tokens of the batch with loc_mask set (detached int64)

Both terms go through ``loctex.kernels``, so the fused kernels replace the references transparently.
Whether the negatives span all ranks is decided here and only here: ``global_negatives()``.
"""
from __future__ import annotations

import torch
from torch import nn

import loctex.kernels as K

from .config import LossConfig


def global_negatives() -> bool:
    """True when torch.distributed runs with more than one rank: every rank's captions and images
    are then negatives of every other rank's (DESIGN §3, "Distributed")."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalized [N, D] embeddings, over the global batch when distributed."""
    if global_negatives():
        return K.distributed_contrastive_loss(image_emb, text_emb, logit_scale)
    return K.contrastive_loss(image_emb, text_emb, logit_scale)


class LocTexLoss(nn.Module):
    """The objective, configured by ``cfg.loss``; it holds no parameters (the learned temperature
    is the model's and arrives in ``out["logit_scale"]``)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.localization_weight = float(cfg.localization_weight)
        self.localization_type = cfg.localization_type
        self.sigma = float(cfg.sigma)

    def localization_loss(self, out: dict, batch: dict) -> torch.Tensor:
        return K.trace_attention_loss(
            out["queries"], out["keys"], batch["points_xy"], batch["point_weights"],
            batch["token_ranges"], batch["loc_mask"], out["grid_hw"], self.sigma,
            scale=out["attention_scale"], loss_type=self.localization_type)

    def forward(self, out: dict, batch: dict) -> dict:
        loss_contrastive = contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
        if self.localization_weight > 0:
            loss_localization = self.localization_loss(out, batch)
            loss = loss_contrastive + self.localization_weight * loss_localization
        else:
            loss_localization = torch.zeros((), device=loss_contrastive.device)
            loss = loss_contrastive
        return {
            "loss": loss,
            "loss_contrastive": loss_contrastive,
            "loss_localization": loss_localization,
            "logit_scale_exp": out["logit_scale"].detach().float().exp()
                                   .clamp(max=K.reference.MAX_LOGIT_SCALE),
            "num_loc_targets": batch["loc_mask"].sum().detach(),
        }


def build_loss(cfg) -> LocTexLoss:
    """The objective of a full ``Config`` (reads ``cfg.loss``)."""
    return LocTexLoss(cfg.loss)
