"""The Triton contrastive loss (kernels/triton/contrastive.py) against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py), with small tiles so that several tiles,
column chunks and atomically merged column splits are exercised on small N.
"""
import math
import os
import socket

import pytest
import torch

import loctex.kernels as K
from loctex.kernels import reference, testing
from loctex.kernels.triton.contrastive import contrastive_loss_triton, distributed_contrastive_loss_triton

# float32 inputs: float32 accumulation like the reference. The backward rebuilds the softmax as
# exp(S − LSE) from one stored float32 LSE, so when the softmax saturates (P_ii → 1, tiny loss)
# the gradient error is ~ulp(max logit) / its size: up to ~3e-5 of the largest entry here.
FP32_TOL = dict(loss=2e-6, grad=1e-4)
# bf16 inputs: the logits accumulate in float32 from exact bf16 products; the backward feeds the
# tensor cores the softmax-gradient tile rounded to bf16 (8 bits), so gradients carry ~0.5% noise.
BF16_TOL = dict(loss=1e-5, grad=2e-2)


def _run(fn, image, text, logit_scale):
    """loss and (d image, d text, d logit_scale) of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, logit_scale)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _check(loss, grads, ref_loss, ref_grads, tol):
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss).item() <= tol["loss"] * max(1.0, abs(ref_loss.item()))
    for name, g, r in zip(("image", "text", "logit_scale"), grads, ref_grads):
        scale = max(r.abs().max().item(), 1e-3)   # gradients relative to their largest entry
        err = (g.double() - r).abs().max().item()
        assert err <= tol["grad"] * scale, f"d{name}: max error {err:.3g} vs scale {scale:.3g}"


def _reference64(image, text, logit_scale):
    return _run(reference.contrastive_loss, image.double(), text.double(), logit_scale.double())


@pytest.mark.parametrize("n, d, tiles", [
    (1, 16, (16, 16)),      # one pair: loss 0, gradients 0
    (7, 24, (16, 16)),      # one partial tile
    (33, 40, (16, 32)),     # N not a multiple of the tile, D not a power of two, column splits
    (69, 48, (32, 16)),     # several row and column chunks
])
def test_fp32_matches_reference(n, d, tiles):
    image, text, ls = testing.contrastive_inputs(n, d, logit_scale=math.log(20.0), seed=n)
    loss, grads = _run(lambda *a: contrastive_loss_triton(*a, tiles=tiles), image, text, ls)
    _check(loss, grads, *_reference64(image, text, ls), FP32_TOL)


def test_dispatch_provider_triton():
    image, text, ls = testing.contrastive_inputs(37, 32, seed=1)
    loss, grads = _run(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    _check(loss, grads, *_reference64(image, text, ls), FP32_TOL)


def test_clamped_logit_scale_has_zero_gradient():
    image, text, ls = testing.contrastive_inputs(21, 24, logit_scale=math.log(150.0), seed=2)
    loss, grads = _run(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert grads[2].item() == 0.0 and ref_grads[2].item() == 0.0
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL)


def test_logit_scale_gradient_unclamped_is_nonzero():
    image, text, ls = testing.contrastive_inputs(21, 24, logit_scale=math.log(99.0), agreement=0.1, seed=3)
    loss, grads = _run(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert abs(ref_grads[2].item()) > 1e-3
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL)


@pytest.mark.parametrize("n, d, tiles", [(69, 48, (16, 32)), (16, 64, (16, 16))])
def test_bf16_inputs(n, d, tiles):
    image, text, ls = testing.contrastive_inputs(n, d, dtype=torch.bfloat16, seed=4)
    loss, grads = _run(lambda *a: contrastive_loss_triton(*a, tiles=tiles), image, text, ls)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    # the reference sees the same (bf16-rounded) numbers, in float64
    _check(loss, grads, *_reference64(image, text, ls), BF16_TOL)


def test_only_logit_scale_requires_grad():
    image, text, ls = testing.contrastive_inputs(19, 16, seed=5)
    ls = ls.clone().requires_grad_()
    K.contrastive_loss(image, text, ls, provider="triton").backward()
    ls64 = ls.detach().double().requires_grad_()
    reference.contrastive_loss(image.double(), text.double(), ls64).backward()
    assert abs(ls.grad.item() - ls64.grad.item()) <= FP32_TOL["grad"] * abs(ls64.grad.item())


def test_rejects_bad_shapes():
    image, text, ls = testing.contrastive_inputs(4, 8, seed=6)
    with pytest.raises(ValueError):
        K.contrastive_loss(image, text[:3], ls, provider="triton")
    with pytest.raises(ValueError):
        K.contrastive_loss(image[:0], text[:0], ls, provider="triton")


# ---------------------------------------------------------------------------------------------
# distributed, 2 gloo ranks

WORLD, N_LOCAL, DIM = 2, 13, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        image, text, ls = testing.contrastive_inputs(WORLD * N_LOCAL, DIM, logit_scale=math.log(30.0), seed=7)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        result = {}
        for name, fn in (("triton", distributed_contrastive_loss_triton),
                         ("reference", reference.distributed_contrastive_loss)):
            loss, grads = _run(fn, image[rows], text[rows], ls)
            result[name] = (loss, grads)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    image, text, ls = testing.contrastive_inputs(WORLD * N_LOCAL, DIM, logit_scale=math.log(30.0), seed=7)
    ref_loss, (g_image, g_text, g_ls) = _reference64(image, text, ls)
    for provider in ("triton", "reference"):
        for r, result in enumerate(ranks):
            loss, (d_image, d_text, d_ls) = result[provider]
            rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            # value: the single-process loss of the concatenated batch, on every rank
            assert abs(loss.double() - ref_loss).item() <= FP32_TOL["loss"] * max(1.0, ref_loss.item()), provider
            # gradients, data-parallel form: world x the rank's slice of the single-process gradient
            for g, ref in ((d_image, g_image[rows]), (d_text, g_text[rows])):
                err = (g.double() - WORLD * ref).abs().max().item()
                assert err <= FP32_TOL["grad"] * WORLD * g_image.abs().max().item(), provider
        # the replicated logit_scale: averaged over ranks it is the single-process gradient
        mean_ls = sum(result[provider][1][2].double() for result in ranks) / WORLD
        assert abs(mean_ls - g_ls).item() <= FP32_TOL["grad"] * abs(g_ls.item()), provider
    # and the two providers agree rank by rank
    for result in ranks:
        for g_tri, g_ref in zip(result["triton"][1], result["reference"][1]):
            torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-6)
