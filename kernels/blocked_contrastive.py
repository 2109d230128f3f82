"""Symmetric InfoNCE in O(N·D) memory with plain torch ops: the CPU path of ``contrastive_loss``.

Same decomposition as the Triton kernels (``kernels/triton/contrastive.py``), one block of rows at a
time instead of one tile: ``loss = ½ (mean_i (lse_row_i − S_ii) + mean_j (lse_col_j − S_jj))`` with
``S = s · A Bᵀ``.

* forward: for each block of rows, ``S_blk = s · A_blk Bᵀ`` (one GEMM); the block's row LSEs are
  final, and the column LSEs are kept as a running max / sum-exp over the blocks. Only the row and
  column LSEs (2·N floats) are saved.
* backward: recomputes each block and forms ``G_blk = P_row + P_col − 2·I`` (P = exp(S − LSE) per
  direction); ``dA_blk = coef·s·G_blk B``, ``dB += coef·s·G_blkᵀ A_blk`` and ``d s = coef·Σ G ∘ (A Bᵀ)``.

So memory is the inputs plus a few blocks of ``block_rows × N`` (``BLOCK_BYTES`` each), and the
flops are the nominal 8·N²·D of forward + backward, all in GEMMs. Torch rather than C++ because the
work is those GEMMs, which torch hands to oneDNN/MKL at this CPU's peak, plus O(N²) vectorized
``exp``; a C++ op would call the same GEMMs and add a build to keep in step. It is device-agnostic
(the fallback on CUDA when Triton is missing).

Everything works on "rows ``a`` against columns ``b`` with the positive pair of row i at column
``i + diag_off``", so the distributed loss (local rows vs gathered columns, one direction at a
time) runs the same blocks. Accumulation is float32 (float64 for float64 inputs): bf16/fp16
embeddings are upcast once (O(N·D)) and their gradients come back in their own dtype.
"""
from __future__ import annotations

import torch

from .distributed import GlobalNegativesLoss, rank_offset_and_total
from .reference import MAX_LOGIT_SCALE

# one block of logits (the backward holds three): 64 MiB keeps the GEMMs as fast as one N x N
# product (N = 8192 forward, 2 threads: 1.6-2.0 s at 64 MiB, 2.4-3.2 s at 16 MiB, the N x N
# reference 1.9 s; smaller blocks re-pack the columns more often than they gain in cache)
BLOCK_BYTES = 64 << 20
MIN_BLOCK_ROWS = 64  # below this the GEMMs lose efficiency (when N is so large that it matters)


def block_rows_for(m: int, n: int, elt: int) -> int:
    """Rows per block: ``BLOCK_BYTES`` of logits, at least ``MIN_BLOCK_ROWS``, at most ``m``."""
    return max(1, min(m, max(MIN_BLOCK_ROWS, BLOCK_BYTES // max(1, n * elt))))


def _blocks(m: int, rows: int):
    for r0 in range(0, m, rows):
        yield r0, min(m, r0 + rows)


def lse(a, b, scale, row_stats: bool, col_stats: bool, block_rows: int | None = None):
    """Row and/or column log-sum-exp of ``scale · a bᵀ`` (natural log, a's dtype); None when not
    asked. ``a`` [M, D], ``b`` [N, D] in the compute dtype, ``scale`` [1]."""
    M, N = a.shape[0], b.shape[0]
    rows = block_rows or block_rows_for(M, N, a.element_size())
    row_lse = a.new_empty(M) if row_stats else None
    col_max = a.new_full((N,), float("-inf")) if col_stats else None
    col_sum = a.new_zeros(N) if col_stats else None
    bt = b.t()
    for r0, r1 in _blocks(M, rows):
        s = torch.mm(a[r0:r1], bt).mul_(scale)
        if row_stats:
            row_lse[r0:r1] = torch.logsumexp(s, dim=1)
        if col_stats:
            new_max = torch.maximum(col_max, s.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(s.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
        del s
    return row_lse, (col_max + col_sum.log() if col_stats else None)


def grads(a, b, scale, coef, lse_r, lse_c, diag_off: int, need_a: bool, need_b: bool, need_s: bool,
          block_rows: int | None = None):
    """Gradients of ``coef · Σ_rows (LSEs − positive logit)`` over ``S = scale · a bᵀ``, one block
    of rows at a time: ``(dA [M, D], dB [N, D], d scale [1])``, each None when not needed."""
    M, N = a.shape[0], b.shape[0]
    rows = block_rows or block_rows_for(M, N, a.element_size())
    n_dir = (lse_r is not None) + (lse_c is not None)
    da = a.new_empty(a.shape) if need_a else None
    db = b.new_zeros(b.shape) if need_b else None
    ds = a.new_zeros(1) if need_s else None
    bt = b.t()
    for r0, r1 in _blocks(M, rows):
        dots = torch.mm(a[r0:r1], bt)
        s = dots * scale
        g = torch.sub(s, lse_r[r0:r1, None]).exp_() if lse_r is not None else None
        if lse_c is not None:
            p_col = s.sub_(lse_c[None, :]).exp_()
            g = p_col if g is None else g.add_(p_col)
        del s
        g.diagonal(offset=r0 + diag_off).sub_(n_dir)  # entries (i, i + r0 + diag_off): positives
        if need_s:
            ds += torch.dot(g.reshape(-1), dots.reshape(-1))
        del dots
        if need_a:
            torch.mm(g, b, out=da[r0:r1])
        if need_b:
            db.addmm_(g.t(), a[r0:r1])
        del g
    factor = coef * scale
    return (None if da is None else da.mul_(factor), None if db is None else db.mul_(factor),
            None if ds is None else ds.mul_(coef))


def _positive_logits(image, text, scale):
    return scale * (image * text).sum(-1)


def _local_loss(lse_i2t, lse_t2i, image, text, scale):
    """``½ (mean(lse_i2t − S_ii) + mean(lse_t2i − S_ii))`` over the local rows."""
    diag = _positive_logits(image, text, scale)
    return 0.5 * ((lse_i2t - diag).sum() + (lse_t2i - diag).sum()) / image.shape[0]


class _BlockedContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, block_rows):
        lse_r, lse_c = lse(image, text, scale, True, True, block_rows)
        ctx.save_for_backward(image, text, scale, lse_r, lse_c)
        ctx.block_rows = block_rows
        return _local_loss(lse_r, lse_c, image, text, scale)

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, lse_r, lse_c = ctx.saved_tensors
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        coef = grad.reshape(1) / (2 * image.shape[0])
        d_image, d_text, ds = grads(image, text, scale, coef, lse_r, lse_c, 0, need_i, need_t,
                                    need_s, ctx.block_rows)
        return d_image, d_text, ds, None


class _BlockedPieces:
    """The blocked implementation's pieces for :class:`~loctex.kernels.distributed.GlobalNegativesLoss`."""

    def __init__(self, block_rows: int | None):
        self.block_rows = block_rows

    def lse(self, rows, cols, scale):
        return lse(rows, cols, scale, True, False, self.block_rows)[0]

    local_loss = staticmethod(_local_loss)

    def grads(self, rows, cols, scale, coef, lse_rows, offset, need_s):
        return grads(rows, cols, scale, coef, lse_rows, None, offset, True, True, need_s,
                     self.block_rows)


def _prepare(image_emb, text_emb, logit_scale):
    """Embeddings in the compute dtype (float32, or float64 for float64 inputs) and ``s`` [1] in
    autograd (``exp`` clamped ≤ 100, so the clamp's zero gradient is torch's, as in the reference)."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"contrastive loss needs two [N, D] tensors of one shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("contrastive loss of an empty batch")
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    ls = torch.as_tensor(logit_scale, device=image_emb.device)
    scale = torch.exp(ls.to(dtype)).clamp(max=MAX_LOGIT_SCALE).reshape(1)
    return image_emb.to(dtype).contiguous(), text_emb.to(dtype).contiguous(), scale


def contrastive_loss_blocked(image_emb, text_emb, logit_scale, *, block_rows: int | None = None):
    """Symmetric InfoNCE of DESIGN §3 (value and gradients as ``reference.contrastive_loss``) in
    O(N·D) memory. ``block_rows`` fixes the rows per block (tests); by default ``block_rows_for``.
    Returns a float32 scalar (float64 for float64 inputs)."""
    image, text, scale = _prepare(image_emb, text_emb, logit_scale)
    return _BlockedContrastiveLoss.apply(image, text, scale, block_rows)


def distributed_contrastive_loss_blocked(image_emb, text_emb, logit_scale, group=None, *,
                                         block_rows: int | None = None):
    """The contrastive loss over the global batch of all ranks (DESIGN §3); same value and gradient
    convention as ``reference.distributed_contrastive_loss``. Single process: ``contrastive_loss_blocked``."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss_blocked(image_emb, text_emb, logit_scale, block_rows=block_rows)
    image, text, scale = _prepare(image_emb, text_emb, logit_scale)
    _, world, offset, _ = rank_offset_and_total(image.shape[0], group)
    return GlobalNegativesLoss.apply(image, text, scale, group, offset, world, _BlockedPieces(block_rows))
