"""The fused ops as torch custom ops (namespace ``loctex``): their schemas, fake (meta) rules and
autograd rules pass ``torch.library.opcheck``, and ``torch.compile(fullgraph=True)`` traces a
training step through them without a graph break and computes what eager does.

On CPU: the Triton ops run under TRITON_INTERPRET=1 (set by conftest.py) on small tensors; the
C++ ops are the CPU build (skipped when it is not built).
"""
import importlib.util
import math

import pytest
import torch

import loctex.kernels as K
from loctex.kernels import testing

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
needs_cpp = pytest.mark.cpp  # the session stops when the C++ ops are missing (conftest)
OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor",
               "test_aot_dispatch_dynamic")


def _trace_batch(dtype=torch.float32, seed=0):
    """A small §2.4 batch: 2 images of 5 tokens (a partial token block), a 3 x 5 grid (a partial
    tile of cells), D = 24 (a partial step of D)."""
    return testing.trace_inputs(2, 5, (3, 5), 24, points_per_token=5, dtype=dtype, seed=seed)


def _trace_tensors(x):
    from loctex.kernels.triton.render import trace_tensors
    return trace_tensors(x["points_xy"], x["point_weights"], x["token_ranges"])


@needs_triton
@pytest.mark.parametrize("loss_type", ["kl", "mse"])
def test_opcheck_triton_trace_attention_loss(loss_type):
    from loctex.kernels.triton import trace_attention  # noqa: F401 -- registers the ops
    x = _trace_batch()
    pts, wts, ranges = _trace_tensors(x)
    q = x["q"].clone().requires_grad_()
    k = x["k"].clone().requires_grad_()
    args = (q, k, pts, wts, ranges, x["loc_mask"], 3, 5, 0.2, 0.7, loss_type)
    torch.library.opcheck(torch.ops.loctex.trace_attention_loss_triton.default, args,
                          test_utils=OPCHECK_ALL)
    _, stats = torch.ops.loctex.trace_attention_loss_triton(*args)
    grad = torch.tensor(1.5, device=q.device)
    torch.library.opcheck(torch.ops.loctex.trace_attention_loss_triton_backward.default,
                          (grad, q.detach(), k.detach(), pts, wts, ranges, x["loc_mask"], stats.detach(),
                           3, 5, 0.2, 0.7, loss_type),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_triton
def test_opcheck_triton_render_traces():
    from loctex.kernels.triton import render  # noqa: F401 -- registers the op
    x = _trace_batch()
    torch.library.opcheck(torch.ops.loctex.render_traces_triton.default,
                          (*_trace_tensors(x), 3, 5, 0.2), test_utils=OPCHECK_ALL)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_triton_contrastive_loss(dtype):
    from loctex.kernels.triton import contrastive  # noqa: F401 -- registers the ops
    image, text, ls = testing.contrastive_inputs(19, 24, dtype=dtype, seed=1)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.exp(ls.float()).reshape(1).requires_grad_()
    args = (image, text, scale, [16, 16, 16], 8)   # 8 rows of G per block: both backward passes
    torch.library.opcheck(torch.ops.loctex.contrastive_loss_triton.default, args,
                          test_utils=OPCHECK_ALL)
    _, lse_r, lse_c = torch.ops.loctex.contrastive_loss_triton(*args)
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(
            torch.ops.loctex.contrastive_loss_triton_backward.default,
            (torch.tensor(0.5, device=image.device), image.detach(), text.detach(),
             scale.detach(), lse_r.detach(), lse_c.detach(), *args[3:], *need),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cpp
def test_opcheck_cpp_ops():
    x = testing.trace_inputs(2, 3, (2, 3), 8, points_per_token=4, seed=2, device="cpu")
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
    pts = x["points_xy"].double().requires_grad_()
    wts = x["point_weights"].double().requires_grad_()
    for flags in ((True, False), (False, True)):
        torch.library.opcheck(torch.ops.loctex.trace_attention_loss.default,
                              (q, k, pts, wts, x["token_ranges"], x["loc_mask"], 2, 3, 0.2, 1.0,
                               "kl", *flags), test_utils=OPCHECK_ALL)
    torch.library.opcheck(torch.ops.loctex.render_traces.default,
                          (pts, wts, x["token_ranges"], 2, 3, 0.2), test_utils=OPCHECK_ALL)


def _step(q, k, image, text, logit_scale, trace, provider):
    """What a LocTex training step asks of the kernels: both losses, weighted."""
    loc = K.trace_attention_loss(q, k, trace["points_xy"], trace["point_weights"],
                                 trace["token_ranges"], trace["loc_mask"], trace["grid_hw"], 0.2,
                                 1 / math.sqrt(q.shape[-1]), "kl", provider=provider)
    con = K.contrastive_loss(image, text, logit_scale, provider=provider)
    return con + 0.5 * loc


@needs_triton
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_through_the_triton_ops(backend):
    torch._dynamo.reset()
    trace = _trace_batch(seed=3)
    image, text, ls = testing.contrastive_inputs(13, 16, seed=3)
    leaves = [trace["q"], trace["k"], image, text, ls]

    def run(fn):
        ts = [t.detach().clone().requires_grad_() for t in leaves]
        loss = fn(*ts, trace, "triton")
        return loss.detach(), torch.autograd.grad(loss, ts)

    compiled = torch.compile(_step, backend=backend, fullgraph=True)   # a graph break raises
    loss, grads = run(compiled)
    want_loss, want_grads = run(_step)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # and both are the losses themselves: the reference's value, within float32 accuracy
    ref = _step(*[t.double() for t in leaves], trace, "reference")
    assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
