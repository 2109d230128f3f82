"""Row-wise collectives of the global-batch contrastive loss, and a safe process-group teardown.

Every rank holds ``n`` rows; the global batch is the ranks' rows concatenated in rank order.
``all_gather_rows`` builds it, ``reduce_scatter_rows`` sums a [world·n, ...] tensor over the ranks
and hands each rank its own ``n`` rows, and ``gather_rows_with_grad`` is the first with the second
as its backward (open_clip's ``gather_with_grad``). The reference loss and the Triton path share
them. They use the single-tensor collectives (``all_gather_single`` / ``reduce_scatter_single``
where torch has them, older names otherwise); torch's ``torch.distributed.nn.functional.all_gather``
is deprecated and on gloo runs its backward as ``world`` scatters.
"""
from __future__ import annotations

import time

import torch


def _dist():
    import torch.distributed as dist
    return dist


def rank_offset_and_total(n_local: int, group=None) -> tuple[int, int, int, int]:
    """``(rank, world, offset of this rank's first row, global rows)``; every rank must hold the
    same number of rows (the positives of the global batch sit at ``offset + i``)."""
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.tensor([n_local], dtype=torch.long)
    if dist.get_backend(group) == "nccl":
        sizes = sizes.cuda()
    gathered = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered, sizes, group=group)
    sizes = [int(s) for s in gathered]
    if len(set(sizes)) != 1:
        raise ValueError(f"distributed_contrastive_loss needs equal local batch sizes, got {sizes}")
    return rank, world, rank * n_local, n_local * world


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """[n, ...] on every rank -> [world·n, ...], rank 0's rows first. No autograd."""
    dist = _dist()
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks of ``x`` [world·n, ...]; returns this rank's [n, ...] slice. No autograd."""
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // world
    x = x.contiguous()
    out = x.new_empty((n, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(out, x, group=group)
    except (RuntimeError, NotImplementedError):  # backends without reduce-scatter (old gloo)
        x = x.clone()
        dist.all_reduce(x, group=group)
        out.copy_(x[rank * n:(rank + 1) * n])
    return out


class _GatherRowsWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss used every row: a row's gradient is the sum of all ranks' gradients
        return reduce_scatter_rows(grad, ctx.group), None


def gather_rows_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``all_gather_rows`` whose backward sums the gathered rows' gradients into their owners."""
    return _GatherRowsWithGrad.apply(x, group)


class GlobalNegativesLoss(torch.autograd.Function):
    """The contrastive loss over the global batch, from any implementation's blockwise pieces.

    Value: the global loss (each rank's local rows against every gathered column, summed over
    ranks). Gradients: those of this rank's local loss, with the column gradients summed over
    ranks into their owners -- the data-parallel convention of
    ``reference.distributed_contrastive_loss``. ``impl`` supplies, for one implementation
    (Triton, blocked torch):

    * ``lse(rows, cols, scale)`` -> the rows' log-sum-exp over ``scale · rows colsᵀ``;
    * ``local_loss(lse_i2t, lse_t2i, image, text, scale)`` -> this rank's loss;
    * ``grads(rows, cols, scale, coef, lse_rows, offset, need_scale)`` -> (d rows, d cols,
      d scale) of ``coef · Σ_rows (lse − positive logit)``, positives at column ``offset + i``.
    """

    @staticmethod
    def forward(ctx, image, text, scale, group, offset, world, impl):
        all_image = all_gather_rows(image, group)
        all_text = all_gather_rows(text, group)
        lse_i2t = impl.lse(image, all_text, scale)   # local images vs all captions
        lse_t2i = impl.lse(text, all_image, scale)   # local captions vs all images
        total = impl.local_loss(lse_i2t, lse_t2i, image, text, scale).detach().clone()
        _dist().all_reduce(total, group=group)
        ctx.save_for_backward(image, text, all_image, all_text, scale, lse_i2t, lse_t2i)
        ctx.group, ctx.offset, ctx.impl = group, offset, impl
        return total / world

    @staticmethod
    def backward(ctx, grad):
        image, text, all_image, all_text, scale, lse_i2t, lse_t2i = ctx.saved_tensors
        need_s = ctx.needs_input_grad[2]
        coef = (grad.float() / (2 * image.shape[0])).reshape(1)
        grads = ctx.impl.grads
        d_image, d_all_text, ds_i2t = grads(image, all_text, scale, coef, lse_i2t, ctx.offset, need_s)
        d_text, d_all_image, ds_t2i = grads(text, all_image, scale, coef, lse_t2i, ctx.offset, need_s)
        d_image += reduce_scatter_rows(d_all_image, ctx.group)
        d_text += reduce_scatter_rows(d_all_text, ctx.group)
        return (d_image.to(image.dtype), d_text.to(text.dtype), ds_i2t + ds_t2i if need_s else None,
                None, None, None, None)


def shutdown_process_group(settle_s: float = 0.05) -> None:
    """Barrier, then ``destroy_process_group``, without gloo aborting the interpreter's exit.

    A gloo worker thread drops its last reference to a finished collective after the caller has
    already been woken. If that collective held tensors made in Python, the drop needs the GIL;
    once the interpreter is finalizing, a thread that asks for the GIL is ended with
    ``pthread_exit``, whose unwinding through gloo's noexcept frames calls ``std::terminate``
    ("terminate called without an active exception", SIGABRT). It hit ~10–30% of two-rank test
    runs that exited right after a backward. The barrier ensures no rank still talks to the
    others; the sleep frees the GIL so worker threads finish their drops before anyone exits.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    time.sleep(settle_s)
    dist.destroy_process_group()
