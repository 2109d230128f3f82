"""The reference losses (kernels/reference.py) against hand-computed cases, gradient checks, and the
distributed contrastive loss on 2 gloo ranks (DESIGN §3)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import loctex.kernels as K
from loctex.kernels import reference as R
from loctex.kernels.distributed import shutdown_process_group

LOSS_TYPES = R.LOSS_TYPES


def ranges(*per_token):
    """[(start, end), ...] for one batch row -> int32 [1, L, 2]."""
    return torch.tensor([list(per_token)], dtype=torch.int32)


def cell_center(h, w, H, W):
    return [(w + 0.5) / W, (h + 0.5) / H]


def gaussian_heat(points, weights, H, W, sigma):
    """R(h, w) written out with loops and math.exp, normalized."""
    R_ = [[sum(wt * math.exp(-((x - (w + 0.5) / W) ** 2 + (y - (h + 0.5) / H) ** 2) / (2 * sigma ** 2))
               for (x, y), wt in zip(points, weights)) for w in range(W)] for h in range(H)]
    total = sum(map(sum, R_))
    return torch.tensor(R_, dtype=torch.float64) / total


# ---- rendering ------------------------------------------------------------------------------------
def test_one_point_at_a_cell_center():
    H, W = 2, 3  # not square: x indexes columns (W), y rows (H)
    pts = torch.tensor([cell_center(0, 2, H, W)], dtype=torch.float64)
    heat, valid = R.render_traces(pts, torch.ones(1, dtype=torch.float64), ranges((0, 1)), (H, W), 0.2)
    assert heat.shape == (1, 1, H, W) and bool(valid.all())
    torch.testing.assert_close(heat[0, 0], gaussian_heat(pts.tolist(), [1.0], H, W, 0.2))
    assert heat[0, 0].argmax() == 2  # row 0, column 2
    # a narrow kernel puts all the mass on that cell
    heat, _ = R.render_traces(pts.float(), torch.ones(1), ranges((0, 1)), (H, W), 0.01)
    expected = torch.zeros(H, W)
    expected[0, 2] = 1
    torch.testing.assert_close(heat[0, 0], expected)


def test_two_points_with_weights():
    H, W = 4, 4
    pts = [cell_center(1, 1, H, W), cell_center(3, 2, H, W)]
    heat, valid = R.render_traces(torch.tensor(pts), torch.tensor([1.0, 3.0]), ranges((0, 2)), (H, W), 0.01)
    assert bool(valid.all())
    assert heat[0, 0, 1, 1].item() == pytest.approx(0.25, abs=1e-6)
    assert heat[0, 0, 3, 2].item() == pytest.approx(0.75, abs=1e-6)
    heat, _ = R.render_traces(torch.tensor(pts, dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64),
                              ranges((0, 2)), (H, W), 0.3)
    torch.testing.assert_close(heat[0, 0], gaussian_heat(pts, [1.0, 3.0], H, W, 0.3))


def test_each_token_uses_only_its_range():
    pts = torch.tensor([cell_center(0, 0, 2, 2), cell_center(1, 1, 2, 2), cell_center(0, 1, 2, 2)])
    heat, valid = R.render_traces(pts, torch.ones(3), ranges((0, 1), (1, 3), (3, 3)), (2, 2), 0.01)
    assert valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(heat[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(heat[0, 1], torch.tensor([[0.0, 0.5], [0.0, 0.5]]))


def test_empty_range_or_vanishing_mass_is_not_valid():
    pts = torch.tensor([[0.5, 0.5], [50.0, 50.0]])
    heat, valid = R.render_traces(pts, torch.ones(2), ranges((0, 0), (1, 1), (1, 2)), (3, 3), 0.05)
    assert valid.tolist() == [[False, False, False]]  # empty, empty, all weight far away
    assert torch.count_nonzero(heat) == 0
    # the loss over no valid target is 0, and still differentiable
    q = torch.randn(1, 3, 4, requires_grad=True)
    k = torch.randn(1, 9, 4, requires_grad=True)
    loss = R.trace_attention_loss(q, k, pts, torch.ones(2), ranges((0, 0), (1, 1), (1, 2)),
                                  torch.ones(1, 3, dtype=torch.bool), (3, 3), 0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0


# ---- localization loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_softmax_of_equal_logits_against_one_hot_target(loss_type):
    H, W = 3, 4
    n = H * W
    pts = torch.tensor([cell_center(2, 1, H, W)])
    q = torch.zeros(1, 1, 8)  # all logits equal -> A = 1/n everywhere
    k = torch.randn(1, n, 8)
    loss = R.trace_attention_loss(q, k, pts, torch.ones(1), ranges((0, 1)), torch.ones(1, 1, dtype=torch.bool),
                                  (H, W), 0.01, loss_type=loss_type)
    expected = {"kl": math.log(n), "ce": math.log(n), "l1": 2 * (n - 1) / n,
                "mse": (1 - 1 / n) ** 2 + (n - 1) / n ** 2}[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_is_the_mean_over_valid_targets_only():
    H, W = 2, 2
    pts = torch.tensor([cell_center(0, 0, H, W), cell_center(1, 1, H, W)], dtype=torch.float64)
    q = torch.randn(1, 4, 3, dtype=torch.float64)
    k = torch.randn(1, 4, 3, dtype=torch.float64)
    tr = ranges((0, 1), (1, 2), (2, 2), (0, 2))
    loc_mask = torch.tensor([[True, True, True, False]])  # token 2 has no points, token 3 is masked
    loss = R.trace_attention_loss(q, k, pts, torch.ones(2, dtype=torch.float64), tr, loc_mask, (H, W), 0.01,
                                  scale=0.5)
    log_A = torch.log_softmax(0.5 * q[0] @ k[0].t(), dim=-1)
    # one-hot targets on cell 0 and cell 3: KL = -log A at that cell
    assert loss.item() == pytest.approx(-(log_A[0, 0] + log_A[1, 3]).item() / 2, rel=1e-9)


def test_kl_gradient_is_finite_where_the_target_underflows():
    # a point 10% outside the image with a narrow kernel: far cells are exactly 0 in float32
    pts = torch.tensor([[-0.1, -0.1]], requires_grad=True)
    w = torch.ones(1, requires_grad=True)
    q = torch.randn(1, 1, 8, requires_grad=True)
    k = torch.randn(1, 49, 8, requires_grad=True)
    loss = R.trace_attention_loss(q, k, pts, w, ranges((0, 1)), torch.ones(1, 1, dtype=torch.bool), (7, 7), 0.05)
    loss.backward()
    for t in (pts, w, q, k):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trace_attention_loss_gradcheck(loss_type):
    g = torch.Generator().manual_seed(0)
    B, L, D, H, W = 2, 3, 4, 3, 2
    q = torch.randn(B, L, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, H * W, D, dtype=torch.float64, generator=g, requires_grad=True)
    pts = torch.rand(7, 2, dtype=torch.float64, generator=g).requires_grad_()
    w = (0.5 + torch.rand(7, dtype=torch.float64, generator=g)).requires_grad_()
    tr = torch.tensor([[[0, 2], [2, 3], [3, 3]], [[3, 5], [5, 7], [0, 7]]], dtype=torch.int32)
    loc_mask = torch.tensor([[True, True, True], [True, False, True]])

    def f(q, k, pts, w):
        return R.trace_attention_loss(q, k, pts, w, tr, loc_mask, (H, W), 0.3, scale=0.7, loss_type=loss_type)

    assert torch.autograd.gradcheck(f, (q, k, pts, w))


def test_contrastive_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64, generator=g), dim=-1)
    scale = torch.tensor(1.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(R.contrastive_loss, (img.requires_grad_(), txt.requires_grad_(),
                                                         scale.requires_grad_()))


# ---- contrastive loss -----------------------------------------------------------------------------
def test_contrastive_loss_of_identical_embeddings():
    N = 4
    s = 10.0
    emb = torch.eye(N, 6, dtype=torch.float64)  # orthonormal rows, image == caption
    loss = R.contrastive_loss(emb, emb, torch.tensor(math.log(s), dtype=torch.float64))
    # logits: s on the diagonal, 0 elsewhere, in both directions
    assert loss.item() == pytest.approx(math.log(1 + (N - 1) * math.exp(-s)), rel=1e-5)
    # every embedding the same vector: all logits equal, loss = log N
    same = torch.nn.functional.normalize(torch.ones(N, 6), dim=-1)
    assert R.contrastive_loss(same, same, torch.tensor(2.0)).item() == pytest.approx(math.log(N), rel=1e-6)


def test_contrastive_logit_scale_is_clamped_at_100():
    emb = torch.eye(3, 3)
    big = torch.tensor(math.log(1000.0), requires_grad=True)
    loss = R.contrastive_loss(emb, -emb, big)  # anti-aligned so that the scale matters
    assert loss.item() == pytest.approx(R.contrastive_loss(emb, -emb, torch.tensor(math.log(100.0))).item())
    loss.backward()
    assert big.grad.item() == 0.0
    # the dispatcher gives the reference's value on CPU
    torch.testing.assert_close(K.contrastive_loss(emb, -emb, big.detach()), loss.detach())


def test_bfloat16_inputs_accumulate_in_float32():
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s = torch.tensor(2.0)
    out = R.contrastive_loss(img.bfloat16(), txt.bfloat16(), s)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.contrastive_loss(img.bfloat16().float(), txt.bfloat16().float(), s))


# ---- distributed contrastive loss on 2 gloo ranks -------------------------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_problem():
    """Per-rank inputs x [4, 5] and the replicated parameters: a projection and a logit scale."""
    g = torch.Generator().manual_seed(3)
    x_img = torch.randn(WORLD * 4, 5, dtype=torch.float64, generator=g)
    x_txt = torch.randn(WORLD * 4, 5, dtype=torch.float64, generator=g)
    proj = torch.randn(5, 3, dtype=torch.float64, generator=g)
    return x_img, x_txt, proj, torch.tensor(1.1, dtype=torch.float64)


def _embed(x, proj):
    return torch.nn.functional.normalize(x @ proj, dim=-1)


def _rank_main(rank, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt, proj, scale = _global_problem()
        rows = slice(rank * 4, rank * 4 + 4)
        proj = proj.clone().requires_grad_()
        scale = scale.clone().requires_grad_()
        img = _embed(x_img[rows], proj)
        txt = _embed(x_txt[rows], proj)
        img.retain_grad()
        txt.retain_grad()
        loss = R.distributed_contrastive_loss(img, txt, scale)
        loss.backward()
        dispatched = K.distributed_contrastive_loss(img.detach(), txt.detach(), scale.detach())
        torch.save({"loss": loss.detach(), "dispatched": dispatched, "img_grad": img.grad,
                    "txt_grad": txt.grad, "proj_grad": proj.grad, "scale_grad": scale.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown_process_group()


def test_distributed_contrastive_loss_matches_single_process(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    x_img, x_txt, proj, scale = _global_problem()
    proj.requires_grad_()
    scale.requires_grad_()
    img, txt = _embed(x_img, proj), _embed(x_txt, proj)
    img.retain_grad()
    txt.retain_grad()
    loss = R.contrastive_loss(img, txt, scale)
    loss.backward()

    for r, res in enumerate(results):
        # value: the single-process loss on the concatenated batch, on every rank
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["dispatched"], loss.detach(), rtol=1e-12, atol=1e-12)
        # a rank's gradient w.r.t. its own rows is world_size x its slice of the global gradient
        rows = slice(r * 4, r * 4 + 4)
        torch.testing.assert_close(res["img_grad"], WORLD * img.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["txt_grad"], WORLD * txt.grad[rows], rtol=1e-10, atol=1e-12)
    # data-parallel convention: replicated parameters' gradients averaged over ranks (DDP / DeepSpeed)
    # are the single-process gradients
    torch.testing.assert_close(sum(r["proj_grad"] for r in results) / WORLD, proj.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["scale_grad"] for r in results) / WORLD, scale.grad, rtol=1e-10, atol=1e-12)
