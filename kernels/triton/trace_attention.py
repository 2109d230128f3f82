"""Fused trace-attention loss (DESIGN §3) in Triton.

One program per (image b, block of BLOCK_L tokens) walks the grid in tiles of BLOCK_N cells:

* forward: logits ``z = scale · q kᵀ`` of a tile (a K-loop over D), an online
  log-sum-exp over the grid, the target rendered on the fly from each token's own point range, and
  running sums from which the loss follows without a second look at the tile:
  ``kl = Σ R log R / S − log S − Σ R z / S + lse``, ``ce = −Σ R z / S + lse`` (S = ΣR). l1 and mse
  need ``A = exp(z − lse)``, i.e. the final lse, so they walk the grid a second time, and also sum
  ``T = Σ_n (dℓ/dA_n) A_n`` for the backward.
* saved for backward: per token lse, S and T — never the [B, L, H·W] logits or heat maps.
* backward: recomputes z, A and P tile by tile; ``dℓ/dz = A − P`` (kl, ce) or
  ``A ∘ (dℓ/dA − T)`` (l1: dℓ/dA = sign(A − P); mse: 2(A − P)); ``dq += dz k`` and ``dk += dzᵀ q``
  go out a D step at a time with relaxed float32 atomics (nothing reads them back; dk is shared
  by the image's token blocks, and dq in registers would grow with D). Their order, hence the
  gradients' last bits, varies from run to run on a GPU.

Every tile is a fixed size whatever D is: the products walk D in steps (``D_STEP_BYTES``), so one
kernel per loss type and dtype serves every D without spilling. The loss and its backward are
torch custom ops (``loctex::trace_attention_loss_triton[_backward]``): ``torch.compile`` traces
through them without a graph break.

Inputs bf16/fp16/fp32 (float64 is computed in float32), float32 accumulation; fp32 operands use
3xTF32 dots on the tensor cores (``common.dot``). The fused path does not differentiate w.r.t.
``points_xy``/``point_weights`` (data, not parameters, in training); asking for it raises — the
reference and the C++ op do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import LOSS_TYPES, RENDER_EPS
from .common import INTERPRET, dot
from .render import cell_centers, trace_tensors

_LOSS_CODE = {name: i for i, name in enumerate(LOSS_TYPES)}  # kl 0, ce 1, l1 2, mse 3


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
def _token_block(ranges_ptr, pid_b, pid_l, L, BLOCK_L: tl.constexpr):
    """The block's token ids, their mask and point ranges."""
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    tok = pid_b * L + offs_l
    start = tl.load(ranges_ptr + 2 * tok, mask=mask_l, other=0)
    end = tl.load(ranges_ptr + 2 * tok + 1, mask=mask_l, other=0)
    count = tl.maximum(end - start, 0)
    return tok, mask_l, start, count


@triton.jit
def _logits_tile(q_ptr, k_ptr, tok, mask_l, pid_b, n0, N, D, scale, BLOCK_L: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """The grid tile [n0, n0 + BLOCK_N): cell ids, mask and z = scale·q kᵀ (-inf off grid),
    a K-loop over D in steps of BLOCK_D (q's rows come back from L1 at every tile)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q_rows = q_ptr + tok.to(tl.int64)[:, None] * D
    k_rows = k_ptr + (pid_b.to(tl.int64) * N + offs_n)[:, None] * D
    z = tl.zeros([BLOCK_L, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(q_rows + offs_d[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        z += dot(q, tl.trans(k), INTERPRET)
    z = tl.where(mask_n[None, :], z * scale, float("-inf"))
    return offs_n, mask_n, z


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, points_ptr, weights_ptr, ranges_ptr,
                loss_ptr, lse_ptr, sum_r_ptr, t_ptr,
                L, N, D, H, W, scale, neg_inv_2s2,
                LOSS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(1)
    tok, mask_l, start, count = _token_block(ranges_ptr, pid_b, pid_l, L, BLOCK_L)
    max_count = tl.max(count, axis=0)
    m_i = tl.full([BLOCK_L], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_L], tl.float32)
    sum_r = tl.zeros([BLOCK_L], tl.float32)
    sum_rz = tl.zeros([BLOCK_L], tl.float32)
    sum_rlogr = tl.zeros([BLOCK_L], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n, z = _logits_tile(q_ptr, k_ptr, tok, mask_l, pid_b, n0, N, D, scale,
                                         BLOCK_L, BLOCK_N, BLOCK_D, INTERPRET)
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
            offs_n, mask_n, z = _logits_tile(q_ptr, k_ptr, tok, mask_l, pid_b, n0, N, D, scale,
                                             BLOCK_L, BLOCK_N, BLOCK_D, INTERPRET)
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
                BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(1)
    tok, mask_l, start, count = _token_block(ranges_ptr, pid_b, pid_l, L, BLOCK_L)
    # coef = upstream gradient / n_valid for a valid target, else 0 (then dz = 0)
    coef = tl.load(coef_ptr + tok, mask=mask_l, other=0.0)
    count = tl.where(coef != 0, count, 0)
    max_count = tl.max(count, axis=0)
    lse = tl.load(lse_ptr + tok, mask=mask_l, other=0.0)
    S = tl.load(sum_r_ptr + tok, mask=mask_l, other=1.0)
    S = tl.where(S > 0, S, 1.0)
    t_term = tl.load(t_ptr + tok, mask=mask_l, other=0.0)
    q_rows = q_ptr + tok.to(tl.int64)[:, None] * D
    dq_rows = dq_ptr + tok.to(tl.int64)[:, None] * D
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n, z = _logits_tile(q_ptr, k_ptr, tok, mask_l, pid_b, n0, N, D, scale,
                                         BLOCK_L, BLOCK_N, BLOCK_D, INTERPRET)
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
        dz = dz.to(q_ptr.dtype.element_ty)
        k_rows = k_ptr + (pid_b.to(tl.int64) * N + offs_n)[:, None] * D
        dk_rows = dk_ptr + (pid_b.to(tl.int64) * N + offs_n)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(q_rows + offs_d[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0)
            k = tl.load(k_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            tl.atomic_add(dq_rows + offs_d[None, :], dot(dz, k, INTERPRET),
                          mask=mask_l[:, None] & mask_d[None, :], sem="relaxed")
            tl.atomic_add(dk_rows + offs_d[None, :], dot(tl.trans(dz), q, INTERPRET),
                          mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launch configurations: fixed, not autotuned (chosen without a GPU at hand; every one is compiled
# for sm_80 and sm_90 by tests/test_kernels_compile.py, which checks that none spills and all fit)

BLOCK_L = 16          # tokens per program: tl.dot's minimum rows
BLOCK_N = 32          # grid cells per tile
D_STEP_BYTES = 64     # D is walked in steps of 64 B of a row: 32 (16-bit) or 16 (float32) values,
                      # so no tile grows with D and any D compiles to the same kernel


def _meta(dtype: torch.dtype, loss_code: int, backward: bool) -> dict:
    """Everything a launch fixes besides the shapes. 8 warps: the render loop (exps over the
    [BLOCK_L, BLOCK_N] tile per point) is most of the work, 2 elements per thread. ``maxnreg`` is
    ptxas's register budget per thread: as many as the kernel takes without spilling, as few as
    leave 3 (forward) or 2 (16-bit backward) programs of 8 warps per SM; the float32 backward
    needs ~160 (1 program per SM). Left to itself ptxas aims at occupancy on its own terms and
    spills a few bytes in some of these kernels."""
    elt = torch.empty((), dtype=dtype).element_size()
    maxnreg = (255 if elt == 4 else 128) if backward else 80
    return dict(LOSS=loss_code, BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N, BLOCK_D=D_STEP_BYTES // elt,
                INTERPRET=INTERPRET, num_warps=8, num_stages=2, maxnreg=maxnreg)


def _bwd_loss_code(loss_code: int) -> int:
    """kl and ce share dℓ/dz = A − P: one backward kernel for both."""
    return _LOSS_CODE["kl"] if loss_code == _LOSS_CODE["ce"] else loss_code


def launch_space(dtype):
    """Every (kernel, meta) the launchers can pick for q, k of ``dtype``, for
    tests/test_kernels_compile.py."""
    for code in sorted(set(_LOSS_CODE.values())):
        yield _fwd_kernel, dict(_meta(dtype, code, backward=False), INTERPRET=False)
    for code in sorted({_bwd_loss_code(c) for c in _LOSS_CODE.values()}):
        yield _bwd_kernel, dict(_meta(dtype, code, backward=True), INTERPRET=False)


# ----------------------------------------------------------------------------------------------
# torch custom ops (torch.compile sees them as single nodes; fake and autograd rules below)

@torch.library.custom_op("loctex::trace_attention_loss_triton", mutates_args=())
def _loss_op(q: torch.Tensor, k: torch.Tensor, pts: torch.Tensor, wts: torch.Tensor,
             ranges: torch.Tensor, loc_mask: torch.Tensor, grid_h: int, grid_w: int, sigma: float,
             scale: float, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss [] float32, stats [3, B·L] float32: per-token lse, ΣR and T for the backward)."""
    B, L, D = q.shape
    per_token = torch.empty(B * L, device=q.device, dtype=torch.float32)
    stats = torch.empty(3, B * L, device=q.device, dtype=torch.float32)
    lse, sum_r, t_term = stats
    if B * L > 0:
        _fwd_kernel[(B, triton.cdiv(L, BLOCK_L))](
            q, k, pts, wts, ranges, per_token, lse, sum_r, t_term,
            *_scalars(L, grid_h, grid_w, D, sigma, scale),
            **_meta(q.dtype, _LOSS_CODE[loss_type], backward=False))
    valid = loc_mask.reshape(-1) & (sum_r > RENDER_EPS)
    loss = torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp_min(1)
    return loss, stats


@_loss_op.register_fake
def _(q, k, pts, wts, ranges, loc_mask, grid_h, grid_w, sigma, scale, loss_type):
    B, L = q.shape[:2]
    return q.new_empty((), dtype=torch.float32), q.new_empty((3, B * L), dtype=torch.float32)


@torch.library.custom_op("loctex::trace_attention_loss_triton_backward", mutates_args=())
def _loss_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, pts: torch.Tensor,
                      wts: torch.Tensor, ranges: torch.Tensor, loc_mask: torch.Tensor,
                      stats: torch.Tensor, grid_h: int, grid_w: int, sigma: float, scale: float,
                      loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dq, dk) in q's and k's dtypes."""
    B, L, D = q.shape
    N = grid_h * grid_w
    lse, sum_r, t_term = stats
    valid = loc_mask.reshape(-1) & (sum_r > RENDER_EPS)
    coef = torch.where(valid, grad.float() / valid.sum().clamp_min(1), 0.0)
    dq = torch.zeros(B, L, D, device=q.device, dtype=torch.float32)
    dk = torch.zeros(B, N, D, device=q.device, dtype=torch.float32)
    if B * L > 0:
        _bwd_kernel[(B, triton.cdiv(L, BLOCK_L))](
            q, k, pts, wts, ranges, lse, sum_r, t_term, coef, dq, dk,
            *_scalars(L, grid_h, grid_w, D, sigma, scale),
            **_meta(q.dtype, _bwd_loss_code(_LOSS_CODE[loss_type]), backward=True))
    return dq.to(q.dtype), dk.to(k.dtype)


@_loss_backward_op.register_fake
def _(grad, q, k, pts, wts, ranges, loc_mask, stats, grid_h, grid_w, sigma, scale, loss_type):
    return torch.empty_like(q), torch.empty_like(k)


def _scalars(L, grid_h, grid_w, D, sigma, scale):
    """The kernels' scalar arguments after the pointers: L, N, D, H, W, scale, -1/(2σ²)."""
    return (L, grid_h * grid_w, D, grid_h, grid_w, float(scale), -1.0 / (2.0 * float(sigma) ** 2))


def _setup_context(ctx, inputs, output):
    q, k, pts, wts, ranges, loc_mask = inputs[:6]
    ctx.args = inputs[6:]
    ctx.save_for_backward(q, k, pts, wts, ranges, loc_mask, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_stats):
    q, k, pts, wts, ranges, loc_mask, stats = ctx.saved_tensors
    dq, dk = _loss_backward_op(grad, q, k, pts, wts, ranges, loc_mask, stats, *ctx.args)
    return (dq, dk) + (None,) * 9


_loss_op.register_autograd(_backward, setup_context=_setup_context)


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
    loss, _ = _loss_op(q_in.contiguous(), k_in.contiguous(), pts, wts, ranges,
                       loc_mask.reshape(q.shape[:2]).bool(), H, W, float(sigma), float(scale),
                       loss_type)
    return loss.to(out_dtype)
