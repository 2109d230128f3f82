"""Metrics of the evaluations, each a small pure function on tensors (tested on hand-made inputs)."""
from __future__ import annotations

import numpy as np
import torch


def half_mass_cells(heat: torch.Tensor) -> torch.Tensor:
    """The smallest set of cells holding at least half of each map's mass: bool [N, H, W].

    ``heat`` [N, H, W] is non-negative; cells are taken in decreasing order of heat (ties in cell
    order) until their cumulative mass reaches half the total."""
    flat = heat.flatten(1).double()
    flat = flat / flat.sum(1, keepdim=True).clamp_min(1e-30)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    mass = torch.gather(flat, 1, order).cumsum(1)
    # a cell is in the set if the mass *before* it is still short of one half
    before = mass - torch.gather(flat, 1, order)
    take = before < 0.5 - 1e-12
    mask = torch.zeros_like(take)
    mask.scatter_(1, order, take)
    return mask.reshape(heat.shape)


def argmax_cells(attn: torch.Tensor) -> torch.Tensor:
    """Index of each map's arg-max cell (row-major): int64 [N]."""
    return attn.flatten(1).argmax(1)


def pointing_hits(attn: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Pointing accuracy's per-map outcome: the attention's arg-max cell lies in the half-mass set
    of the trace heat map. attn, heat [N, H, W] -> bool [N]."""
    idx = argmax_cells(attn)
    return half_mass_cells(heat).flatten(1).gather(1, idx[:, None])[:, 0]


def box_pointing_hits(attn: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Box pointing game: the center of the arg-max cell lies inside the box.

    attn [N, H, W]; boxes [N, 4] as (x0, y0, x1, y1) normalized to the image (0..1) -> bool [N]."""
    N, H, W = attn.shape
    idx = argmax_cells(attn)
    cx = ((idx % W).double() + 0.5) / W
    cy = ((idx // W).double() + 0.5) / H
    b = boxes.double()
    return (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])


def kl_divergence(heat: torch.Tensor, attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(P ‖ A) per map, both [N, H, W] summing to 1 -> float64 [N] (0·log 0 = 0)."""
    P = heat.flatten(1).double()
    A = attn.flatten(1).double().clamp_min(eps)
    return (torch.xlogy(P, P) - P * A.log()).sum(1)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """conf[g, p] = number of pixels of ground-truth class g predicted as p (ignored pixels out)."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    keep = gt != ignore_index
    idx = gt[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN); nan for a class that is neither in the ground truth nor
    predicted (it is left out of the mean)."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, k: int = 1,
                positives: torch.Tensor | None = None) -> float:
    """Fraction of queries whose top-k gallery items (by dot product) hold a positive.

    ``positives`` [Nq, Ng] bool; default: query i matches gallery item i."""
    sims = query.float() @ gallery.float().t()
    if positives is None:
        positives = torch.eye(len(query), len(gallery), dtype=torch.bool)
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return float(positives.gather(1, top).any(1).float().mean())
