"""Loader for the C++ CPU ops (kernels/csrc, built by CMakeLists.txt through setup.py).

The build is a plain shared library of torch custom ops (namespace ``loctex``), named like the
extension module ``loctex.kernels._C`` so that setuptools installs it; it has no Python bindings
and is loaded with ``torch.ops.load_library``. This module adds what the dispatcher needs around
the CPU kernels: fake (meta) implementations for ``torch.compile`` and autograd formulas, so the
ops compose with both. Gradients flow to every floating input (q, k, points_xy, point_weights).
"""
from __future__ import annotations

import importlib.util

import torch

_state: dict = {}


def _library_path() -> str | None:
    spec = importlib.util.find_spec("loctex.kernels._C")
    return spec.origin if spec is not None and spec.origin else None


def _load() -> bool:
    if "ok" not in _state:
        path = _library_path()
        try:
            if path is None:
                raise FileNotFoundError("loctex.kernels._C is not built")
            torch.ops.load_library(path)
            _register_python_parts()
            _state["ok"] = True
        except (OSError, RuntimeError) as exc:
            _state["ok"], _state["error"] = False, exc
    return _state["ok"]


def available() -> bool:
    """True when the C++ library is built and loads."""
    return _load()


def load_error() -> Exception | None:
    """Why ``available()`` is False (None when it is True or has not been asked)."""
    return _state.get("error")


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _register_python_parts() -> None:
    lib = torch.ops.loctex

    @torch.library.register_fake("loctex::render_traces")
    def _render_fake(points_xy, point_weights, token_ranges, grid_h, grid_w, sigma):
        B, L = token_ranges.shape[:2]
        dtype = _acc_dtype(points_xy, point_weights)
        return (points_xy.new_empty((B, L, grid_h, grid_w), dtype=dtype),
                points_xy.new_empty((B, L), dtype=torch.bool))

    @torch.library.register_fake("loctex::render_traces_backward")
    def _render_bwd_fake(grad_heat, points_xy, point_weights, token_ranges, grid_h, grid_w, sigma):
        return torch.empty_like(points_xy), torch.empty_like(point_weights)

    @torch.library.register_fake("loctex::trace_attention_loss")
    def _loss_fake(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_h, grid_w,
                   sigma, scale, loss_type, grad_logits, grad_points):
        dtype = _acc_dtype(q, k, points_xy, point_weights)
        B, L = q.shape[:2]
        return (q.new_empty((), dtype=dtype),
                q.new_empty((B, L, grid_h * grid_w) if grad_logits else (0,), dtype=dtype),
                points_xy.new_empty(points_xy.shape if grad_points else (0,), dtype=dtype),
                point_weights.new_empty(point_weights.shape if grad_points else (0,), dtype=dtype))

    def _render_setup(ctx, inputs, output):
        points_xy, point_weights, token_ranges, grid_h, grid_w, sigma = inputs
        ctx.save_for_backward(points_xy, point_weights, token_ranges)
        ctx.args = (grid_h, grid_w, sigma)

    def _render_backward(ctx, grad_heat, _grad_valid):
        points_xy, point_weights, token_ranges = ctx.saved_tensors
        d_points, d_weights = lib.render_traces_backward(
            grad_heat, points_xy, point_weights, token_ranges, *ctx.args)
        need = ctx.needs_input_grad
        return (d_points if need[0] else None, d_weights if need[1] else None,
                None, None, None, None)

    torch.library.register_autograd("loctex::render_traces", _render_backward,
                                    setup_context=_render_setup)

    # trace_attention_loss returns dL/d(q·kᵀ) and the point gradients for a unit upstream
    # gradient along with the loss (computed in the same pass). The backward scales dL/d(q·kᵀ)
    # ([B, L, H*W], small) by the upstream gradient before the two GEMMs that give dq and dk, so
    # those are written once, already scaled.
    def _loss_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: skip their zeros
        q, k = inputs[:2]
        ctx.computed = (inputs[11], inputs[11], inputs[12], inputs[12])
        ctx.dtypes = [t.dtype for t in inputs[:4]]
        ctx.save_for_backward(q, k, *output[1:])

    def _loss_backward(ctx, grad_loss, *_unused):
        if grad_loss is None:  # no gradient reached the loss
            return (None,) * 13
        names = ("q", "k", "points_xy", "point_weights")
        need = ctx.needs_input_grad
        for name, needed, computed in zip(names, need, ctx.computed):
            if needed and not computed:
                raise RuntimeError(f"loctex::trace_attention_loss was called without the gradient "
                                   f"of {name}; pass its grad_* flag (trace_attention_loss_cpp does)")
        q, k, grad_logits, grad_points, grad_weights = ctx.saved_tensors
        dq = dk = d_points = d_weights = None
        if need[0] or need[1]:
            dz = grad_logits * grad_loss.to(grad_logits.dtype)
            if need[0]:
                dq = torch.bmm(dz, k.to(dz.dtype)).to(ctx.dtypes[0])
            if need[1]:
                dk = torch.bmm(dz.transpose(1, 2), q.to(dz.dtype)).to(ctx.dtypes[1])
        if need[2]:
            d_points = (grad_points * grad_loss).to(ctx.dtypes[2])
        if need[3]:
            d_weights = (grad_weights * grad_loss).to(ctx.dtypes[3])
        return (dq, dk, d_points, d_weights) + (None,) * 9

    torch.library.register_autograd("loctex::trace_attention_loss", _loss_backward,
                                    setup_context=_loss_setup)


def render_traces_cpp(points_xy, point_weights, token_ranges, grid_hw, sigma):
    """-> (heat [B, L, H, W], valid [B, L] bool); float32, or float64 for float64 inputs."""
    if not _load():
        raise RuntimeError(f"the LocTex C++ ops are not available: {load_error()}")
    return tuple(torch.ops.loctex.render_traces(
        points_xy, point_weights, token_ranges, int(grid_hw[0]), int(grid_hw[1]), float(sigma)))


def trace_attention_loss_cpp(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_hw,
                             sigma, scale=1.0, loss_type="kl"):
    """Scalar localization loss (float32, or float64 for float64 inputs); see DESIGN §3."""
    if not _load():
        raise RuntimeError(f"the LocTex C++ ops are not available: {load_error()}")
    grads = torch.is_grad_enabled()  # the op computes the gradients asked for in the same pass
    loss, *_ = torch.ops.loctex.trace_attention_loss(
        q, k, points_xy, point_weights, token_ranges, loc_mask, int(grid_hw[0]), int(grid_hw[1]),
        float(sigma), float(scale), str(loss_type), grads and (q.requires_grad or k.requires_grad),
        grads and (points_xy.requires_grad or point_weights.requires_grad))
    return loss
