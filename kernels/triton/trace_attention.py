"""Fused trace-attention loss (DESIGN §3) in Triton.

One program per (image b, block of BLOCK_L tokens) walks the grid in tiles of BLOCK_N cells:

* forward: logits ``z = scale · q kᵀ`` of a tile (one ``tl.dot`` over the whole D), an online
  log-sum-exp over the grid, the target rendered on the fly from each token's own point range, and
  running sums from which the loss follows without a second look at the tile:
  ``kl = Σ R log R / S − log S − Σ R z / S + lse``, ``ce = −Σ R z / S + lse`` (S = ΣR). l1 and mse
  need ``A = exp(z − lse)``, i.e. the final lse, so they walk the grid a second time, and also sum
  ``T = Σ_n (dℓ/dA_n) A_n`` for the backward.
* saved for backward: per token lse, S and T — never the [B, L, H·W] logits or heat maps.
* backward: recomputes z, A and P tile by tile; ``dℓ/dz = A − P`` (kl, ce) or
  ``A ∘ (dℓ/dA − T)`` (l1: dℓ/dA = sign(A − P); mse: 2(A − P)); ``dq`` accumulates in registers
  and ``dk`` (shared by the L tokens of an image) is added with atomics in float32.

Inputs bf16/fp16/fp32 (float64 is computed in float32), float32 accumulation; fp32 operands use
exact fp32 dots. The fused path does not differentiate w.r.t. ``points_xy``/``point_weights``
(data, not parameters, in training); asking for it raises — the reference and the C++ op do.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import LOSS_TYPES, RENDER_EPS
from .render import cell_centers, trace_tensors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOSS_CODE = {name: i for i, name in enumerate(LOSS_TYPES)}  # kl 0, ce 1, l1 2, mse 3


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16/fp16 tiles as raw integers (triton 3.x); upcasting there is
    # exact (products of 16-bit floats are exact in float32). On the GPU, 16-bit operands go to
    # the tensor cores and fp32 ones take exact ("ieee") fp32 dots.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _render_block(points_ptr, weights_ptr, start, count, max_count, cx, cy, neg_inv_2s2,
                  BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    """R [BLOCK_L, BLOCK_N] for the tokens' point ranges [start, start + count) at centers cx, cy."""
    R = tl.zeros([BLOCK_L, BLOCK_N], tl.float32)
    for j in range(0, max_count):
        has = j < count
        idx = start + j
        px = tl.load(points_ptr + 2 * idx, mask=has, other=0.0)
        py = tl.load(points_ptr + 2 * idx + 1, mask=has, other=0.0)
        w = tl.load(weights_ptr + idx, mask=has, other=0.0)
        dx = px[:, None] - cx[None, :]
        dy = py[:, None] - cy[None, :]
        R += tl.where(has[:, None], w[:, None] * tl.exp((dx * dx + dy * dy) * neg_inv_2s2), 0.0)
    return R


@triton.jit
def _token_block(q_ptr, ranges_ptr, pid_b, pid_l, L, D,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The block's token ids, their mask, q tile [BLOCK_L, BLOCK_D] and point ranges."""
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    tok = pid_b * L + offs_l
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=mask_l[:, None] & (offs_d < D)[None, :], other=0.0)
    start = tl.load(ranges_ptr + 2 * tok, mask=mask_l, other=0)
    end = tl.load(ranges_ptr + 2 * tok + 1, mask=mask_l, other=0)
    count = tl.maximum(end - start, 0)
    return tok, mask_l, q, start, count


@triton.jit
def _logits_tile(q, k_ptr, pid_b, n0, N, D, scale,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The grid tile [n0, n0 + BLOCK_N): cell ids, mask, k tile and z = scale·q kᵀ (-inf off grid)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + (pid_b.to(tl.int64) * N + offs_n)[:, None] * D + offs_d[None, :],
                mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
    z = _dot(q, tl.trans(k), UPCAST) * scale
    z = tl.where(mask_n[None, :], z, float("-inf"))
    return offs_n, mask_n, k, z


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, points_ptr, weights_ptr, ranges_ptr,
                loss_ptr, lse_ptr, sum_r_ptr, t_ptr,
                L, N, D, H, W, scale, neg_inv_2s2,
                LOSS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(1)
    tok, mask_l, q, start, count = _token_block(q_ptr, ranges_ptr, pid_b, pid_l, L, D,
                                                BLOCK_L, BLOCK_D)
    max_count = tl.max(count, axis=0)
    m_i = tl.full([BLOCK_L], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_L], tl.float32)
    sum_r = tl.zeros([BLOCK_L], tl.float32)
    sum_rz = tl.zeros([BLOCK_L], tl.float32)
    sum_rlogr = tl.zeros([BLOCK_L], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n, k, z = _logits_tile(q, k_ptr, pid_b, n0, N, D, scale,
                                            BLOCK_N, BLOCK_D, UPCAST)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        cx, cy = cell_centers(offs_n, H, W)
        R = _render_block(points_ptr, weights_ptr, start, count, max_count, cx, cy, neg_inv_2s2,
                          BLOCK_L, BLOCK_N)
        R = tl.where(mask_n[None, :], R, 0.0)
        sum_r += tl.sum(R, axis=1)
        if LOSS <= 1:
            sum_rz += tl.sum(R * tl.where(R > 0, z, 0.0), axis=1)  # z = -inf off the grid
        if LOSS == 0:
            sum_rlogr += tl.sum(tl.where(R > 0, R * tl.log(tl.where(R > 0, R, 1.0)), 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    S = tl.where(sum_r > 0, sum_r, 1.0)
    t_term = tl.zeros([BLOCK_L], tl.float32)
    if LOSS <= 1:
        loss = lse - sum_rz / S
        if LOSS == 0:
            loss += sum_rlogr / S - tl.log(S)
    else:
        loss = tl.zeros([BLOCK_L], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n, mask_n, k, z = _logits_tile(q, k_ptr, pid_b, n0, N, D, scale,
                                                BLOCK_N, BLOCK_D, UPCAST)
            cx, cy = cell_centers(offs_n, H, W)
            R = _render_block(points_ptr, weights_ptr, start, count, max_count, cx, cy,
                              neg_inv_2s2, BLOCK_L, BLOCK_N)
            A = tl.exp(z - lse[:, None])                       # 0 off the grid
            d = tl.where(mask_n[None, :], A - R / S[:, None], 0.0)
            if LOSS == 2:
                loss += tl.sum(tl.abs(d), axis=1)
                t_term += tl.sum(tl.where(d > 0, A, tl.where(d < 0, -A, 0.0)), axis=1)
            else:
                loss += tl.sum(d * d, axis=1)
                t_term += tl.sum(2.0 * d * A, axis=1)
    tl.store(loss_ptr + tok, loss, mask=mask_l)
    tl.store(lse_ptr + tok, lse, mask=mask_l)
    tl.store(sum_r_ptr + tok, sum_r, mask=mask_l)
    tl.store(t_ptr + tok, t_term, mask=mask_l)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, points_ptr, weights_ptr, ranges_ptr,
                lse_ptr, sum_r_ptr, t_ptr, coef_ptr, dq_ptr, dk_ptr,
                L, N, D, H, W, scale, neg_inv_2s2,
                LOSS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(1)
    tok, mask_l, q, start, count = _token_block(q_ptr, ranges_ptr, pid_b, pid_l, L, D,
                                                BLOCK_L, BLOCK_D)
    # coef = upstream gradient / n_valid for a valid target, else 0 (then dz = 0)
    coef = tl.load(coef_ptr + tok, mask=mask_l, other=0.0)
    count = tl.where(coef != 0, count, 0)
    max_count = tl.max(count, axis=0)
    lse = tl.load(lse_ptr + tok, mask=mask_l, other=0.0)
    S = tl.load(sum_r_ptr + tok, mask=mask_l, other=1.0)
    S = tl.where(S > 0, S, 1.0)
    t_term = tl.load(t_ptr + tok, mask=mask_l, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dq = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n, k, z = _logits_tile(q, k_ptr, pid_b, n0, N, D, scale,
                                            BLOCK_N, BLOCK_D, UPCAST)
        cx, cy = cell_centers(offs_n, H, W)
        R = _render_block(points_ptr, weights_ptr, start, count, max_count, cx, cy, neg_inv_2s2,
                          BLOCK_L, BLOCK_N)
        A = tl.exp(z - lse[:, None])
        P = R / S[:, None]
        if LOSS <= 1:
            dz = A - P
        elif LOSS == 2:
            dz = A * (tl.where(A > P, 1.0, tl.where(A < P, -1.0, 0.0)) - t_term[:, None])
        else:
            dz = A * (2.0 * (A - P) - t_term[:, None])
        dz = tl.where(mask_n[None, :] & (coef != 0)[:, None], dz * (coef * scale)[:, None], 0.0)
        dz = dz.to(k.dtype)
        dq += _dot(dz, k, UPCAST)
        dk = _dot(tl.trans(dz), q, UPCAST)
        tl.atomic_add(dk_ptr + (pid_b.to(tl.int64) * N + offs_n)[:, None] * D + offs_d[None, :],
                      dk, mask=mask_n[:, None] & mask_d[None, :])
    tl.store(dq_ptr + tok.to(tl.int64)[:, None] * D + offs_d[None, :], dq,
             mask=mask_l[:, None] & mask_d[None, :])


def _config(L: int, N: int, D: int):
    """Tiles: a block of tokens (tl.dot needs >= 16 rows), a grid tile, the whole D in one block.
    Not autotuned yet: chosen without a GPU at hand."""
    block_l = 16 if L <= 16 else 32
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_d = max(16, triton.next_power_of_2(D))
    return block_l, block_n, block_d


class _TraceAttentionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, pts, wts, ranges, loc_mask, grid_hw, sigma, scale, loss_type):
        B, L, D = q.shape
        H, W = grid_hw
        N = H * W
        block_l, block_n, block_d = _config(L, N, D)
        stats = torch.empty(4, B * L, device=q.device, dtype=torch.float32)
        per_token, lse, sum_r, t_term = stats
        args = (L, N, D, H, W, float(scale), -1.0 / (2.0 * float(sigma) ** 2))
        meta = dict(LOSS=_LOSS_CODE[loss_type], BLOCK_L=block_l, BLOCK_N=block_n, BLOCK_D=block_d,
                    UPCAST=_INTERPRET and q.dtype != torch.float32,
                    num_warps=4 if block_d <= 128 else 8)
        if B * L > 0:
            _fwd_kernel[(B, triton.cdiv(L, block_l))](
                q, k, pts, wts, ranges, per_token, lse, sum_r, t_term, *args, **meta)
        valid = loc_mask.reshape(-1) & (sum_r > RENDER_EPS)
        n_valid = valid.sum().clamp_min(1)
        loss = torch.where(valid, per_token, 0.0).sum() / n_valid
        ctx.save_for_backward(q, k, pts, wts, ranges, lse, sum_r, t_term, valid)
        ctx.args, ctx.meta = args, meta
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, k, pts, wts, ranges, lse, sum_r, t_term, valid = ctx.saved_tensors
        B, L, D = q.shape
        N = k.shape[1]
        coef = torch.where(valid, grad.float() / valid.sum().clamp_min(1), 0.0)
        dq = torch.empty(B, L, D, device=q.device, dtype=torch.float32)
        dk = torch.zeros(B, N, D, device=q.device, dtype=torch.float32)
        if B * L > 0:
            _bwd_kernel[(B, triton.cdiv(L, ctx.meta["BLOCK_L"]))](
                q, k, pts, wts, ranges, lse, sum_r, t_term, coef, dq, dk, *ctx.args, **ctx.meta)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None, None, None, None


def trace_attention_loss_triton(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_hw,
                                sigma, scale=1.0, loss_type="kl"):
    """Scalar localization loss of DESIGN §3 (float32; float64 for float64 inputs).
    Differentiable w.r.t. q and k."""
    if loss_type not in _LOSS_CODE:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    H, W = int(grid_hw[0]), int(grid_hw[1])
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q must be [B, L, D] and k [B, H*W, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape[1] != H * W:
        raise ValueError(f"k has {k.shape[1]} cells but grid_hw={(H, W)}")
    if torch.is_grad_enabled() and (points_xy.requires_grad or point_weights.requires_grad):
        raise NotImplementedError(
            "trace_attention_loss(provider='triton') has no gradient w.r.t. points_xy or "
            "point_weights; use provider='reference' (or 'cpp' on CPU) for that")
    out_dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    compute = torch.float32 if q.dtype == torch.float64 or k.dtype == torch.float64 else None
    q_in = q.to(compute) if compute else q
    k_in = k.to(compute if compute else q.dtype)
    pts, wts, ranges = trace_tensors(points_xy, point_weights, token_ranges)
    loss = _TraceAttentionLoss.apply(q_in.contiguous(), k_in.contiguous(), pts, wts, ranges,
                                     loc_mask.reshape(q.shape[:2]).bool(), (H, W), float(sigma),
                                     float(scale), loss_type)
    return loss.to(out_dtype)
