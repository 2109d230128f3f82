"""Symmetric InfoNCE at huge batch without the N x N logits (DESIGN §3), Inf-CL / FlashAttention style.

``loss = ½ (mean_i (lse_row_i − S_ii) + mean_j (lse_col_j − S_jj))`` with ``S = s · A Bᵀ``.

Forward (``_fwd_kernel``): the N x N logit matrix is cut into a (row chunk) x (column chunk) grid
of programs. Each program walks its tiles once, keeping the rows' running max / sum-exp in
registers and its own copy of the columns' running max / sum-exp in a small scratch
(read-modify-write, private to the program), so one pass gives both directions. The per-chunk
partials (O(N · chunks) floats) are merged with a log-sum-exp; only the row and column LSEs are
saved for backward.

Backward (``_bwd_kernel``): recomputes each tile, forms
``G = P_row + P_col − 2·I`` (``dL/dS = coef · G``, coef = grad / 2N) and accumulates ``G @ B``
for one side; called a second time with the operands swapped for the other side (``Gᵀ @ A``).
The same pass sums ``G ∘ (A Bᵀ)`` for d(scale). ``s = exp(logit_scale)`` clamped ≤ 100 stays in
PyTorch autograd, so the clamp's zero gradient is exactly torch's.

Everything works on "rows ``a`` against columns ``b`` with the positive pair of row i at column
``i + diag_off``", so the distributed loss (local rows vs gathered columns, one direction per
call) uses the same two kernels. Memory: O(N · D). Accumulation in float32; bf16/fp16 operands
feed the tensor cores directly, float32 operands use 3xTF32 (close to float32 accuracy).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..reference import MAX_LOGIT_SCALE, _rank_offset_and_total

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_D = 1024            # whole embedding rows live in one tile (the backward's accumulator is BLOCK_M x D)
INTERPRET_TILES = (16, 16)  # fixed (BLOCK_M, BLOCK_N) under TRITON_INTERPRET=1
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16/fp16 tiles as raw integers (triton 3.x); upcasting there is
    # exact (products of 16-bit floats are exact in float32) and keeps the GPU's numerics.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr,
                M, N, D, stride_a, stride_b, M_KEY, N_KEY,
                ROW_STATS: tl.constexpr, COL_STATS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (r, c): rows of chunk r against columns of chunk c. Writes, in base 2,
    row partials [c, M] (max, sum-exp) and column partials [r, N]."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_r = tl.num_programs(0)
    n_c = tl.num_programs(1)
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    # even split: the host keeps n_r <= row_tiles, so every program owns >= 1 row tile and every
    # column partial gets written (no stale scratch between autotuning runs)
    rt0 = pid_r * row_tiles // n_r
    rt1 = (pid_r + 1) * row_tiles // n_r
    ct0 = pid_c * col_tiles // n_c
    ct1 = (pid_c + 1) * col_tiles // n_c
    scale2 = tl.load(scale_ptr) * 1.4426950408889634   # logits in base 2: exp2 instead of exp
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for rt in range(rt0, rt1):
        offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(ct0, ct1):
            offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            b = tl.load(b_ptr + offs_n[:, None] * stride_b + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            s = _mm(a, tl.trans(b), PREC, UPCAST) * scale2
            if ROW_STATS:
                s_r = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_r, 1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s_r - m_new[:, None]), 1)
                m_i = m_new
            if COL_STATS:
                s_c = tl.where(mask_m[:, None], s, float("-inf"))
                col = pid_r * N + offs_n
                seen = mask_n & (offs_n * 0 + rt > rt0)  # the chunk's first row tile starts afresh
                m_old = tl.load(col_m_ptr + col, mask=seen, other=float("-inf"))
                l_old = tl.load(col_l_ptr + col, mask=seen, other=0.0)
                m_c = tl.maximum(m_old, tl.max(s_c, 0))
                l_c = l_old * tl.exp2(m_old - m_c) + tl.sum(tl.exp2(s_c - m_c[None, :]), 0)
                tl.store(col_m_ptr + col, m_c, mask=mask_n)
                tl.store(col_l_ptr + col, l_c, mask=mask_n)
                tl.debug_barrier()  # the next visit of these columns may be read by other threads
        if ROW_STATS:
            tl.store(row_m_ptr + pid_c * M + offs_m, m_i, mask=mask_m)
            tl.store(row_l_ptr + pid_c * M + offs_m, l_i, mask=mask_m)


@triton.jit
def _bwd_kernel(a_ptr, b_ptr, scale_ptr, coef_ptr, lse_r_ptr, lse_c_ptr, da_ptr, ds_ptr,
                M, N, D, stride_a, stride_b, stride_da, diag_off, M_KEY, N_KEY,
                HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, COMPUTE_DS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Program (m, c): dA[rows m] += coef · s · Σ_{cols in split c} G B, G = P_row + P_col − k·I
    (LSEs in base 2). Several column splits add into da with atomics (da zeroed by the host)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_c = tl.num_programs(1)
    col_tiles = tl.cdiv(N, BLOCK_N)
    ct0 = pid_c * col_tiles // n_c
    ct1 = (pid_c + 1) * col_tiles // n_c
    scale = tl.load(scale_ptr)
    scale2 = scale * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    a = tl.load(a_ptr + offs_m[:, None] * stride_a + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if HAS_ROW:
        lse_r = tl.load(lse_r_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds_acc = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(ct0, ct1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        dots = _mm(a, tl.trans(b), PREC, UPCAST)
        s = dots * scale2
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_ROW:
            g += tl.exp2(s - lse_r[:, None])
        if HAS_COL:
            lse_c = tl.load(lse_c_ptr + offs_n, mask=mask_n, other=0.0)
            g += tl.exp2(s - lse_c[None, :])
        n_dir = HAS_ROW + HAS_COL
        g = tl.where(offs_n[None, :] == offs_m[:, None] + diag_off, g - n_dir, g)
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        if COMPUTE_DS:
            ds_acc += tl.sum(g * dots, 1)
        acc += _mm(g.to(b.dtype), b, PREC, UPCAST)
    coef = tl.load(coef_ptr)
    acc = acc * (coef * scale)
    da = da_ptr + offs_m[:, None] * stride_da + offs_d[None, :]
    mask = mask_m[:, None] & mask_d[None, :]
    if n_c == 1:
        tl.store(da, acc, mask=mask)
    else:
        tl.atomic_add(da, acc, mask=mask)
    if COMPUTE_DS:
        tl.atomic_add(ds_ptr, tl.sum(ds_acc, 0) * coef)


# ----------------------------------------------------------------------------------------------
# autotuning (CUDA only; the interpreter uses INTERPRET_TILES or the caller's tiles)

def _bytes_per_elem(named_args) -> int:
    return named_args["a_ptr"].element_size()


def _prune_fwd(configs, named_args, **kwargs):
    bd = triton.next_power_of_2(named_args["D"])
    elt = _bytes_per_elem(named_args)
    # the row tile stays resident; the column tiles are pipelined num_stages deep (shared memory)
    keep = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"] * c.num_stages) * bd * elt <= 200 * 1024]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_bwd(configs, named_args, **kwargs):
    bd = triton.next_power_of_2(named_args["D"])
    elt = _bytes_per_elem(named_args)
    keep = [c for c in configs
            # fp32 accumulator of BLOCK_M x D: at most ~128 registers per thread
            if c.kwargs["BLOCK_M"] * bd <= 128 * 32 * c.num_warps
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"] * c.num_stages) * bd * elt <= 200 * 1024]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (2, 3)]
_BWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]
_MAX_TUNED_BLOCK_M = 128
_KEY = ["M_KEY", "N_KEY", "D", "ROW_STATS", "COL_STATS"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY,
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=["M_KEY", "N_KEY", "D", "HAS_ROW", "HAS_COL", "COMPUTE_DS"],
                             prune_configs_by={"early_config_prune": _prune_bwd},
                             reset_to_zero=["da_ptr", "ds_ptr"])(_bwd_kernel)


def _size_key(n: int) -> int:
    """Autotuning bucket: shapes within a power of two (capped at 2^16) share a config."""
    return min(16, max(0, math.ceil(math.log2(max(n, 1)))))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so that chunking and atomics get exercised


def _precision(t: torch.Tensor) -> dict:
    return {"PREC": "tf32x3" if t.dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRET and t.dtype != torch.float32}


# ----------------------------------------------------------------------------------------------
# launchers: rows a [M, D] vs columns b [N, D]

def _lse2(a, b, scale, row_stats: bool, col_stats: bool, tiles=None):
    """Row and/or column log-sum-exp of ``scale · a bᵀ`` in base 2 (``log2 Σ 2^(log2e · S)``), float32."""
    M, D = a.shape
    N = b.shape[0]
    bd = max(16, triton.next_power_of_2(D))
    dev = a.device
    if tiles is None and not _INTERPRET:
        max_bm, max_bn, kernel, meta = _MAX_TUNED_BLOCK_M, 128, _fwd_tuned, {}
    else:
        bm, bn = tiles or INTERPRET_TILES
        max_bm, max_bn, kernel, meta = bm, bn, _fwd_kernel, {"BLOCK_M": bm, "BLOCK_N": bn}
    target = _target_programs(dev)
    n_r = max(1, min(triton.cdiv(M, max_bm), 16, target))
    n_c = max(1, min(triton.cdiv(N, max_bn), triton.cdiv(target, n_r)))
    row_m = torch.empty((n_c, M) if row_stats else (1,), device=dev, dtype=torch.float32)
    row_l = torch.empty_like(row_m)
    col_m = torch.empty((n_r, N) if col_stats else (1,), device=dev, dtype=torch.float32)
    col_l = torch.empty_like(col_m)
    kernel[(n_r, n_c)](a, b, scale, row_m, row_l, col_m, col_l, M, N, D, a.stride(0), b.stride(0),
                       _size_key(M), _size_key(N), ROW_STATS=row_stats, COL_STATS=col_stats,
                       BLOCK_D=bd, **meta, **_precision(a))

    def merge(m2, l):  # chunk partials -> base-2 LSE (kept in base 2: no rounding on the way back)
        top = m2.max(dim=0).values
        return top + torch.log2((l * torch.exp2(m2 - top)).sum(dim=0))

    return (merge(row_m, row_l) if row_stats else None, merge(col_m, col_l) if col_stats else None)


def _grad_rows(a, b, scale, coef, lse_r, lse_c, diag_off: int, ds, compute_ds: bool, tiles=None):
    """``coef · s · G @ b`` with ``G = exp(S − lse_r) + exp(S − lse_c) − k·I`` (base-2 LSEs from
    ``_lse2``; either may be None; k = how many are given), float32 [M, D]; adds
    ``coef · Σ G ∘ (a bᵀ)`` into ``ds`` [1] when ``compute_ds``."""
    M, D = a.shape
    N = b.shape[0]
    da = torch.zeros((M, D), device=a.device, dtype=torch.float32)
    target = _target_programs(a.device)

    def grid(meta):
        row_progs = triton.cdiv(M, meta["BLOCK_M"])
        split = max(1, min(triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(target, row_progs)))
        return (row_progs, split)

    if tiles is None and not _INTERPRET:
        kernel, meta = _bwd_tuned, {}
    else:
        bm, bn = tiles or INTERPRET_TILES
        kernel, meta = _bwd_kernel, {"BLOCK_M": bm, "BLOCK_N": bn}
    kernel[grid](a, b, scale, coef, scale if lse_r is None else lse_r, scale if lse_c is None else lse_c, da, ds,
                 M, N, D, a.stride(0), b.stride(0), da.stride(0), diag_off, _size_key(M), _size_key(N),
                 HAS_ROW=lse_r is not None, HAS_COL=lse_c is not None, COMPUTE_DS=compute_ds,
                 BLOCK_D=max(16, triton.next_power_of_2(D)), **meta, **_precision(a))
    return da


# ----------------------------------------------------------------------------------------------
# autograd

def _prepare(image_emb, text_emb):
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"contrastive loss needs two [N, D] tensors of one shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("contrastive loss of an empty batch")
    if image_emb.shape[1] > MAX_D:
        raise ValueError(f"the Triton contrastive loss supports D <= {MAX_D}, got {image_emb.shape[1]}")
    dtype = torch.promote_types(image_emb.dtype, text_emb.dtype)
    if dtype not in _SUPPORTED:
        raise TypeError(f"the Triton contrastive loss takes float32/bfloat16/float16, got {dtype}")
    return image_emb.to(dtype).contiguous(), text_emb.to(dtype).contiguous()


def _scale(logit_scale, device):
    """``s = exp(logit_scale)`` clamped ≤ 100, in autograd (float32 [1])."""
    ls = torch.as_tensor(logit_scale, device=device)
    return torch.exp(ls.float()).clamp(max=MAX_LOGIT_SCALE).reshape(1)


def _diag(a, b, scale):
    """``s · ⟨a_i, b_i⟩`` in float32 (O(N·D))."""
    return (a.float() * b.float()).sum(-1) * scale


class _ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, tiles):
        lse_r, lse_c = _lse2(image, text, scale, True, True, tiles)
        diag = _diag(image, text, scale)
        n = image.shape[0]
        loss = 0.5 * ((lse_r * LN2 - diag).sum() + (lse_c * LN2 - diag).sum()) / n
        ctx.save_for_backward(image, text, scale, lse_r, lse_c)
        ctx.tiles = tiles
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, lse_r, lse_c = ctx.saved_tensors
        n = image.shape[0]
        coef = (grad.float() / (2 * n)).reshape(1)
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        ds = torch.zeros(1, device=image.device, dtype=torch.float32)
        d_image = d_text = None
        if need_i or need_s:
            d_image = _grad_rows(image, text, scale, coef, lse_r, lse_c, 0, ds, need_s, ctx.tiles)
        if need_t:
            d_text = _grad_rows(text, image, scale, coef, lse_c, lse_r, 0, ds, False, ctx.tiles)
        return (d_image.to(image.dtype) if need_i else None,
                d_text.to(text.dtype) if need_t else None, ds if need_s else None, None)


def contrastive_loss_triton(image_emb, text_emb, logit_scale, *, tiles=None):
    """Symmetric InfoNCE of DESIGN §3 (value and gradients as ``reference.contrastive_loss``).

    ``tiles=(BLOCK_M, BLOCK_N)`` fixes the tiles (tests, benchmarks); by default CUDA autotunes
    and the interpreter uses ``INTERPRET_TILES``. Returns a float32 scalar."""
    image, text = _prepare(image_emb, text_emb)
    scale = _scale(logit_scale, image.device)
    return _ContrastiveLoss.apply(image, text, scale, tiles)


# ----------------------------------------------------------------------------------------------
# distributed: local rows vs gathered columns

def _all_gather(x, group):
    import torch.distributed as dist
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), device=x.device, dtype=x.dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def _reduce_scatter(x, group):
    """Sum over ranks of ``x`` [world·n, D]; returns this rank's [n, D] slice."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // world
    out = torch.empty((n, *x.shape[1:]), device=x.device, dtype=x.dtype)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(out, x, group=group)
    except (RuntimeError, NotImplementedError):  # backends without reduce-scatter (old gloo)
        dist.all_reduce(x, group=group)
        out.copy_(x[rank * n:(rank + 1) * n])
    return out


class _DistributedContrastiveLoss(torch.autograd.Function):
    """Value: the global loss. Gradients: those of this rank's local loss (its rows against every
    column), with the column gradients summed over ranks into their owners — the data-parallel
    convention of ``reference.distributed_contrastive_loss``."""

    @staticmethod
    def forward(ctx, image, text, scale, group, offset, world, tiles):
        import torch.distributed as dist
        all_image = _all_gather(image, group)
        all_text = _all_gather(text, group)
        lse_i2t, _ = _lse2(image, all_text, scale, True, False, tiles)   # local images vs all captions
        lse_t2i, _ = _lse2(text, all_image, scale, True, False, tiles)   # local captions vs all images
        diag = _diag(image, text, scale)
        n = image.shape[0]
        local = 0.5 * ((lse_i2t * LN2 - diag).sum() + (lse_t2i * LN2 - diag).sum()) / n
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(image, text, all_image, all_text, scale, lse_i2t, lse_t2i)
        ctx.group, ctx.offset, ctx.tiles = group, offset, tiles
        return total / world

    @staticmethod
    def backward(ctx, grad):
        image, text, all_image, all_text, scale, lse_i2t, lse_t2i = ctx.saved_tensors
        off, group, tiles = ctx.offset, ctx.group, ctx.tiles
        n = image.shape[0]
        coef = (grad.float() / (2 * n)).reshape(1)
        need_s = ctx.needs_input_grad[2]
        ds = torch.zeros(1, device=image.device, dtype=torch.float32)
        # i2t block: rows = local images, columns = all captions, positives at column i + off
        d_image = _grad_rows(image, all_text, scale, coef, lse_i2t, None, off, ds, need_s, tiles)
        d_all_text = _grad_rows(all_text, image, scale, coef, None, lse_i2t, -off, ds, False, tiles)
        # t2i block: rows = local captions, columns = all images
        d_text = _grad_rows(text, all_image, scale, coef, lse_t2i, None, off, ds, need_s, tiles)
        d_all_image = _grad_rows(all_image, text, scale, coef, None, lse_t2i, -off, ds, False, tiles)
        d_image += _reduce_scatter(d_all_image, group)
        d_text += _reduce_scatter(d_all_text, group)
        return (d_image.to(image.dtype), d_text.to(text.dtype), ds if need_s else None,
                None, None, None, None)


def distributed_contrastive_loss_triton(image_emb, text_emb, logit_scale, group=None, *, tiles=None):
    """The contrastive loss over the global batch of all ranks (DESIGN §3); same value and gradient
    convention as ``reference.distributed_contrastive_loss``. Single process: ``contrastive_loss_triton``."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss_triton(image_emb, text_emb, logit_scale, tiles=tiles)
    image, text = _prepare(image_emb, text_emb)
    scale = _scale(logit_scale, image.device)
    _, world, offset, _ = _rank_offset_and_total(image.shape[0], group)
    return _DistributedContrastiveLoss.apply(image, text, scale, group, offset, world, tiles)
