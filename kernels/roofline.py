"""The roofline on paper: what each kernel must move and compute, and the time that implies on an
H100 SXM, beside the eager reference's (``python -m loctex.kernels.bench`` reports both).

A ``Cost`` counts HBM bytes, matrix-multiply flops (tensor cores, at the rate of the operands'
dtype), other floating-point work, and transcendentals (exp/log, on the special-function units).
Its bound is the slowest of the four at the device's peak rates: a lower bound on the time, which a
measured time reads against as ``fraction_of_bound = bound / measured``.

* Fused kernels (``trace_loss_fused``, ``render_fused``, ``contrastive_fused``): formulas of the
  traffic each implementation makes, each tensor read once per kernel (tiles re-read from L2 are
  free), written out below term by term.
* The eager references: counted, not guessed. ``count_eager`` runs a function under a dispatch
  mode and adds up every aten op's inputs and outputs (views and shape-only reads excluded), so the
  count is what eager PyTorch reads and writes, op by op, including every materialized
  [B, L, H·W] heat map, logit and softmax. Counting runs small sizes for real; the costs are exact
  polynomials in the batch (linear in B for the trace ops, quadratic in N for the contrastive
  loss), so a few small counts extrapolate exactly to the paper's shapes.

Model of the trace inputs: every token has exactly ``ppt`` points of its own (P = B·L·ppt), all
tokens are targets, and points do not require gradients (training).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# hardware


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes_per_s: float
    mma_flops_per_s: dict        # operand dtype -> dense matrix-multiply rate
    vector_flops_per_s: float    # fp32, not on the tensor cores
    sfu_per_s: float             # exp2/log2 results per second
    sources: tuple[str, ...]


_H100_SXM_BOOST_HZ = 989.4e12 / (132 * 4 * 512 * 2)  # 1.83 GHz: the clock the datasheet's rates assume
H100_SXM = Hardware(
    name="H100 SXM5",
    hbm_bytes_per_s=3.35e12,
    mma_flops_per_s={"bfloat16": 989.4e12, "float16": 989.4e12,
                     "tf32": 494.7e12, "float32": 67e12},
    vector_flops_per_s=67e12,
    sfu_per_s=132 * 16 * _H100_SXM_BOOST_HZ,   # 3.86e12/s
    sources=(
        "HBM3 3.35 TB/s, BF16/FP16 tensor 989.4 TFLOP/s dense (1,979 with sparsity), TF32 tensor "
        "494.7 TFLOP/s dense, FP32 67 TFLOP/s: NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column "
        "(dense = the sparsity figures halved, as its footnote says)",
        "132 SMs, 4 fourth-generation tensor cores per SM, 512 dense FP16/BF16 FMA per tensor core "
        "per clock (twice A100's): NVIDIA H100 Tensor Core GPU Architecture whitepaper (Hopper); "
        "the 989.4 TFLOP/s imply a 1.83 GHz clock",
        "16 exp2/log2 results per SM per clock on compute capability 9.0: CUDA C++ Programming Guide, "
        "arithmetic instruction throughput table; x 132 SMs x 1.83 GHz = 3.86e12/s",
        "eager float32 matmuls run at the FP32 rate: torch's default "
        "torch.backends.cuda.matmul.allow_tf32 = False",
    ),
)


# ----------------------------------------------------------------------------------------------
# costs


@dataclass(frozen=True)
class Cost:
    bytes: float = 0.0
    mma_flops: float = 0.0
    vector_flops: float = 0.0
    transcendentals: float = 0.0
    mma_dtype: str = "float32"   # key of Hardware.mma_flops_per_s

    def __add__(self, other: "Cost") -> "Cost":
        if self.mma_flops and other.mma_flops and self.mma_dtype != other.mma_dtype:
            raise ValueError(f"adding matmuls at {self.mma_dtype} and {other.mma_dtype} rates")
        return Cost(self.bytes + other.bytes, self.mma_flops + other.mma_flops,
                    self.vector_flops + other.vector_flops,
                    self.transcendentals + other.transcendentals,
                    self.mma_dtype if self.mma_flops else other.mma_dtype)

    def scaled(self, k: float) -> "Cost":
        return dataclasses.replace(self, bytes=self.bytes * k, mma_flops=self.mma_flops * k,
                                   vector_flops=self.vector_flops * k,
                                   transcendentals=self.transcendentals * k)

    def times_s(self, hw: Hardware = H100_SXM) -> dict:
        return {"memory": self.bytes / hw.hbm_bytes_per_s,
                "mma": self.mma_flops / hw.mma_flops_per_s[self.mma_dtype],
                "vector": self.vector_flops / hw.vector_flops_per_s,
                "sfu": self.transcendentals / hw.sfu_per_s}

    def bound_s(self, hw: Hardware = H100_SXM) -> float:
        return max(self.times_s(hw).values())

    def limiter(self, hw: Hardware = H100_SXM) -> str:
        times = self.times_s(hw)
        return max(times, key=times.get)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# fused kernels: formulas

# per (token, cell, point) of a rendered target: dx, dy, two squares, a sum, the exponent's scale,
# the weight and the accumulation
RENDER_FLOPS_PER_TERM = 8
# per (token, cell) of an online softmax / loss update: max, shift, scale, sums of R, R·z, R log R
SOFTMAX_FLOPS_PER_LOGIT = 10


def render_fused(batch: int, tokens: int, grid: tuple[int, int], ppt: int) -> Cost:
    """Triton ``render_traces``: the kernel reads each token's points (x, y float32, weight float32)
    and range (2 int32), writes R [T, N] float32 and per-tile sums; then torch normalizes
    (``R / ΣR`` and the ``where`` on valid: read R twice, write twice) and writes ``valid``."""
    T, N = batch * tokens, grid[0] * grid[1]
    kernel = T * ppt * 12 + T * 8 + 4 * T * N
    normalize = 4 * T * N * 4 + T
    return Cost(bytes=kernel + normalize, vector_flops=RENDER_FLOPS_PER_TERM * T * N * ppt + 2 * T * N,
                transcendentals=T * N * ppt)


def trace_loss_fused(batch: int, tokens: int, grid: tuple[int, int], dim: int, ppt: int,
                     dtype: torch.dtype) -> Cost:
    """Triton ``trace_attention_loss``, forward + backward.

    forward: read q [T, D] and k [B, N, D] (dtype), the points (12 B each) and ranges (8 B per
    token); write 4 float32 statistics per token. backward: the same reads plus the statistics and
    the per-token coefficient; write dq float32, zero-fill and atomically accumulate dk float32
    (its final value written once), then cast both to the input dtype (read float32, write dtype).
    Matmuls: logits in the forward, and logits again, dq and dk in the backward (8·T·N·D). The
    target is rendered in both passes (T·N·ppt exps each); the softmax takes one exp per logit and
    pass, and the kl term one log per (token, cell)."""
    B, T, N, D, e = batch, batch * tokens, grid[0] * grid[1], dim, _elt(dtype)
    inputs = T * D * e + B * N * D * e + T * ppt * 12 + T * 8
    forward = inputs + 4 * T * 4
    backward = inputs + 5 * T * 4 + T * D * 4 + 2 * B * N * D * 4
    casts = (T * D + B * N * D) * (4 + e)
    # fp32 operands take exact ("ieee") dots: the FP32 rate, not the tensor cores
    mma_dtype = _name(dtype) if dtype in (torch.bfloat16, torch.float16) else "float32"
    return Cost(bytes=forward + backward + casts, mma_flops=8.0 * T * N * D, mma_dtype=mma_dtype,
                vector_flops=2 * (RENDER_FLOPS_PER_TERM * T * N * ppt + SOFTMAX_FLOPS_PER_LOGIT * T * N),
                transcendentals=2 * T * N * ppt + 3 * T * N)


def contrastive_fused(n: int, dim: int, dtype: torch.dtype) -> Cost:
    """Triton ``contrastive_loss``, forward + backward.

    forward: read both [N, D] embeddings (dtype) for the logits and again for the positive logits;
    row and column LSEs (float32) out. backward: read both again in the kernel that writes the
    softmax-gradient block G [N, N] (dtype), which the two GEMMs read back (dA = G B, dB = Gᵀ A,
    reading A and B once more); dA, dB float32 out, then cast (read float32, write dtype).
    Matmuls: 8·N²·D (logits twice, two gradient GEMMs); 16-bit operands at the tensor-core rate,
    float32 ones as 3xTF32 (three TF32 products each). Exps: one per logit and direction, forward
    and backward (4·N²). When G's row blocks are too short for one backward pass
    (``backward_passes`` = 2, large N), dB comes from a second pass that recomputes G over column
    blocks: 10·N²·D matmul flops, 6·N² exps, and G written and read twice."""
    from .triton.contrastive import backward_passes

    e = _elt(dtype)
    passes = backward_passes(n, n, dim, e)
    emb = 2 * n * dim * e
    forward = 2 * emb + 2 * n * 4
    g_bytes = (3 if passes == 1 else 4) * n * n * e
    backward = passes * (2 * emb + 2 * n * 4) + g_bytes + 2 * n * dim * 4
    casts = 2 * n * dim * (4 + e)
    flops = (8.0 if passes == 1 else 10.0) * n * n * dim
    if dtype in (torch.bfloat16, torch.float16):
        mma, mma_dtype = flops, _name(dtype)
    else:
        mma, mma_dtype = 3 * flops, "tf32"
    return Cost(bytes=forward + backward + casts, mma_flops=mma, mma_dtype=mma_dtype,
                vector_flops=SOFTMAX_FLOPS_PER_LOGIT * 2 * n * n,
                transcendentals=(4.0 if passes == 1 else 6.0) * n * n)


# ----------------------------------------------------------------------------------------------
# eager references: counted

# outputs of these are not data reads of their inputs (shape only)
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "new_empty_strided",
               "new_empty", "new_zeros", "new_full", "scalar_tensor", "_local_scalar_dense"}
_TRANSCENDENTAL = {"exp", "log", "_log_softmax", "_log_softmax_backward_data", "_softmax",
                   "logsumexp"}


def _tensor_bytes(t: torch.Tensor) -> int:
    # an expanded (stride-0) input is read once per stored element, not per broadcast element
    if any(s == 0 for s in t.stride()):
        return t.untyped_storage().nbytes() if t.numel() else 0
    return t.numel() * t.element_size()


def count_eager(fn) -> Cost:
    """Runs ``fn()`` (forward and backward, as the caller writes it) and counts, over every aten op
    it dispatches: bytes of its tensor inputs and outputs (views and aliasing outputs move no data;
    in-place ops count their written operand once more), matmul flops (torch's FlopCounterMode),
    one transcendental per output element of exp/log/softmax ops, and one vector flop per output
    element of the other arithmetic ops."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    totals = {"bytes": 0, "vector": 0, "trans": 0}

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.is_view or name in ("detach", "alias", "_unsafe_view", "lift_fresh"):
                return out
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            read = 0 if name in _SHAPE_ONLY else sum(_tensor_bytes(t) for t in ins)
            written = sum(t.numel() * t.element_size() for t in outs)
            totals["bytes"] += read + written
            produced = sum(t.numel() for t in outs if t.is_floating_point())
            if name in _TRANSCENDENTAL:
                totals["trans"] += produced
            elif name not in _SHAPE_ONLY and not name.startswith(("zeros", "ones", "empty", "arange",
                                                                  "_to_copy", "copy", "clone", "index",
                                                                  "mm", "bmm", "addmm", "cat", "stack")):
                totals["vector"] += produced
            return out

    flops = FlopCounterMode(display=False)
    with flops, _Count():
        fn()
    return Cost(bytes=totals["bytes"], mma_flops=flops.get_total_flops(),
                vector_flops=totals["vector"], transcendentals=totals["trans"], mma_dtype="float32")


def _fit(counts: dict[int, Cost], at: int) -> Cost:
    """The polynomial through ``counts`` (one point per degree + 1), evaluated at ``at``, for each
    field (Lagrange form; exact for costs that are polynomials of that degree)."""
    xs = sorted(counts)
    weights = []
    for i, x in enumerate(xs):
        w = 1.0
        for j, y in enumerate(xs):
            if j != i:
                w *= (at - y) / (x - y)
        weights.append(w)
    fields = ("bytes", "mma_flops", "vector_flops", "transcendentals")
    values = {f: round(sum(w * getattr(counts[x], f) for w, x in zip(weights, xs))) for f in fields}
    return Cost(**values, mma_dtype=counts[xs[0]].mma_dtype)


def trace_inputs_exact(batch: int, tokens: int, grid: tuple[int, int], dim: int, ppt: int,
                       dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs of the cost model: every token has ``ppt`` points of its own, all are targets."""
    g = torch.Generator().manual_seed(seed)
    T = batch * tokens
    starts = torch.arange(T, dtype=torch.int32) * ppt
    return {"q": torch.randn(batch, tokens, dim, generator=g).to(dtype),
            "k": torch.randn(batch, grid[0] * grid[1], dim, generator=g).to(dtype),
            "points_xy": torch.rand(T * ppt, 2, generator=g),
            "point_weights": torch.rand(T * ppt, generator=g) + 0.1,
            "token_ranges": torch.stack([starts, starts + ppt], -1).reshape(batch, tokens, 2),
            "loc_mask": torch.ones(batch, tokens, dtype=torch.bool)}


def _count_trace(kernel: str, batch, tokens, grid, dim, ppt, dtype, sigma=0.08) -> Cost:
    from . import reference
    x = trace_inputs_exact(batch, tokens, grid, dim, ppt, dtype)
    if kernel == "render_traces":
        return count_eager(lambda: reference.render_traces(x["points_xy"], x["point_weights"],
                                                           x["token_ranges"], grid, sigma))
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()

    def full():
        reference.trace_attention_loss(q, k, x["points_xy"], x["point_weights"], x["token_ranges"],
                                       x["loc_mask"], grid, sigma, 1 / math.sqrt(dim), "kl").backward()
    return count_eager(full)


def trace_reference(kernel: str, batch: int, tokens: int, grid: tuple[int, int], dim: int, ppt: int,
                    dtype: torch.dtype) -> Cost:
    """The eager reference of ``render_traces`` or ``trace_attention_loss`` (kl, forward + backward),
    counted at B = 1 and 2 and extended linearly to ``batch`` (every term is per image, or fixed)."""
    return _fit({b: _count_trace(kernel, b, tokens, grid, dim, ppt, dtype) for b in (1, 2)}, batch)


def contrastive_reference(n: int, dim: int, dtype: torch.dtype) -> Cost:
    """The eager reference ``contrastive_loss``, forward + backward, counted at N = 4, 8, 16 and
    extended as the quadratic in N it is (N² logits and softmaxes, N·D embeddings)."""
    from . import reference

    def count(m):
        g = torch.Generator().manual_seed(m)
        leaves = [torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1).to(dtype)
                  .requires_grad_() for _ in range(2)]
        ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        return count_eager(lambda: reference.contrastive_loss(*leaves, ls).backward())
    return _fit({m: count(m) for m in (4, 8, 16)}, n)


# ----------------------------------------------------------------------------------------------
# what the bench reports


def fused_cost(kernel: str, params: dict, dtype: torch.dtype) -> Cost:
    if kernel == "render_traces":
        return render_fused(params["B"], params["L"], params["grid"], params["ppt"])
    if kernel == "trace_attention_loss":
        return trace_loss_fused(params["B"], params["L"], params["grid"], params["D"], params["ppt"], dtype)
    if kernel == "contrastive_loss":
        return contrastive_fused(params["N"], params["D"], dtype)
    raise ValueError(f"no roofline for {kernel!r}")


def reference_cost(kernel: str, params: dict, dtype: torch.dtype) -> Cost:
    if kernel in ("render_traces", "trace_attention_loss"):
        return trace_reference(kernel, params["B"], params["L"], params["grid"], params["D"],
                               params["ppt"], dtype)
    if kernel == "contrastive_loss":
        return contrastive_reference(params["N"], params["D"], dtype)
    raise ValueError(f"no roofline for {kernel!r}")


def roofline(kernel: str, params: dict, dtype: torch.dtype, hw: Hardware = H100_SXM) -> dict:
    """{provider: metrics} for the fused kernel ("triton") and the eager reference: bytes, mma
    flops, transcendentals, the bound in ms and what sets it; the fused row also carries
    ``bound_ratio`` = reference bound / fused bound (the speed-up the roofline allows)."""
    out = {}
    for provider, cost in (("triton", fused_cost(kernel, params, dtype)),
                           ("reference", reference_cost(kernel, params, dtype))):
        out[provider] = {"bytes": cost.bytes, "mma_flops": cost.mma_flops,
                         "transcendentals": cost.transcendentals, "bound_ms": cost.bound_s(hw) * 1e3,
                         "limiter": cost.limiter(hw)}
    out["triton"]["bound_ratio"] = out["reference"]["bound_ms"] / out["triton"]["bound_ms"]
    return out
