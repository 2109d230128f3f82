"""The blocked O(N·D) contrastive loss (kernels/blocked_contrastive.py), the CPU path of
``contrastive_loss``, against the float64 reference: values and all three gradients on awkward N
(one pair, a prime, not a multiple of the block, several blocks), float32 and bfloat16 inputs, the
global-batch loss on two gloo ranks, and memory that does not grow with N²."""
import math
import os
import socket

import pytest
import torch

import loctex.kernels as K
from loctex.kernels import bench, reference, testing
from loctex.kernels.blocked_contrastive import (block_rows_for, contrastive_loss_blocked,
                                                distributed_contrastive_loss_blocked)
from loctex.kernels.distributed import shutdown_process_group

# float32 accumulation against float64: each LSE is one float32 (a few ulp of the largest logit s
# on the loss, added in _loss_tol); the gradients exp(S − LSE) carry that relative error.
FP32_TOL = dict(loss=2e-6, grad=2e-5)
# bf16 inputs: the reference sees the same rounded numbers in float64; the loss is computed in
# float32, and the gradients are rounded to bf16 on return (2^-8 relative per entry).
BF16_TOL = dict(loss=2e-6, grad=8e-3)



def _reference64(image, text, logit_scale):
    return testing.loss_and_grads(reference.contrastive_loss, image.double(), text.double(), logit_scale.double())



def _check(loss, grads, ref_loss, ref_grads, tol, logit_scale, dtype):
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss).item() <= testing.contrastive_loss_tolerance(tol, ref_loss, logit_scale)
    for name, g, r in zip(("image", "text", "logit_scale"), grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "logit_scale" else dtype), name
        scale = max(r.abs().max().item(), 1e-3)  # a saturated softmax has ~0 gradients
        err = (g.double() - r).abs().max().item()
        assert err <= tol["grad"] * scale, f"d{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("n, d, block_rows", [
    (1, 16, None),    # one pair: loss 0, gradients 0
    (97, 40, None),   # a prime, one block
    (97, 40, 16),     # 6 full blocks and one of a single row
    (130, 24, 64),    # two full blocks and a remainder of 2
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(n, d, block_rows, dtype):
    image, text, ls = testing.contrastive_inputs(n, d, dtype=dtype, logit_scale=math.log(20.0),
                                                 agreement=0.5, seed=n + d)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_blocked(*a, block_rows=block_rows), image, text, ls)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    _check(loss, grads, *_reference64(image, text, ls), tol, ls, dtype)


def test_one_pair_has_zero_loss_and_gradients():
    image, text, ls = testing.contrastive_inputs(1, 8, seed=3)
    loss, grads = testing.loss_and_grads(contrastive_loss_blocked, image, text, ls)
    # the LSE comes from a GEMM, the positive logit from a dot product: equal up to rounding
    assert abs(loss.item()) <= testing.contrastive_loss_tolerance(FP32_TOL, 0.0, ls)
    assert all(g.abs().max().item() == 0.0 for g in grads)


def test_clamped_and_large_logit_scale():
    image, text, ls = testing.contrastive_inputs(53, 16, logit_scale=math.log(150.0), seed=4)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_blocked(*a, block_rows=8), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert grads[2].item() == 0.0 and ref_grads[2].item() == 0.0   # the clamp at 100
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL, ls, torch.float32)
    image, text, ls = testing.contrastive_inputs(53, 16, logit_scale=math.log(99.0), agreement=0.1, seed=5)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_blocked(*a, block_rows=8), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert abs(ref_grads[2].item()) > 1e-3
    _check(loss, grads, ref_loss, ref_grads, FP32_TOL, ls, torch.float32)


def test_float64_inputs_stay_float64():
    image, text, ls = testing.contrastive_inputs(29, 8, dtype=torch.float64, seed=6)
    loss, grads = testing.loss_and_grads(lambda *a: contrastive_loss_blocked(*a, block_rows=7), image, text, ls)
    ref_loss, ref_grads = _reference64(image, text, ls)
    assert loss.dtype == torch.float64
    assert abs(loss - ref_loss).item() <= 1e-12
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_only_some_inputs_require_grad():
    image, text, ls = testing.contrastive_inputs(31, 12, seed=7)
    ref = _reference64(image, text, ls)[1]
    t = text.clone().requires_grad_()
    contrastive_loss_blocked(image, t, ls, block_rows=5).backward()
    assert (t.grad.double() - ref[1]).abs().max().item() <= FP32_TOL["grad"] * ref[1].abs().max().item()
    s = ls.clone().requires_grad_()
    contrastive_loss_blocked(image, text, s, block_rows=5).backward()
    assert abs(s.grad.item() - ref[2].item()) <= FP32_TOL["grad"] * max(abs(ref[2].item()), 1e-3)


def test_auto_dispatch_on_cpu_is_the_blocked_path():
    image, text, ls = testing.contrastive_inputs(45, 16, seed=8)
    auto, _ = testing.loss_and_grads(K.contrastive_loss, image, text, ls)
    blocked, _ = testing.loss_and_grads(lambda *a: K.contrastive_loss(*a, provider="blocked"), image, text, ls)
    assert auto.item() == blocked.item()
    x = testing.trace_inputs(1, 2, (2, 2), 4, seed=0)
    with pytest.raises(ValueError, match="no blocked implementation"):
        K.render_traces(x["points_xy"], x["point_weights"], x["token_ranges"], (2, 2), 0.1,
                        provider="blocked")
    with pytest.raises(ValueError):
        contrastive_loss_blocked(image, text[:3], ls)
    with pytest.raises(ValueError):
        contrastive_loss_blocked(image[:0], text[:0], ls)


def test_memory_is_linear_in_n():
    """N = 8192: the reference's logits alone are 256 MiB (N² float32); the blocked pass holds a
    few blocks of block_rows × N (3 × 8 MiB here) and the O(N·D) inputs and gradients."""
    n, d, rows = 8192, 8, 256
    image, text, ls = testing.contrastive_inputs(n, d, seed=9)
    leaves = [t.requires_grad_() for t in (image, text, ls)]
    peak_mb = bench._peak_mb(lambda: contrastive_loss_blocked(*leaves, block_rows=rows).backward(),
                             leaves, "cpu")
    assert 0 < peak_mb < 48, peak_mb
    assert n * n * 4 / 2**20 == 256


def test_block_rows_for():
    assert block_rows_for(65536, 65536, 4) == 256          # 64 MiB of float32 logits
    assert block_rows_for(10, 65536, 4) == 10               # never more rows than there are
    assert block_rows_for(2**20, 2**20, 4) == 64            # at least MIN_BLOCK_ROWS


# ---------------------------------------------------------------------------------------------
# distributed, 2 gloo ranks (local rows against the gathered global columns)

WORLD, N_LOCAL, DIM = 2, 23, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(dtype):
    return testing.contrastive_inputs(WORLD * N_LOCAL, DIM, dtype=dtype, logit_scale=math.log(30.0), seed=11)


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for dtype in (torch.float32, torch.bfloat16):
            image, text, ls = _inputs(dtype)
            rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            result[str(dtype)] = testing.loss_and_grads(lambda *a: distributed_contrastive_loss_blocked(*a, block_rows=6),
                                      image[rows], text[rows], ls)
        result["auto"] = testing.loss_and_grads(K.distributed_contrastive_loss, *(t[rows] for t in _inputs(torch.float32)[:2]),
                              _inputs(torch.float32)[2])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown_process_group()


def test_distributed_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for dtype in (torch.float32, torch.bfloat16):
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        image, text, ls = _inputs(dtype)
        ref_loss, (g_image, g_text, g_ls) = _reference64(image, text, ls)
        for r, result in enumerate(ranks):
            loss, (d_image, d_text, _) = result[str(dtype)]
            rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            # value: the single-process loss of the concatenated batch, on every rank
            assert abs(loss.double() - ref_loss).item() <= testing.contrastive_loss_tolerance(tol, ref_loss, ls)
            # gradients, data-parallel form: world × the rank's slice of the single-process gradient
            for g, ref in ((d_image, g_image[rows]), (d_text, g_text[rows])):
                assert g.dtype == dtype
                err = (g.double() - WORLD * ref).abs().max().item()
                assert err <= tol["grad"] * WORLD * g_image.abs().max().item()
        # the replicated logit_scale: averaged over ranks it is the single-process gradient
        mean_ls = sum(result[str(dtype)][1][2].double() for result in ranks) / WORLD
        assert abs(mean_ls - g_ls).item() <= tol["grad"] * abs(g_ls.item())
    for result in ranks:  # the dispatcher picks the blocked path on CPU
        assert result["auto"][0].item() == pytest.approx(result[str(torch.float32)][0].item(), abs=1e-6)
