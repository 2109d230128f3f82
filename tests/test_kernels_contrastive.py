"""The Triton contrastive loss (kernels/triton/contrastive.py) against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py), with small tiles so that several tiles,
K steps, forward chunks (merged by log-sum-exp) and backward row blocks are exercised on small N.
"""
import math
import os
import socket

import pytest
import torch

import loctex.kernels as K
from loctex.kernels import reference, testing
from loctex.kernels.distributed import shutdown_process_group
from loctex.kernels.triton.contrastive import contrastive_loss_triton, distributed_contrastive_loss_triton

# float32 inputs: float32 accumulation like the reference. Each row/column LSE is one float32, so
# the loss carries an absolute error of a few ulp of the largest logit (s · max cos ≤ s; checked
# as 4 ulp(s) on top of the relative tolerance), and when the softmax saturates (P_ii → 1, tiny
# loss) exp(S − LSE) carries that error into the gradients: up to ~3e-5 of the largest entry here.
FP32_TOL = dict(loss=2e-6, grad=1e-4)
# bf16 inputs: the logits accumulate in float32 from exact bf16 products; the backward feeds the
# tensor cores the softmax-gradient tile rounded to bf16 (8 bits), so gradients carry ~0.5% noise.
BF16_TOL = dict(loss=1e-5, grad=2e-2)




def _check(loss, grads, ref_loss, ref_grads, tol, logit_scale):
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss).item() <= testing.contrastive_loss_tolerance(tol, ref_loss, logit_scale)
    for name, g, r in zip(("image", "text", "logit_scale"), grads, ref_grads):
        # relative to the largest entry, floored: a saturated softmax has ~0 gradients (see FP32_TOL)
        scale = max(r.abs().max().item(), 1e-3)
        err = (g.double() - r).abs().max().item()
        assert err <= tol["grad"] * scale, f"d{name}: max error {err:.3g} vs scale {scale:.3g}"


def _reference64(image, text, logit_scale):
    return testing.loss_and_grads(reference.contrastive_loss, image.double(), text.double(), logit_scale.double())


@pytest.mark.parametrize("n, d, tiles, chunk_rows", [
    (1, 16, (16, 16, 16), None),    # one pair: loss 0, gradients 0
    (7, 24, (16, 16, 16), None),    # one partial tile, two K steps
    (33, 40, (16, 32, 16), 16),     # N not a multiple of the tile, D not one of BLOCK_K; blocks of
                                    # 16 < 4·D rows: d(text) from a second pass over column blocks
    (69, 48, (32, 16, 32), 32),     # several row and column chunks in the forward
    (69, 8, (16, 16, 16), 32),      # 32 >= 4·D rows per block: one pass, 3 row blocks
])
def test_fp32_matches_reference(n, d, tiles, chunk_rows):
    image, text, ls = testing.contrastive_inputs(n, d, logit_scale=math.log(20.0), seed=n)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_triton(*a, tiles=tiles, chunk_rows=chunk_rows),
                       image, text, ls)
    _check(loss, grads, *_reference64(image, text, ls), FP32_TOL, ls)


def test_backward_blocks_of_g_stay_within_the_bound(monkeypatch):
    from loctex.kernels.triton import contrastive as C
    # at the paper's largest batch a block of G holds at most G_BLOCK_BYTES (256 MiB)
    n, d = 1 << 20, 512
    for elt in (4, 2):
        assert C._block_len(n, elt) * n * elt <= C.G_BLOCK_BYTES
        assert C.backward_passes(n, n, d, elt) == 2
    assert C.backward_passes(1 << 16, 1 << 16, d, 2) == 1     # 2,048 bf16 rows = 4·D in 256 MiB
    # and the launcher keeps to it: a bound of 4 KiB on 45 x 45 float32 logits (16-row blocks)
    monkeypatch.setattr(C, "G_BLOCK_BYTES", 4096)
    shapes = []
    softmax_grad = C._softmax_grad
    monkeypatch.setattr(C, "_softmax_grad", lambda *a, **k: shapes.append(
        (g := softmax_grad(*a, **k)).shape) or g)
    image, text, ls = testing.contrastive_inputs(45, 24, seed=8)
    loss, grads = testing.loss_and_grads(contrastive_loss_triton, image, text, ls)
    assert max(r * c for r, c in shapes) * 4 <= 4096
    assert {r for r, c in shapes} >= {45} and {c for r, c in shapes} >= {45}  # both passes ran
    _check(loss, grads, *_reference64(image, text, ls), FP32_TOL, ls)


def test_dispatch_provider_triton():
    image, text, ls = testing.contrastive_inputs(37, 32, seed=1)
    loss, grads = testing.loss_and_grads(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    _check(loss, grads, *_reference64(image, text, ls), FP32_TOL, ls)


def test_clamped_logit_scale_has_zero_gradient():
    image, text, ls = testing.contrastive_inputs(21, 24, logit_scale=math.log(150.0), seed=2)
    loss, grads = testing.loss_and_grads(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert grads[2].item() == 0.0 and ref_grads[2].item() == 0.0
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL, ls)


def test_logit_scale_gradient_unclamped_is_nonzero():
    image, text, ls = testing.contrastive_inputs(21, 24, logit_scale=math.log(99.0), agreement=0.1, seed=3)
    loss, grads = testing.loss_and_grads(lambda *a: K.contrastive_loss(*a, provider="triton"), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert abs(ref_grads[2].item()) > 1e-3
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL, ls)


@pytest.mark.parametrize("n, d, tiles, chunk_rows", [(69, 48, (16, 32, 16), 32), (16, 64, (16, 16, 32), None)])
def test_bf16_inputs(n, d, tiles, chunk_rows):
    image, text, ls = testing.contrastive_inputs(n, d, dtype=torch.bfloat16, seed=4)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_triton(*a, tiles=tiles, chunk_rows=chunk_rows),
                       image, text, ls)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    # the reference sees the same (bf16-rounded) numbers, in float64
    _check(loss, grads, *_reference64(image, text, ls), BF16_TOL, ls)


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
        for name, fn in (("triton", lambda *a: distributed_contrastive_loss_triton(*a, chunk_rows=8)),
                         ("reference", reference.distributed_contrastive_loss)):
            loss, grads = testing.loss_and_grads(fn, image[rows], text[rows], ls)
            result[name] = (loss, grads)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown_process_group()


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
            assert abs(loss.double() - ref_loss).item() <= testing.contrastive_loss_tolerance(FP32_TOL, ref_loss, ls), provider
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
