"""The fused trace ops — render_traces and trace_attention_loss — of the Triton and C++ providers
against the float64 reference (DESIGN §3, §4).

Triton runs on CPU under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay tiny. The C++
tests skip when the library is not built (`pip install --no-build-isolation -e .` builds it).

Tolerances: float32 computation against the float64 reference — loss within 1e-5 relative,
gradients within 1e-5 of their largest entry. bfloat16 inputs, compared with the reference on the
same (rounded) values — loss within 1e-3 relative, gradients within 2% of their largest entry
(Triton feeds dL/dz to the gradient dots in bfloat16; C++ rounds only the returned gradients).
"""
import importlib.util
import warnings

import pytest
import torch

import loctex.kernels as K
from loctex.kernels import cpp, reference, testing

LOSS_TYPES = reference.LOSS_TYPES
needs_cpp = pytest.mark.cpp  # the session stops when the C++ ops are missing (conftest)
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
PROVIDERS = [pytest.param("triton", marks=needs_triton), pytest.param("cpp", marks=needs_cpp)]


def inputs(B, L, grid, D, *, ppt=5, seed=0, **kw):
    """testing.trace_inputs in float64 (overlapping windows, empty tokens, points outside)."""
    return testing.trace_inputs(B, L, grid, D, points_per_token=ppt, dtype=torch.float64,
                                seed=seed, **kw)


def loss_and_grads(provider, x, *, dtype=torch.float64, loss_type="kl", sigma=0.15, scale=0.7):
    """(loss, dq, dk) in float64 for q, k cast to dtype (the trace tensors stay as they are)."""
    q = x["q"].detach().to(dtype).requires_grad_()
    k = x["k"].detach().to(dtype).requires_grad_()
    loss = K.trace_attention_loss(q, k, x["points_xy"], x["point_weights"], x["token_ranges"],
                                  x["loc_mask"], x["grid_hw"], sigma, scale, loss_type,
                                  provider=provider)
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert dq.dtype == dtype and dk.dtype == dtype
    return loss.detach().double(), dq.double(), dk.double()


def assert_matches(got, want, rtol=1e-5, grad_tol=1e-5):
    (loss, dq, dk), (loss_ref, dq_ref, dk_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol * 1e-2)
    for g, r in ((dq, dq_ref), (dk, dk_ref)):
        torch.testing.assert_close(g, r, rtol=0, atol=grad_tol * float(r.abs().max()) + 1e-12)


# ---- render_traces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (7, 7), (10, 13), (17, 3), (4, 20)])
def test_render_matches_reference(provider, grid):
    x = inputs(3, 4, grid, 8, ppt=6, outside=0.3)
    pts = x["points_xy"].clone()
    pts[: pts.shape[0] // 8] += 50.0   # some tokens only see points far outside the image
    args = (pts, x["point_weights"], x["token_ranges"], grid, 0.1)
    heat, valid = K.render_traces(*args, provider=provider)
    heat_ref, valid_ref = reference.render_traces(pts.double(), x["point_weights"].double(),
                                                  *args[2:])
    assert heat.dtype == torch.float32 and heat.shape == (3, 4, *grid)
    assert torch.equal(valid, valid_ref)
    assert 0 < int(valid.sum()) < valid.numel()  # both kinds of token occur
    torch.testing.assert_close(heat.double(), heat_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("grid", [(7, 7), (4, 20)])
def test_render_infinite_points_contribute_nothing(provider, grid):
    x = inputs(2, 3, grid, 4, ppt=6, outside=0.0, empty_fraction=0.0)
    pts = x["points_xy"].clone()
    for t, value in ((0, float("inf")), (1, -float("inf"))):  # one point of a token with others
        s = int(x["token_ranges"].view(-1, 2)[t, 0])
        pts[s, t % 2] = value
    args = (pts, x["point_weights"], x["token_ranges"], grid, 0.1)
    heat, valid = K.render_traces(*args, provider=provider)
    heat_ref, valid_ref = reference.render_traces(pts.double(), x["point_weights"].double(), *args[2:])
    assert torch.equal(valid, valid_ref) and bool(valid.view(-1)[:2].all())
    torch.testing.assert_close(heat.double(), heat_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_render_float64_inputs_give_float64(provider):
    x = inputs(1, 2, (2, 3), 4)
    heat, _ = K.render_traces(x["points_xy"].double(), x["point_weights"].double(),
                              x["token_ranges"], (2, 3), 0.2, provider=provider)
    assert heat.dtype == torch.float64


# ---- trace_attention_loss: values and gradients --------------------------------------------------
SHAPES = {  # (B, L, grid, D, scale): awkward sizes. Triton walks tokens in blocks of 16, cells in
    # tiles of 32 and D in steps of 16 (float32) or 32 (16-bit): partial blocks, tiles and steps occur
    "L1-grid1x1-D5": (2, 1, (1, 1), 5, 0.7),
    "grid3x5-D24": (2, 5, (3, 5), 24, 0.7),
    "grid7x7-L19-D40": (2, 19, (7, 7), 40, 0.7),
    # a D no single tile could hold (38 steps); scale ~ 3/sqrt(D) keeps the logits at a few units,
    # as the model's 1/sqrt(D) does (logits of ~20 would saturate the softmax: float32 noise)
    "grid2x3-D601": (2, 3, (2, 3), 601, 0.12),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_loss_matches_reference(provider, loss_type, shape):
    B, L, grid, D, scale = SHAPES[shape]
    x = inputs(B, L, grid, D, seed=list(SHAPES).index(shape))
    assert_matches(loss_and_grads(provider, x, dtype=torch.float32, loss_type=loss_type, scale=scale),
                   loss_and_grads("reference", x, loss_type=loss_type, scale=scale))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_type", ["kl", "mse"])
def test_loss_grid_of_several_tiles_and_big_logits(provider, loss_type):
    x = inputs(1, 3, (9, 11), 17, ppt=8)   # 99 cells: four grid tiles of 32 in Triton
    x["q"] = x["q"] * 3.0                 # peaked attention: float32 logits of ~10
    assert_matches(loss_and_grads(provider, x, dtype=torch.float32, loss_type=loss_type, scale=1.0),
                   loss_and_grads("reference", x, loss_type=loss_type, scale=1.0), grad_tol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_empty_ranges_and_far_points_are_not_targets(provider):
    x = inputs(2, 6, (3, 4), 8, empty_fraction=0.0)
    ranges = x["token_ranges"].clone()
    ranges[0, 1, 1] = ranges[0, 1, 0]          # empty range, though loc_mask says True
    ranges[1, 2] = ranges[1, 2].flip(0)        # inverted range: empty too
    pts = x["points_xy"].clone()
    s, e = (int(v) for v in x["token_ranges"][1, 4])
    pts[s:e] = torch.tensor([40.0, -40.0])     # every point of that token far outside
    x.update(points_xy=pts, token_ranges=ranges)
    # the far token has no other points in its window: only then is it not a target
    overlap = [t for t in range(6) if t != 4 and max(s, int(ranges[1, t, 0])) < min(e, int(ranges[1, t, 1]))]
    for t in overlap:
        x["loc_mask"][1, t] = False
    for loss_type in ("kl", "l1"):
        assert_matches(loss_and_grads(provider, x, dtype=torch.float32, loss_type=loss_type),
                       loss_and_grads("reference", x, loss_type=loss_type))
    q = x["q"].detach().float().requires_grad_()
    k = x["k"].detach().float().requires_grad_()
    loss = K.trace_attention_loss(q, k, x["points_xy"], x["point_weights"], x["token_ranges"],
                                  x["loc_mask"], x["grid_hw"], 0.15, provider=provider)
    loss.backward()
    for b, t in ((0, 1), (1, 2), (1, 4)):  # no gradient reaches a token that is not a target
        assert float(q.grad[b, t].abs().max()) == 0.0


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["no_mask", "no_points"])
def test_batch_without_valid_target_gives_zero(provider, case):
    x = inputs(2, 3, (2, 2), 6)
    if case == "no_mask":
        x["loc_mask"] = torch.zeros_like(x["loc_mask"])
    else:
        x["token_ranges"] = torch.zeros_like(x["token_ranges"])
    for loss_type in LOSS_TYPES:
        loss, dq, dk = loss_and_grads(provider, x, dtype=torch.float32, loss_type=loss_type)
        assert float(loss) == 0.0
        assert float(dq.abs().max()) == 0.0 and float(dk.abs().max()) == 0.0


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_type", ["kl", "l1"])
@pytest.mark.parametrize("shape", [(2, 5, (3, 3), 24), (2, 18, (5, 7), 72)], ids=["D24", "L18-grid5x7-D72"])
def test_bfloat16_inputs(provider, loss_type, shape):
    x = inputs(*shape)
    x["q"], x["k"] = x["q"].bfloat16().double(), x["k"].bfloat16().double()  # same values for both
    loss, dq, dk = loss_and_grads(provider, x, dtype=torch.bfloat16, loss_type=loss_type)
    assert_matches((loss, dq, dk), loss_and_grads("reference", x, loss_type=loss_type),
                   rtol=1e-3, grad_tol=2e-2)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_float64_inputs_give_float64_loss(provider):
    x = inputs(1, 2, (2, 2), 4)
    loss, _, _ = loss_and_grads(provider, x, dtype=torch.float64)
    out = K.trace_attention_loss(x["q"], x["k"], x["points_xy"], x["point_weights"],
                                 x["token_ranges"], x["loc_mask"], (2, 2), 0.15, provider=provider)
    assert out.dtype == torch.float64


@needs_triton
def test_triton_refuses_point_gradients():
    x = inputs(1, 2, (2, 2), 4)
    with pytest.raises(NotImplementedError, match="points_xy"):
        K.trace_attention_loss(x["q"].float(), x["k"].float(), x["points_xy"].requires_grad_(),
                               x["point_weights"], x["token_ranges"], x["loc_mask"], (2, 2), 0.15,
                               provider="triton")


# ---- C++: gradcheck, every floating input, torch.compile ------------------------------------------
@needs_cpp
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cpp_loss_gradcheck_float64(loss_type):
    x = inputs(2, 3, (2, 3), 5, ppt=4, outside=0.0)
    tensors = [x[name].detach().clone().requires_grad_()
               for name in ("q", "k", "points_xy", "point_weights")]
    tensors[2:] = [t.double().detach().requires_grad_() for t in tensors[2:]]

    def f(q, k, pts, wts):
        return cpp.trace_attention_loss_cpp(q, k, pts, wts, x["token_ranges"], x["loc_mask"],
                                            (2, 3), 0.3, 0.8, loss_type)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, rtol=1e-4)
    # and the same gradients as the reference, points and weights included
    got = torch.autograd.grad(f(*tensors), tensors)
    want = torch.autograd.grad(reference.trace_attention_loss(
        *tensors, x["token_ranges"], x["loc_mask"], (2, 3), 0.3, 0.8, loss_type), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("grid", [(3, 2), (10, 9), (17, 18)])  # 8, 16 and 24 padded rows/columns
def test_cpp_render_gradcheck_float64(grid):
    x = inputs(2, 3, grid, 4, ppt=4)
    pts = x["points_xy"].double().requires_grad_()
    wts = x["point_weights"].double().requires_grad_()

    def f(p, w):
        return cpp.render_traces_cpp(p, w, x["token_ranges"], grid, 0.25)[0]

    assert torch.autograd.gradcheck(f, (pts, wts), eps=1e-6, atol=1e-6)


@needs_cpp
def test_cpp_same_results_on_one_and_several_threads():
    # tokens run in parallel and several tokens add into one point's gradient: no races
    x = inputs(6, 16, (7, 7), 12, ppt=10, seed=3)
    leaves = [x["q"].float(), x["k"].float(), x["points_xy"].double(), x["point_weights"].double()]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ts = [t.detach().clone().requires_grad_() for t in leaves]
            loss = cpp.trace_attention_loss_cpp(*ts, x["token_ranges"], x["loc_mask"], (7, 7),
                                                0.15, 0.5, "kl")
            results.append((loss, *torch.autograd.grad(loss, ts)))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)  # summed in order
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@needs_cpp
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch is not built with OpenMP")
def test_cpp_library_is_built_with_openmp():
    # ATen's parallel_for is a header template around `#pragma omp parallel` in OpenMP builds of
    # torch: a library compiled without OpenMP runs every op on one thread, silently.
    with open(cpp._library_path(), "rb") as f:
        assert b"GOMP_parallel" in f.read()


@needs_cpp
def test_cpp_ops_register_fake_and_autograd():
    x = inputs(1, 2, (2, 2), 4)
    q, k = x["q"].float().requires_grad_(), x["k"].float()
    pts, wts = x["points_xy"], x["point_weights"]
    torch.library.opcheck(torch.ops.loctex.trace_attention_loss.default,
                          (q, k, pts, wts, x["token_ranges"], x["loc_mask"], 2, 2, 0.2, 1.0, "kl",
                           True, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.loctex.render_traces.default,
                          (pts, wts, x["token_ranges"], 2, 2, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpp
def test_cpp_under_torch_compile():
    x = inputs(2, 3, (2, 3), 8)

    def step(q, k):
        loss = K.trace_attention_loss(q, k, x["points_xy"], x["point_weights"], x["token_ranges"],
                                      x["loc_mask"], (2, 3), 0.2, 1.0, "kl", provider="cpp")
        return loss * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q = x["q"].float().requires_grad_()
    k = x["k"].float().requires_grad_()
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(step(q, k), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_cpp
def test_cpp_rejects_out_of_range_points():
    x = inputs(1, 2, (2, 2), 4)
    ranges = x["token_ranges"].clone()
    ranges[0, 0, 1] = x["points_xy"].shape[0] + 1
    with pytest.raises(RuntimeError, match="outside"):
        K.render_traces(x["points_xy"], x["point_weights"], ranges, (2, 2), 0.2, provider="cpp")


# ---- dispatch: fallback when the C++ library is not built ----------------------------------------
def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(cpp, "available", lambda: False)
    monkeypatch.setattr(K, "_warned", set())
    x = inputs(1, 3, (2, 2), 4)
    args = (x["q"].float(), x["k"].float(), x["points_xy"], x["point_weights"], x["token_ranges"],
            x["loc_mask"], (2, 2), 0.2)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ ops are not built"):
        loss = K.trace_attention_loss(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        K.render_traces(x["points_xy"], x["point_weights"], x["token_ranges"], (2, 2), 0.2)
        again = K.trace_attention_loss(*args)
    torch.testing.assert_close(loss, reference.trace_attention_loss(*args))
    torch.testing.assert_close(again, loss)
    with pytest.raises(RuntimeError, match="not built"):
        K.trace_attention_loss(*args, provider="cpp")
