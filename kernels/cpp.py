"""Loader for the C++ CPU ops (kernels/csrc).

The ops are a plain shared library of torch custom ops (namespace ``loctex``) with no Python
bindings, loaded with ``torch.ops.load_library``. Where it comes from, in order:

1. ``loctex.kernels._C``, built ahead of time by ``CMakeLists.txt`` through setup.py when the
   install can see torch (``pip install --no-build-isolation -e .``, what ``make`` does);
2. otherwise it is compiled on first use from the sources shipped in the package, with
   ``torch.utils.cpp_extension`` (ninja), against the torch that is running, and cached under
   ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a directory keyed by the
   torch version, the sources and this CPU, as DeepSpeed's op builder does. So a plain
   ``pip install .`` (an isolated build, which has no torch to build against) still ends with
   working ops. ``LOCTEX_JIT_BUILD=0`` turns this off.

This module adds what the dispatcher needs around
the CPU kernels: fake (meta) implementations for ``torch.compile`` and the render op's autograd
formula, so the ops compose with both (the loss's autograd is in C++, to keep its per-call overhead
low). Gradients flow to every floating input (q, k, points_xy, point_weights).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

import torch

_state: dict = {}
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


def _library_path() -> str | None:
    spec = importlib.util.find_spec("loctex.kernels._C")
    return spec.origin if spec is not None and spec.origin else None


def _cpu_signature() -> str:
    """What -march=native depends on: a cache shared by machines with other CPUs (a home
    directory on a cluster) must not hand one of them instructions it lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def jit_build() -> str:
    """Compile the ops from ``SOURCE_DIR`` for the running torch and load them; -> library path.
    Cached: a second call (or process) with the same torch, sources and CPU only loads."""
    from torch.utils.cpp_extension import load

    sources = sorted(SOURCE_DIR.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {SOURCE_DIR}")
    digest = hashlib.sha256(torch.__version__.encode() + _cpu_signature().encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    flags = ["-O3", "-std=c++20", "-fopenmp", "-march=native"]
    return load(name=f"loctex_ops_{digest.hexdigest()[:16]}", sources=[str(p) for p in sources],
                extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
                verbose=False)


def _load() -> bool:
    if "ok" not in _state:
        try:
            path = _library_path()
            if path is not None:
                torch.ops.load_library(path)
            elif os.environ.get("LOCTEX_JIT_BUILD", "1") == "0":
                raise FileNotFoundError("loctex.kernels._C is not built and LOCTEX_JIT_BUILD=0")
            else:
                path = jit_build()
            _register_python_parts()
            _state["ok"], _state["path"] = True, path
        except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
            _state["ok"], _state["error"] = False, exc
    return _state["ok"]


def library_path() -> str | None:
    """The loaded library (None when the ops are not available)."""
    return _state.get("path") if _load() else None


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
                q.new_empty((B, grid_h * grid_w, L) if grad_logits else (0,), dtype=dtype),
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
    # The op's autograd kernel asks for the gradients that the inputs need (computed in the same
    # pass as the loss).
    loss, *_ = torch.ops.loctex.trace_attention_loss(
        q, k, points_xy, point_weights, token_ranges, loc_mask, int(grid_hw[0]), int(grid_hw[1]),
        float(sigma), float(scale), str(loss_type), False, False)
    return loss
