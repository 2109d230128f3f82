"""Random inputs for the fused ops, shared by the tests and ``python -m loctex.kernels.bench``
(one home for the input builders, so that the benchmark measures what the tests check)."""
from __future__ import annotations

import math
import os

import torch

CLIP_LOGIT_SCALE = math.log(1 / 0.07)


def default_device() -> str:
    """Where the builders put their tensors unless told: ``LOCTEX_TEST_DEVICE`` (``cuda`` runs the
    kernel tests on a GPU, compiled, as ``benchmarks/gpu_check.py`` does), else the CPU."""
    return os.environ.get("LOCTEX_TEST_DEVICE", "cpu")


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(torch.randint(0, 2**31 - 1, ()).item() if seed is None else seed)
    return g


def contrastive_inputs(n: int, d: int, *, dtype=torch.float32, device=None,
                       logit_scale: float = CLIP_LOGIT_SCALE, agreement: float = 1.0,
                       seed: int | None = None):
    """``(image_emb [n, d], text_emb [n, d], logit_scale [])``: L2-normalized embeddings whose
    positive pairs agree (text = normalize(image + noise / agreement)), as the op expects.
    Built in float64 on the CPU (reproducible for a seed), then cast and moved."""
    g = _generator(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    text = torch.nn.functional.normalize(image + noise / max(agreement, 1e-6), dim=-1)
    scale = torch.tensor(float(logit_scale), dtype=torch.float64)
    device = device or default_device()
    return (image.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype),
            scale.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype))


def trace_inputs(batch: int, tokens: int, grid_hw: tuple[int, int], dim: int, *,
                 points_per_token: int = 20, dtype=torch.float32, device=None,
                 empty_fraction: float = 0.1, outside: float = 0.1, seed: int | None = None):
    """A batch in the format of DESIGN §2.4 plus attention inputs, as a dict of the
    ``trace_attention_loss`` arguments: ``q [B, L, D]``, ``k [B, H*W, D]``, ``points_xy [P, 2]``,
    ``point_weights [P]``, ``token_ranges [B, L, 2]`` (int32), ``loc_mask [B, L]``, ``grid_hw``.

    Each image gets one mouse trace (a random walk that strays up to ``outside`` beyond [0, 1]);
    its tokens take overlapping windows of about ``points_per_token`` points, as padded time
    windows do; ``empty_fraction`` of the tokens get no points and are left out of ``loc_mask``.
    ``q``/``k`` are in ``dtype``; the trace tensors are float32 as the loader yields them."""
    g = _generator(seed)
    B, L = batch, tokens
    H, W = grid_hw
    per_image = max(1, points_per_token * L // 2)        # windows overlap by about half
    steps = torch.randn(B, per_image, 2, generator=g) * 0.03
    start = torch.rand(B, 1, 2, generator=g)
    walk = (start + steps.cumsum(1)).remainder(1 + 2 * outside) - outside
    points_xy = walk.reshape(-1, 2).float()
    point_weights = (0.2 * torch.rand(B * per_image, generator=g) + 0.01).float()
    length = torch.randint(max(1, points_per_token // 2), points_per_token * 3 // 2 + 1, (B, L), generator=g)
    length = length.clamp(max=per_image)
    begin = (torch.rand(B, L, generator=g) * (per_image - length + 1)).long()
    empty = torch.rand(B, L, generator=g) < empty_fraction
    length = torch.where(empty, torch.zeros_like(length), length)
    base = (torch.arange(B) * per_image)[:, None]
    token_ranges = torch.stack([base + begin, base + begin + length], dim=-1).to(torch.int32)
    loc_mask = ~empty
    device = device or default_device()
    q = torch.randn(B, L, dim, generator=g, dtype=torch.float64)
    k = torch.randn(B, H * W, dim, generator=g, dtype=torch.float64)
    return {"q": q.to(device=device, dtype=dtype), "k": k.to(device=device, dtype=dtype),
            "points_xy": points_xy.to(device), "point_weights": point_weights.to(device),
            "token_ranges": token_ranges.to(device), "loc_mask": loc_mask.to(device),
            "grid_hw": (H, W)}


def loss_and_grads(fn, image, text, logit_scale):
    """A contrastive loss and its (d image, d text, d logit_scale), on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, logit_scale)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def contrastive_loss_tolerance(tol: dict, ref_loss, logit_scale) -> float:
    """``tol["loss"]`` relative, plus 4 float32 ulp of the largest logit ``s``: each row/column
    log-sum-exp is one float32, so the loss carries that absolute error whatever the method."""
    from .reference import MAX_LOGIT_SCALE
    s = min(math.exp(float(logit_scale)), MAX_LOGIT_SCALE)
    return tol["loss"] * max(1.0, abs(float(ref_loss))) + 4 * s * torch.finfo(torch.float32).eps
