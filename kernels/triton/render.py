"""Trace rendering (DESIGN §3) in Triton: one program per (token, grid tile).

A program loops over its token's point range only, BLOCK_P points at a time, and accumulates
``R(h, w) = Σ_i w_i exp(-‖p_i - c(h, w)‖² / 2σ²)`` for BLOCK_N cells; it writes R and the tile's
ΣR. The normalization ``P = R / ΣR`` (and ``valid = ΣR > eps``) needs every tile of the token, so
it is one elementwise pass afterwards.

Computes in float32 (float64 inputs too; their outputs are cast back to float64, like the
reference's). Not differentiable: gradients w.r.t. points/weights are the reference's and C++'s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import RENDER_EPS


@triton.jit
def cell_centers(offs_n, H, W):
    """Centers ``((w + 0.5) / W, (h + 0.5) / H)`` of the row-major cells ``offs_n``."""
    cx = ((offs_n % W).to(tl.float32) + 0.5) / W
    cy = ((offs_n // W).to(tl.float32) + 0.5) / H
    return cx, cy


@triton.jit
def _render_kernel(points_ptr, weights_ptr, ranges_ptr, heat_ptr, tile_sum_ptr,
                   H, W, N, neg_inv_2s2,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    tok = tl.program_id(0)
    tile = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cx, cy = cell_centers(offs_n, H, W)
    start = tl.load(ranges_ptr + 2 * tok)
    end = tl.load(ranges_ptr + 2 * tok + 1)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        px = tl.load(points_ptr + 2 * offs_p, mask=mask_p, other=0.0)
        py = tl.load(points_ptr + 2 * offs_p + 1, mask=mask_p, other=0.0)
        w = tl.load(weights_ptr + offs_p, mask=mask_p, other=0.0)
        dx = px[:, None] - cx[None, :]
        dy = py[:, None] - cy[None, :]
        g = w[:, None] * tl.exp((dx * dx + dy * dy) * neg_inv_2s2)
        acc += tl.sum(tl.where(mask_p[:, None], g, 0.0), axis=0)
    acc = tl.where(mask_n, acc, 0.0)
    tl.store(heat_ptr + tok.to(tl.int64) * N + offs_n, acc, mask=mask_n)
    tl.store(tile_sum_ptr + tok * tl.num_programs(1) + tile, tl.sum(acc, axis=0))


def trace_tensors(points_xy, point_weights, token_ranges):
    """The trace inputs as the kernels read them: float32 contiguous points [P, 2] and weights
    [P], int32 ranges [B*L, 2] (shared with trace_attention.py)."""
    return (points_xy.detach().to(torch.float32).contiguous(),
            point_weights.detach().to(torch.float32).contiguous(),
            token_ranges.to(torch.int32).reshape(-1, 2).contiguous())


BLOCK_P = 16                              # points per step of a token's range
BLOCK_NS = (16, 32, 64, 128)              # grid cells per program: the grid's size, up to 128


def _meta(N: int) -> dict:
    block_n = min(BLOCK_NS[-1], max(BLOCK_NS[0], triton.next_power_of_2(N)))
    return dict(BLOCK_N=block_n, BLOCK_P=BLOCK_P, num_warps=4, num_stages=3)


def launch_space(dtype):
    """Every (kernel, meta) the launcher can pick, for tests/test_kernels_compile.py. The kernel
    reads float32 traces whatever the model's dtype: listed under float32 only."""
    if dtype == torch.float32:
        for block_n in BLOCK_NS:
            yield _render_kernel, _meta(block_n)


@torch.library.custom_op("loctex::render_traces_triton", mutates_args=())
def _render_op(pts: torch.Tensor, wts: torch.Tensor, ranges: torch.Tensor, grid_h: int,
               grid_w: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (heat [B·L, H·W] float32, valid [B·L] bool) for the kernels' trace tensors."""
    N = grid_h * grid_w
    n_tok = ranges.shape[0]
    meta = _meta(N)
    n_tiles = triton.cdiv(N, meta["BLOCK_N"])
    heat = torch.empty(n_tok, N, device=pts.device, dtype=torch.float32)
    tile_sum = torch.empty(n_tok, n_tiles, device=pts.device, dtype=torch.float32)
    if n_tok > 0:
        _render_kernel[(n_tok, n_tiles)](
            pts, wts, ranges, heat, tile_sum, grid_h, grid_w, N, -1.0 / (2.0 * float(sigma) ** 2),
            **meta)
    total = tile_sum.sum(1)
    valid = total > RENDER_EPS  # False for NaN too
    heat = torch.where(valid[:, None], heat / total.clamp_min(RENDER_EPS)[:, None], 0.0)
    return heat, valid


@_render_op.register_fake
def _(pts, wts, ranges, grid_h, grid_w, sigma):
    n_tok = ranges.shape[0]
    return (pts.new_empty((n_tok, grid_h * grid_w), dtype=torch.float32),
            pts.new_empty((n_tok,), dtype=torch.bool))


def render_traces_triton(points_xy, point_weights, token_ranges, grid_hw, sigma):
    """-> (heat [B, L, H, W] float32 — float64 for float64 inputs —, valid [B, L] bool)."""
    B, L = token_ranges.shape[:2]
    H, W = int(grid_hw[0]), int(grid_hw[1])
    heat, valid = _render_op(*trace_tensors(points_xy, point_weights, token_ranges), H, W,
                             float(sigma))
    out_dtype = torch.float64 if torch.float64 in (points_xy.dtype, point_weights.dtype) else torch.float32
    return heat.reshape(B, L, H, W).to(out_dtype), valid.reshape(B, L)
