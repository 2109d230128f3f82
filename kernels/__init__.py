"""Fused LocTex ops (DESIGN §4). Installed as ``loctex.kernels``.

Each op dispatches on its inputs' device: Triton kernels on CUDA, the C++ ops built by CMake on
CPU, and the plain-PyTorch reference (``loctex.kernels.reference``) when neither is available
(with a one-time warning). The contrastive losses have no C++ op: off CUDA/Triton they run the
blocked O(N·D) torch implementation (``loctex.kernels.blocked_contrastive``), provider ``"blocked"``.
``provider="reference"|"triton"|"cpp"|"blocked"`` picks one explicitly; ``"triton"`` on CPU tensors
needs ``TRITON_INTERPRET=1`` set before triton is imported.

The Triton and C++ ops are torch custom ops (namespace ``loctex``, with fake and autograd rules), so
``torch.compile(fullgraph=True)`` traces a training step through them; the distributed Triton loss
(whose process group no op schema can carry) is the exception.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

PROVIDERS = ("auto", "reference", "triton", "cpp", "blocked")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Evaluated when torch.compile traces a caller, not traced: the first call loads (or compiles)
# the library, which Dynamo cannot follow, and the answer does not change within a process.
@torch.compiler.assume_constant_result
def cpp_available() -> bool:
    from . import cpp
    return cpp.available()


def _resolve(op: str, provider: str, tensor: torch.Tensor, has_cpp: bool,
             has_blocked: bool = False) -> str:
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op}: provider='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "in the environment before triton is imported")
    if provider == "blocked" and not has_blocked:
        raise ValueError(f"{op}: there is no blocked implementation of this op")
    if provider == "cpp" and not has_cpp:
        raise ValueError(f"{op}: there is no C++ implementation of this op")
    if provider == "cpp" and not cpp_available():
        raise RuntimeError(f"{op}: provider='cpp' but the C++ ops are not built "
                           "(pip install --no-build-isolation -e . builds them)")
    if provider != "auto":
        return provider
    if tensor.is_cuda and triton_available():
        return "triton"
    if has_blocked:
        return "blocked"
    if has_cpp and not tensor.is_cuda:
        if cpp_available():
            return "cpp"
        _warn_once("cpp", "loctex.kernels: C++ ops are not built; using the PyTorch reference "
                          "(slower). Reinstall with `pip install --no-build-isolation -e .` to build them.")
    return "reference"


def render_traces(points_xy, point_weights, token_ranges, grid_hw, sigma, *, provider="auto"):
    """-> (heat [B, L, H, W] float32, valid [B, L] bool); see DESIGN §3."""
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    impl = _resolve("render_traces", provider, points_xy, has_cpp=True)
    if impl == "triton":
        from .triton.render import render_traces_triton
        return render_traces_triton(points_xy, point_weights, token_ranges, grid_hw, sigma)
    if impl == "cpp":
        from .cpp import render_traces_cpp
        return render_traces_cpp(points_xy, point_weights, token_ranges, grid_hw, sigma)
    return reference.render_traces(points_xy, point_weights, token_ranges, grid_hw, sigma)


def trace_attention_loss(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_hw, sigma,
                         scale=1.0, loss_type="kl", *, provider="auto"):
    """q [B, L, D], k [B, H*W, D] -> scalar localization loss; see DESIGN §3."""
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    if loss_type not in reference.LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {reference.LOSS_TYPES}, got {loss_type!r}")
    args = (q, k, points_xy, point_weights, token_ranges, loc_mask, grid_hw, float(sigma),
            float(scale), loss_type)
    impl = _resolve("trace_attention_loss", provider, q, has_cpp=True)
    if impl == "triton":
        from .triton.trace_attention import trace_attention_loss_triton
        return trace_attention_loss_triton(*args)
    if impl == "cpp":
        from .cpp import trace_attention_loss_cpp
        return trace_attention_loss_cpp(*args)
    return reference.trace_attention_loss(*args)


def contrastive_loss(image_emb, text_emb, logit_scale, *, provider="auto"):
    """Symmetric InfoNCE over [N, D] L2-normalized embeddings; see DESIGN §3."""
    impl = _resolve("contrastive_loss", provider, image_emb, has_cpp=False, has_blocked=True)
    if impl == "triton":
        from .triton.contrastive import contrastive_loss_triton
        return contrastive_loss_triton(image_emb, text_emb, logit_scale)
    if impl == "blocked":
        from .blocked_contrastive import contrastive_loss_blocked
        return contrastive_loss_blocked(image_emb, text_emb, logit_scale)
    return reference.contrastive_loss(image_emb, text_emb, logit_scale)


def distributed_contrastive_loss(image_emb, text_emb, logit_scale, group=None, *, provider="auto"):
    """The contrastive loss over the global batch of all ranks; see reference's docstring for the
    gradient convention (data-parallel averaging gives the single-process gradients)."""
    impl = _resolve("distributed_contrastive_loss", provider, image_emb, has_cpp=False,
                    has_blocked=True)
    if impl == "triton":
        from .triton.contrastive import distributed_contrastive_loss_triton
        return distributed_contrastive_loss_triton(image_emb, text_emb, logit_scale, group)
    if impl == "blocked":
        from .blocked_contrastive import distributed_contrastive_loss_blocked
        return distributed_contrastive_loss_blocked(image_emb, text_emb, logit_scale, group)
    return reference.distributed_contrastive_loss(image_emb, text_emb, logit_scale, group)


__all__ = ["render_traces", "trace_attention_loss", "contrastive_loss",
           "distributed_contrastive_loss", "reference", "PROVIDERS"]
