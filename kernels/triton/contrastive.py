"""Symmetric InfoNCE at huge batch without the N x N logits (DESIGN §3), Inf-CL / FlashAttention style.

``loss = ½ (mean_i (lse_row_i − S_ii) + mean_j (lse_col_j − S_jj))`` with ``S = s · A Bᵀ``.

Forward (``_fwd_kernel``): the logit matrix is cut into a (row chunk) x (column chunk) grid of
programs. Each program walks its tiles once (a K-loop over D per tile, like a GEMM), keeping its
rows' running max / sum-exp in registers and its columns' running max / sum-exp in a scratch row
of its own (read-modify-write, private to the program), so one pass over the N² logits gives both
directions. The per-chunk partials (O(N · chunks) floats) are merged by a log-sum-exp; only the
row and column LSEs (and nothing N x N) are kept for backward.

Backward: ``dL/dS = coef · G`` with ``G = P_row + P_col − 2·I`` (P = exp(S − LSE) per direction,
coef = grad / 2N). ``_grad_kernel`` recomputes the logits of a block of rows against every column
and writes that block of G (16-bit for 16-bit inputs); two GEMMs then give ``d(image) = coef·s·G B``
and ``d(text) += coef·s·Gᵀ A`` at cuBLAS speed, and the kernel also sums ``G ∘ (A Bᵀ)`` for
d(scale). A block of G holds at most 256 MiB (``G_BLOCK_BYTES``; N = 2²⁰, D = 512: 64 float32 or
128 bf16 rows), so memory stays O(N · D): the embeddings, their float32 gradients and one block.
Where a block has room for >= 4·D rows the flops are the nominal 8·N²·D of forward + backward;
beyond (D = 512: N > 65,536 bf16, N > 32,768 float32) d(text) comes from a second pass over
column blocks (see ``_grads``), 10·N²·D in all. ``s = exp(logit_scale)`` clamped ≤ 100 is left to
PyTorch autograd, so the clamp's zero gradient is exactly torch's.

The ops are torch custom ops (``loctex::contrastive_loss_triton`` and its backward), so
``torch.compile`` traces a model's step through them without a graph break.

Everything works on "rows ``a`` against columns ``b`` with the positive pair of row i at column
``i + diag_off``": the distributed loss (local rows vs gathered columns, one direction at a time)
runs the same kernels. Accumulation is float32; bf16/fp16 operands feed the tensor cores
directly — bf16 embeddings are the fast path (a third of the MMA work of float32), float32
operands use 3xTF32 (close to float32 accuracy; ``common.dot``).

Precision: each LSE is one float32, so the loss and exp(S − LSE) carry an absolute error of about
ulp(largest logit) (~4e-6 at s = 100) — invisible at ordinary losses, but when the softmax
saturates (loss ~ 1e-10) the gradients are that noise rather than their ~1e-11 true size, as in
FlashAttention. With bf16 inputs G is rounded to bf16 for the GEMMs: gradients carry ~0.5% noise.
The kernels use no atomics: the partials merge in a fixed order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..distributed import GlobalNegativesLoss, rank_offset_and_total
from ..reference import MAX_LOGIT_SCALE
from .common import INTERPRET, dot

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRET_TILES = (16, 16, 16)  # fixed (BLOCK_M, BLOCK_N, BLOCK_K) under TRITON_INTERPRET=1
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dots(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          INTERPRET: tl.constexpr):
    """``a[offs_m] · b[offs_n]ᵀ`` in float32, K-loop over D (masked rows read as 0)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_a
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_b
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += dot(a, tl.trans(b), INTERPRET)
    return acc


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr,
                M, N, D, stride_a, stride_b, M_KEY, N_KEY,
                ROW_STATS: tl.constexpr, COL_STATS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRET: tl.constexpr):
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
    for rt in range(rt0, rt1):
        offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(ct0, ct1):
            offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            s = _dots(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b,
                      BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET) * scale2
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
                # other threads read these columns at the next row tile: order the accesses (this
                # barrier also keeps Triton from pipelining across tiles; the K-loop still is)
                tl.debug_barrier()
        if ROW_STATS:
            tl.store(row_m_ptr + pid_c * M + offs_m, m_i, mask=mask_m)
            tl.store(row_l_ptr + pid_c * M + offs_m, l_i, mask=mask_m)


@triton.jit
def _grad_kernel(a_ptr, b_ptr, scale_ptr, lse_r_ptr, lse_c_ptr, g_ptr, ds_ptr,
                 M, N, D, stride_a, stride_b, stride_g, diag_off, M_KEY, N_KEY,
                 HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """One tile of ``G = exp2(S2 − lse_r) + exp2(S2 − lse_c) − k·I`` (base-2 logits and LSEs;
    k = number of directions), stored in g's dtype; ``ds[pid] = Σ G ∘ (a bᵀ)`` over the tile."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_m      # neighbouring programs share a column tile; the row block stays in L2
    pid_n = pid // n_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dots = _dots(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b,
                 BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET)
    s = dots * (tl.load(scale_ptr) * 1.4426950408889634)
    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_ROW:
        g += tl.exp2(s - tl.load(lse_r_ptr + offs_m, mask=mask_m, other=0.0)[:, None])
    if HAS_COL:
        g += tl.exp2(s - tl.load(lse_c_ptr + offs_n, mask=mask_n, other=0.0)[None, :])
    n_dir = HAS_ROW + HAS_COL
    g = tl.where(offs_n[None, :] == offs_m[:, None] + diag_off, g - n_dir, g)
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.where(mask, g, 0.0)
    tl.store(g_ptr + offs_m.to(tl.int64)[:, None] * stride_g + offs_n[None, :],
             g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(ds_ptr + pid, tl.sum(tl.sum(g * dots, 1), 0))


# ----------------------------------------------------------------------------------------------
# autotuning (CUDA only; the interpreter uses INTERPRET_TILES or the caller's tiles)

# one K step reads 64 B of each row: BLOCK_K = 32 (16-bit), 16 (float32). sm_80's mma.sync takes
# its operands from registers, and 128 B steps spill there (sm_90's wgmma reads shared memory)
K_STEP_BYTES = 64
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            # <= 32 logits per thread: bigger tiles spill (tests/test_kernels_compile.py compiles
            # each for sm_80 and sm_90)
            for bm, bn, w, st in ((64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 8, 3))
            for bk in (16, 32)]
_MAX_TUNED_BLOCK = max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _CONFIGS)
# (ROW_STATS, COL_STATS) and (HAS_ROW, HAS_COL) of the launches: single process, distributed
_STATS_VARIANTS = ((True, True), (True, False))


def _configs_for(configs, element_size: int):
    return [c for c in configs if c.kwargs["BLOCK_K"] * element_size == K_STEP_BYTES]


def _prune(configs, named_args, **kwargs):
    return _configs_for(configs, named_args["a_ptr"].element_size())


_fwd_tuned = triton.autotune(_CONFIGS, key=["M_KEY", "N_KEY", "D", "ROW_STATS", "COL_STATS"],
                             prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
_grad_tuned = triton.autotune(_CONFIGS, key=["M_KEY", "N_KEY", "D", "HAS_ROW", "HAS_COL"],
                              prune_configs_by={"early_config_prune": _prune},
                              reset_to_zero=["ds_ptr"])(_grad_kernel)


def launch_space(dtype):
    """Every (kernel, meta) the autotuners can pick for inputs of ``dtype``, for
    tests/test_kernels_compile.py."""
    for c in _configs_for(_CONFIGS, torch.empty((), dtype=dtype).element_size()):
        meta = dict(c.kwargs, INTERPRET=False, num_warps=c.num_warps, num_stages=c.num_stages)
        for row, col in _STATS_VARIANTS:
            yield _fwd_kernel, dict(meta, ROW_STATS=row, COL_STATS=col)
            yield _grad_kernel, dict(meta, HAS_ROW=row, HAS_COL=col)


def _size_key(n: int) -> int:
    """Autotuning bucket: shapes within a power of two (capped at 2^16) share a config."""
    return min(16, max(0, math.ceil(math.log2(max(n, 1)))))


def _kernel_and_meta(tuned, plain, tiles):
    """(kernel, fixed meta, largest BLOCK_M/BLOCK_N it may use)."""
    if tiles is None and not INTERPRET:
        return tuned, {}, _MAX_TUNED_BLOCK
    bm, bn, bk = tiles or INTERPRET_TILES
    return plain, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, max(bm, bn)


# ----------------------------------------------------------------------------------------------
# launchers: rows a [M, D] vs columns b [N, D]

def _lse2(a, b, scale, row_stats: bool, col_stats: bool, tiles=None):
    """Row and/or column log-sum-exp of ``scale · a bᵀ`` in base 2 (``log2 Σ 2^(log2e · S)``), float32."""
    M, D = a.shape
    N = b.shape[0]
    kernel, meta, max_block = _kernel_and_meta(_fwd_tuned, _fwd_kernel, tiles)
    if a.is_cuda:
        target = 4 * torch.cuda.get_device_properties(a.device).multi_processor_count
        n_r = max(1, min(triton.cdiv(M, max_block), 16))
    else:  # interpreter: a 2 x 2 grid at most, so that both kinds of chunk merging get exercised
        target, n_r = 4, max(1, min(triton.cdiv(M, max_block), 2))
    n_c = max(1, min(triton.cdiv(N, max_block), triton.cdiv(target, n_r)))
    row_m = torch.empty((n_c, M) if row_stats else (1,), device=a.device, dtype=torch.float32)
    row_l = torch.empty_like(row_m)
    col_m = torch.empty((n_r, N) if col_stats else (1,), device=a.device, dtype=torch.float32)
    col_l = torch.empty_like(col_m)
    kernel[(n_r, n_c)](a, b, scale, row_m, row_l, col_m, col_l, M, N, D, a.stride(0), b.stride(0),
                       _size_key(M), _size_key(N), ROW_STATS=row_stats, COL_STATS=col_stats,
                       INTERPRET=INTERPRET, **meta)

    def merge(m2, l):  # chunk partials -> base-2 LSE (kept in base 2: no rounding on the way back)
        top = m2.max(dim=0).values
        return top + torch.log2((l * torch.exp2(m2 - top)).sum(dim=0))

    return (merge(row_m, row_l) if row_stats else None, merge(col_m, col_l) if col_stats else None)


def _softmax_grad(a, b, scale, lse_r, lse_c, diag_off: int, ds_out, tiles=None):
    """G [M, N] in a's dtype (see ``_grad_kernel``); adds ``Σ G ∘ (a bᵀ)`` to ``ds_out`` if given."""
    M, D = a.shape
    N = b.shape[0]
    kernel, meta, _ = _kernel_and_meta(_grad_tuned, _grad_kernel, tiles)
    g = torch.empty((M, N), device=a.device, dtype=a.dtype)
    min_bm, min_bn = (meta["BLOCK_M"], meta["BLOCK_N"]) if meta else (
        min(c.kwargs["BLOCK_M"] for c in _CONFIGS), min(c.kwargs["BLOCK_N"] for c in _CONFIGS))
    ds = torch.zeros(triton.cdiv(M, min_bm) * triton.cdiv(N, min_bn), device=a.device,
                     dtype=torch.float32)
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    kernel[grid](a, b, scale, scale if lse_r is None else lse_r, scale if lse_c is None else lse_c,
                 g, ds, M, N, D, a.stride(0), b.stride(0), g.stride(0), diag_off, _size_key(M),
                 _size_key(N), HAS_ROW=lse_r is not None, HAS_COL=lse_c is not None,
                 INTERPRET=INTERPRET, **meta)
    if ds_out is not None:
        ds_out += ds.sum()
    return g


_OUT_DTYPE_MM = {"ok": True}  # torch.mm/addmm(..., out_dtype=float32) on CUDA, until one fails


def _mm_f32(x, y, out=None):
    """``x @ y`` in float32, or added into float32 ``out``. 16-bit CUDA operands stay on the
    tensor cores with float32 accumulation and output (``out_dtype``); where torch lacks it, each
    block's product is rounded to 16 bits once before the float32 sum. On CPU (the interpreter's
    tests) 16-bit operands are multiplied in float32."""
    if x.dtype == torch.float32:
        return x @ y if out is None else out.addmm_(x, y)
    if x.is_cuda and _OUT_DTYPE_MM["ok"]:
        try:
            if out is None:
                return torch.mm(x, y, out_dtype=torch.float32)
            return torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM["ok"] = False
    r = (x @ y).float() if x.is_cuda else x.float() @ y.float()
    return r if out is None else out.add_(r)


G_BLOCK_BYTES = 256 << 20   # the most of G the backward holds at once


def _block_len(other: int, elt: int) -> int:
    """Rows (columns) of a G block against ``other`` columns (rows): G_BLOCK_BYTES worth, a
    multiple of 16, at least 16 (so beyond other = 2²² float32 columns a block exceeds the bound)."""
    return max(16, G_BLOCK_BYTES // max(1, other * elt) // 16 * 16)


def backward_passes(m: int, n: int, dim: int, element_size: int, chunk_rows=None) -> int:
    """How many times the backward computes G for rows [m, dim] against columns [n, dim]: 1, or 2
    when d(columns) needs a pass of its own over column blocks (``_grads``; then the backward
    does 6·m·n·dim matmul flops instead of 4 and computes 2·m·n more exps)."""
    rows = chunk_rows or _block_len(n, element_size)
    return 2 if rows < min(m, 4 * dim) else 1


def _grads(a, b, scale, coef, lse_r, lse_c, diag_off: int, need_a: bool, need_b: bool,
           need_s: bool, tiles=None, chunk_rows=None):
    """Gradients of ``coef · Σ_{rows} (LSEs − positive logit)`` over the block ``s · a bᵀ``:
    (dA [M, D], dB [N, D], d scale [1]) in float32, each None when not needed.

    A block of rows against every column gives dA's rows and adds the block's share into all of
    dB. That read-modify-write of dB ([N, D] float32) outweighs the block's GEMM when the block
    has fewer than ~4·D rows — as it must at large N to keep G bounded (N = 2²⁰: 64 float32 rows
    in 256 MiB) — and then dB comes from a second pass over blocks of columns against every row
    (G recomputed: 2·N²·D more flops, dB written once)."""
    M, D = a.shape
    N = b.shape[0]
    elt = a.element_size()
    rows = chunk_rows or _block_len(N, elt)
    by_columns = need_b and backward_passes(M, N, D, elt, chunk_rows) == 2
    da = torch.empty((M, D), device=a.device, dtype=torch.float32) if need_a else None
    db = torch.zeros((N, D), device=a.device, dtype=torch.float32) if need_b else None
    ds = torch.zeros(1, device=a.device, dtype=torch.float32) if need_s else None
    if need_a or need_s or (need_b and not by_columns):
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            g = _softmax_grad(a[r0:r1], b, scale, None if lse_r is None else lse_r[r0:r1], lse_c,
                              diag_off + r0, ds, tiles)
            if need_a:
                da[r0:r1] = _mm_f32(g, b)
            if need_b and not by_columns:
                _mm_f32(g.t(), a[r0:r1], out=db)
            del g
    if by_columns:
        cols = chunk_rows or _block_len(M, elt)
        for c0 in range(0, N, cols):
            c1 = min(N, c0 + cols)
            g = _softmax_grad(a, b[c0:c1], scale, lse_r, None if lse_c is None else lse_c[c0:c1],
                              diag_off - c0, None, tiles)
            db[c0:c1] = _mm_f32(g.t(), a)
            del g
    factor = coef * scale
    return (None if da is None else da.mul_(factor), None if db is None else db.mul_(factor),
            None if ds is None else ds.mul_(coef))


# ----------------------------------------------------------------------------------------------
# autograd

def _prepare(image_emb, text_emb):
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"contrastive loss needs two [N, D] tensors of one shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("contrastive loss of an empty batch")
    dtype = torch.promote_types(image_emb.dtype, text_emb.dtype)
    if dtype not in _SUPPORTED:
        raise TypeError(f"the Triton contrastive loss takes float32/bfloat16/float16, got {dtype}")
    return image_emb.to(dtype).contiguous(), text_emb.to(dtype).contiguous()


def _scale(logit_scale, device):
    """``s = exp(logit_scale)`` clamped ≤ 100, in autograd (float32 [1])."""
    ls = torch.as_tensor(logit_scale, device=device)
    return torch.exp(ls.float()).clamp(max=MAX_LOGIT_SCALE).reshape(1)


def _local_loss(lse_i2t, lse_t2i, image, text, scale):
    """``½ (mean(lse_i2t − S_ii) + mean(lse_t2i − S_ii))``; LSEs in base 2, S_ii = s⟨I_i, T_i⟩."""
    # positive logits in float32, a block of rows at a time (no N x D float32 copies)
    diag = torch.cat([(i.float() * t.float()).sum(-1) for i, t in zip(image.split(8192), text.split(8192))])
    diag = diag * scale
    return 0.5 * ((lse_i2t * LN2 - diag).sum() + (lse_t2i * LN2 - diag).sum()) / image.shape[0]


@torch.library.custom_op("loctex::contrastive_loss_triton", mutates_args=())
def _loss_op(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
             tiles: Optional[list[int]], chunk_rows: Optional[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [] float32, base-2 row and column LSEs [N] float32 for the backward). A torch
    custom op: torch.compile sees one node (fake and autograd rules below)."""
    lse_r, lse_c = _lse2(image, text, scale, True, True, tiles)
    return _local_loss(lse_r, lse_c, image, text, scale), lse_r, lse_c


@_loss_op.register_fake
def _(image, text, scale, tiles, chunk_rows):
    n = image.shape[0]
    f32 = dict(dtype=torch.float32)
    return image.new_empty((), **f32), image.new_empty((n,), **f32), image.new_empty((n,), **f32)


@torch.library.custom_op("loctex::contrastive_loss_triton_backward", mutates_args=())
def _loss_backward_op(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                      scale: torch.Tensor, lse_r: torch.Tensor, lse_c: torch.Tensor,
                      tiles: Optional[list[int]], chunk_rows: Optional[int], need_image: bool,
                      need_text: bool, need_scale: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d image, d text, d scale); an empty tensor for each gradient not needed."""
    coef = (grad.float() / (2 * image.shape[0])).reshape(1)
    d_image, d_text, ds = _grads(image, text, scale, coef, lse_r, lse_c, 0, need_image, need_text,
                                 need_scale, tiles, chunk_rows)
    return (image.new_empty(0) if d_image is None else d_image.to(image.dtype),
            text.new_empty(0) if d_text is None else d_text.to(text.dtype),
            scale.new_empty(0) if ds is None else ds)


@_loss_backward_op.register_fake
def _(grad, image, text, scale, lse_r, lse_c, tiles, chunk_rows, need_image, need_text, need_scale):
    return (torch.empty_like(image) if need_image else image.new_empty(0),
            torch.empty_like(text) if need_text else text.new_empty(0),
            torch.empty_like(scale) if need_scale else scale.new_empty(0))


def _setup_context(ctx, inputs, output):
    image, text, scale, tiles, chunk_rows = inputs
    ctx.save_for_backward(image, text, scale, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.opts = (tiles, chunk_rows)


def _backward(ctx, grad, _grad_lse_r, _grad_lse_c):
    image, text, scale, lse_r, lse_c = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = _loss_backward_op(grad, image, text, scale, lse_r, lse_c, *ctx.opts, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def contrastive_loss_triton(image_emb, text_emb, logit_scale, *, tiles=None, chunk_rows=None):
    """Symmetric InfoNCE of DESIGN §3 (value and gradients as ``reference.contrastive_loss``).

    ``tiles=(BLOCK_M, BLOCK_N, BLOCK_K)`` fixes the tiles and ``chunk_rows`` the rows (and
    columns) of G per backward block (tests, benchmarks); by default CUDA autotunes, the
    interpreter uses ``INTERPRET_TILES``, and blocks hold ``G_BLOCK_BYTES``. Returns a float32
    scalar."""
    image, text = _prepare(image_emb, text_emb)
    scale = _scale(logit_scale, image.device)
    loss, _, _ = _loss_op(image, text, scale, None if tiles is None else list(tiles), chunk_rows)
    return loss


# ----------------------------------------------------------------------------------------------
# distributed: local rows vs gathered columns

class _TritonPieces:
    """The Triton implementation's pieces for :class:`~loctex.kernels.distributed.GlobalNegativesLoss`
    (its LSEs are in base 2: ``_local_loss`` knows)."""

    def __init__(self, tiles, chunk_rows):
        self.opts = (tiles, chunk_rows)

    def lse(self, rows, cols, scale):
        return _lse2(rows, cols, scale, True, False, self.opts[0])[0]

    local_loss = staticmethod(_local_loss)

    def grads(self, rows, cols, scale, coef, lse_rows, offset, need_s):
        return _grads(rows, cols, scale, coef, lse_rows, None, offset, True, True, need_s, *self.opts)


def distributed_contrastive_loss_triton(image_emb, text_emb, logit_scale, group=None, *,
                                        tiles=None, chunk_rows=None):
    """The contrastive loss over the global batch of all ranks (DESIGN §3); same value and gradient
    convention as ``reference.distributed_contrastive_loss``. Single process: ``contrastive_loss_triton``."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss_triton(image_emb, text_emb, logit_scale, tiles=tiles, chunk_rows=chunk_rows)
    image, text = _prepare(image_emb, text_emb)
    scale = _scale(logit_scale, image.device)
    _, world, offset, _ = rank_offset_and_total(image.shape[0], group)
    return GlobalNegativesLoss.apply(image, text, scale, group, offset, world,
                                     _TritonPieces(tiles, chunk_rows))
