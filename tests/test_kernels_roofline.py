"""The roofline on paper (kernels/roofline.py) and the targets table (kernels/targets.py), on
shapes small enough to count by hand."""
import math

import pytest
import torch

from loctex.kernels import roofline, targets
from loctex.kernels.roofline import H100_SXM, Cost


def test_bound_is_the_slowest_resource_at_the_datasheet_rates():
    assert Cost(bytes=3.35e12).bound_s() == pytest.approx(1.0)
    assert Cost(mma_flops=989.4e12, mma_dtype="bfloat16").bound_s() == pytest.approx(1.0)
    assert Cost(mma_flops=494.7e12, mma_dtype="tf32").bound_s() == pytest.approx(1.0)
    assert Cost(mma_flops=67e12, mma_dtype="float32").bound_s() == pytest.approx(1.0)
    c = Cost(bytes=3.35e12, mma_flops=2 * 989.4e12, mma_dtype="bfloat16", transcendentals=1.0)
    assert c.bound_s() == pytest.approx(2.0) and c.limiter() == "mma"
    # 132 SMs x 16 exp2 per clock at the 1.83 GHz the datasheet's bf16 rate implies
    assert H100_SXM.sfu_per_s == pytest.approx(3.865e12, rel=1e-3)
    with pytest.raises(ValueError):
        Cost(mma_flops=1, mma_dtype="bfloat16") + Cost(mma_flops=1, mma_dtype="float32")


def test_count_eager_on_hand_counted_ops():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    c = roofline.count_eager(lambda: a + b)
    assert (c.bytes, c.mma_flops, c.vector_flops, c.transcendentals) == (3 * 48, 0, 12, 0)
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    c = roofline.count_eager(lambda: x @ w)
    assert (c.bytes, c.mma_flops) == (24 + 48 + 32, 2 * 2 * 3 * 4)
    # views move nothing; a broadcast input is read once; exp is one transcendental per element
    row = torch.randn(1, 4)
    c = roofline.count_eager(lambda: (a.t().t() * row.expand(3, 4)).exp())
    assert c.bytes == (48 + 16 + 48) + (48 + 48)
    assert c.transcendentals == 12 and c.vector_flops == 12
    # shape-only reads are not reads: zeros_like writes 48 bytes and reads none
    assert roofline.count_eager(lambda: torch.zeros_like(a)).bytes == 48


def test_trace_fused_formula_by_hand():
    # B=2, L=3 (T=6 tokens), grid 2x2 (N=4 cells), D=8, 5 points per token, bf16 (2 bytes)
    c = roofline.trace_loss_fused(2, 3, (2, 2), 8, 5, torch.bfloat16)
    q, k = 6 * 8 * 2, 2 * 4 * 8 * 2             # 96, 128
    pts, ranges = 6 * 5 * 12, 6 * 8             # 360, 48
    forward = q + k + pts + ranges + 6 * 4 * 4                          # + lse, ΣR, T, per-token loss
    backward = q + k + pts + ranges + 6 * 5 * 4 + 6 * 8 * 4 + 2 * 2 * 4 * 8 * 4   # + dq, dk (zero, write)
    casts = (6 * 8 + 2 * 4 * 8) * (4 + 2)
    assert c.bytes == forward + backward + casts
    assert c.mma_flops == 8 * 6 * 4 * 8 and c.mma_dtype == "bfloat16"
    assert c.transcendentals == 2 * 6 * 4 * 5 + 3 * 6 * 4
    # fp32 operands take exact fp32 dots: the FP32 rate
    assert roofline.trace_loss_fused(2, 3, (2, 2), 8, 5, torch.float32).mma_dtype == "float32"


def test_contrastive_fused_formula_by_hand():
    c = roofline.contrastive_fused(3, 4, torch.bfloat16)
    emb = 2 * 3 * 4 * 2                                            # both embeddings, bf16
    assert c.bytes == (2 * emb + 2 * 3 * 4) + (2 * emb + 2 * 3 * 4 + 3 * 9 * 2 + 2 * 3 * 4 * 4) \
        + 2 * 3 * 4 * 6
    assert (c.mma_flops, c.mma_dtype, c.transcendentals) == (8 * 9 * 4, "bfloat16", 4 * 9)
    c32 = roofline.contrastive_fused(3, 4, torch.float32)          # 3xTF32
    assert (c32.mma_flops, c32.mma_dtype) == (3 * 8 * 9 * 4, "tf32")


def test_contrastive_fused_counts_the_second_backward_pass_at_large_n():
    # N = 2^20, D = 512, bf16: G's row blocks hold 128 rows < 4·D, so the backward recomputes G
    # over column blocks for the text gradient (kernels/triton/contrastive.py).
    n, d = 1 << 20, 512
    c = roofline.contrastive_fused(n, d, torch.bfloat16)
    assert c.mma_flops == 10.0 * n * n * d
    assert c.transcendentals == 6.0 * n * n
    assert c.bytes > 4 * n * n * 2          # G written and read twice
    small = roofline.contrastive_fused(4096, d, torch.bfloat16)
    assert small.mma_flops == 8.0 * 4096 * 4096 * d


def test_reference_counts_extrapolate_exactly_and_match_the_known_matmuls():
    B, L, grid, D, ppt = 3, 5, (3, 4), 8, 3
    direct = roofline._count_trace("trace_attention_loss", B, L, grid, D, ppt, torch.bfloat16)
    fitted = roofline.trace_reference("trace_attention_loss", B, L, grid, D, ppt, torch.bfloat16)
    assert direct == fitted
    T, N = B * L, grid[0] * grid[1]
    assert direct.mma_flops == 6 * T * N * D          # logits, then dq and dk, all in float32
    # it materializes the [pairs, cells, 2] offsets and [pairs, cells] Gaussians, and the
    # [T, N] heat maps, logits and log-softmax: at least a write and a read of each
    pairs = T * ppt
    assert direct.bytes > 2 * (pairs * N * 8 + pairs * N * 4 + 3 * T * N * 4)
    n, d = 12, 6
    c = roofline.contrastive_reference(n, d, torch.float32)
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(n, d, generator=g).requires_grad_() for _ in range(2)]
    ls = torch.tensor(math.log(10.0), requires_grad=True)
    from loctex.kernels import reference
    direct = roofline.count_eager(lambda: reference.contrastive_loss(*leaves, ls).backward())
    assert c == direct
    assert c.mma_flops == 6 * n * n * d


def test_roofline_ratio_and_paper_targets():
    r = roofline.roofline("trace_attention_loss", {"B": 4, "L": 8, "grid": (7, 7), "D": 32, "ppt": 20},
                          torch.bfloat16)
    assert r["triton"]["bound_ratio"] == pytest.approx(r["reference"]["bound_ms"] / r["triton"]["bound_ms"])
    assert r["triton"]["bytes"] < r["reference"]["bytes"]
    rows = [{"kernel": "trace_attention_loss", "provider": "triton", "metric": "bound_ratio",
             "shape": "B=256,L=96,grid=7x7,D=256,pts/token=20", "value": 12.0},
            {"kernel": "trace_attention_loss", "provider": "triton", "metric": "bound_ratio",
             "shape": "B=256,L=96,grid=14x14,D=256,pts/token=20", "value": 9.0}]
    verdicts = [met for t, met, _ in targets.evaluate(rows, {"paper"})]
    assert verdicts == [True, False]
    lines = targets.summary_lines(targets.evaluate(rows, {"cuda"}))
    assert lines and all(line.startswith("[not measured]") for line in lines)
