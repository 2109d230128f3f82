"""Plain-PyTorch definitions of the LocTex losses (DESIGN §3): the ground truth.

Every fast path (Triton on CUDA, C++ on CPU) is tested against these in float64. They are written
to be read, not to be fast: vectorized, with the big [B, L, H*W] intermediates materialized.
Computation happens in float32 or wider (float64 inputs stay float64); outputs are float32 unless
the inputs are float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ΣR must exceed this for a rendered token to count as a target (DESIGN §3).
RENDER_EPS = 1e-6
LOSS_TYPES = ("kl", "ce", "l1", "mse")
MAX_LOGIT_SCALE = 100.0


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def grid_centers(grid_hw: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """Cell centers ``c(h, w) = ((w + 0.5) / W, (h + 0.5) / H)``, row-major, shape [H*W, 2] (x, y)."""
    H, W = grid_hw
    ys = (torch.arange(H, dtype=dtype, device=device) + 0.5) / H
    xs = (torch.arange(W, dtype=dtype, device=device) + 0.5) / W
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)


def render_unnormalized(points_xy, point_weights, token_ranges, grid_hw, sigma):
    """``R(h, w) = Σ_i w_i exp(-‖p_i - c(h, w)‖² / 2σ²)`` per token: returns [B, L, H*W]."""
    B, L = token_ranges.shape[:2]
    H, W = grid_hw
    dtype = _acc_dtype(points_xy, point_weights)
    ranges = token_ranges.reshape(-1, 2).long()
    counts = (ranges[:, 1] - ranges[:, 0]).clamp(min=0)
    token_of = torch.repeat_interleave(torch.arange(B * L, device=ranges.device), counts)
    # index of each (token, point) pair into points_xy: start of its token + rank inside the range
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(int(counts.sum()), device=ranges.device) - first[token_of]
    point_of = ranges[token_of, 0] + rank
    p = points_xy.to(dtype)[point_of]                           # [M, 2]
    w = point_weights.to(dtype)[point_of]                       # [M]
    c = grid_centers(grid_hw, dtype, points_xy.device)          # [HW, 2]
    d2 = ((p[:, None, :] - c[None, :, :]) ** 2).sum(-1)         # [M, HW]
    g = w[:, None] * torch.exp(-d2 / (2.0 * sigma * sigma))
    heat = torch.zeros(B * L, H * W, dtype=dtype, device=points_xy.device)
    heat = heat.index_add(0, token_of, g)
    return heat.reshape(B, L, H * W)


def render_traces(points_xy, point_weights, token_ranges, grid_hw, sigma):
    """Rendered, normalized target heat maps ``P = R / ΣR``.

    Returns ``(heat [B, L, H, W], valid [B, L] bool)``; a token whose ΣR <= RENDER_EPS (no points,
    or all weight far away) is not valid and its heat map is all zeros.
    """
    B, L = token_ranges.shape[:2]
    H, W = grid_hw
    R = render_unnormalized(points_xy, point_weights, token_ranges, grid_hw, sigma)
    total = R.sum(-1)
    valid = total > RENDER_EPS
    P = torch.where(valid[..., None], R / total.clamp_min(RENDER_EPS)[..., None], torch.zeros_like(R))
    out_dtype = torch.float64 if P.dtype == torch.float64 else torch.float32
    return P.reshape(B, L, H, W).to(out_dtype), valid


def localization_divergence(P, log_A, loss_type: str):
    """Per-token loss between target P and attention A = exp(log_A), both [..., H*W].

    kl:  Σ P (log P − log A)          (0·log 0 = 0)
    ce:  −Σ P log A                   (KL plus the target's entropy; same gradient in A)
    l1:  Σ |A − P|
    mse: Σ (A − P)²
    Sums run over grid cells; the caller averages over valid tokens.
    """
    if loss_type == "kl":
        # P log P with 0 log 0 = 0 *and a finite gradient*: cells where a far-away trace underflows
        # to exactly 0 are common, and xlogy's gradient there is 0/0 = NaN (for points/weights).
        positive = P > 0
        p_log_p = torch.where(positive, P * torch.where(positive, P, torch.ones_like(P)).log(), 0.0)
        return (p_log_p - P * log_A).sum(-1)
    if loss_type == "ce":
        return -(P * log_A).sum(-1)
    if loss_type == "l1":
        return (log_A.exp() - P).abs().sum(-1)
    if loss_type == "mse":
        return ((log_A.exp() - P) ** 2).sum(-1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def attention_logits(q, k, scale: float = 1.0):
    """``scale · ⟨q_{b,t}, k_{b,h,w}⟩``: q [B, L, D], k [B, HW, D] -> [B, L, HW] (accumulation dtype)."""
    dtype = _acc_dtype(q, k)
    return scale * torch.einsum("bld,bnd->bln", q.to(dtype), k.to(dtype))


def trace_attention_loss(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_hw, sigma,
                         scale: float = 1.0, loss_type: str = "kl"):
    """Mean over valid targets (loc_mask and ΣR > eps) of the divergence between the rendered trace
    P and the attention ``A = softmax_{h,w}(scale · q·k)``; 0 (still differentiable) when none."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    B, L, _ = q.shape
    if k.shape[1] != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"k has {k.shape[1]} cells but grid_hw={tuple(grid_hw)}")
    P, valid = render_traces(points_xy, point_weights, token_ranges, grid_hw, sigma)
    log_A = torch.log_softmax(attention_logits(q, k, scale), dim=-1)
    dtype = torch.promote_types(P.dtype, log_A.dtype)  # float64 if any floating input is
    P, log_A = P.reshape(B, L, -1).to(dtype), log_A.to(dtype)
    per_token = localization_divergence(P, log_A, loss_type)
    valid = valid & loc_mask.bool()
    n = valid.sum()
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / n.clamp_min(1)
    return loss if loss.dtype == torch.float64 else loss.float()


def contrastive_logits(image_emb, text_emb, logit_scale):
    dtype = _acc_dtype(image_emb, text_emb)
    s = torch.exp(logit_scale.to(dtype)).clamp(max=MAX_LOGIT_SCALE)
    return s * image_emb.to(dtype) @ text_emb.to(dtype).t()


def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE: ``½ (CE(s·I Tᵀ, arange N) + CE(s·T Iᵀ, arange N))``, s = exp(logit_scale) ≤ 100.

    The embeddings must already be L2-normalized (the op does not normalize)."""
    logits = contrastive_logits(image_emb, text_emb, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return loss if loss.dtype == torch.float64 else loss.float()


def distributed_contrastive_loss(image_emb, text_emb, logit_scale, group=None):
    """The contrastive loss over the *global* batch (every rank's rows, in rank order).

    Each rank scores its local rows against the gathered global columns (open_clip's
    ``gather_with_grad`` + local loss). The returned *value* is the single-process loss on the
    concatenated batch, identical on every rank. The *gradients* are in data-parallel form: averaged
    over the ranks, as DDP/DeepSpeed average parameter gradients, they equal the single-process
    gradients. (So a rank's gradient w.r.t. its own embeddings is world_size × its slice of the
    single-process gradient, and the replicated ``logit_scale`` gets its local rows' share × world.)
    """
    import torch.distributed as dist

    from .distributed import gather_rows_with_grad, rank_offset_and_total

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss(image_emb, text_emb, logit_scale)
    _, world, offset, _ = rank_offset_and_total(image_emb.shape[0], group)
    all_image = gather_rows_with_grad(image_emb, group)
    all_text = gather_rows_with_grad(text_emb, group)
    n = image_emb.shape[0]
    labels = torch.arange(offset, offset + n, device=image_emb.device)
    i2t = contrastive_logits(image_emb, all_text, logit_scale)       # local images vs all captions
    t2i = contrastive_logits(text_emb, all_image, logit_scale)       # local captions vs all images
    local = 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels))
    global_value = local.detach().clone()
    dist.all_reduce(global_value, group=group)
    global_value /= world
    loss = local + (global_value - local.detach())  # value: global loss; gradient: local mean
    return loss if loss.dtype == torch.float64 else loss.float()
