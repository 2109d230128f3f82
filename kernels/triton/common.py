"""What the Triton kernels share: the matrix product they all use, with the GPU's numerics also
under the interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels on CPU)."""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tf32(x):
    """x cut to tf32's 10 mantissa bits, truncated (the GPU rounds the high part, so this errs at
    least as much as the tensor cores do)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, INTERPRET: tl.constexpr):
    """``a @ b`` accumulated in float32 on the tensor cores: 16-bit operands as they are, float32
    ones as 3xTF32 (hi·hi + hi·lo + lo·hi, within a few float32 ulp of the exact product; plain
    fp32 "ieee" dots would run on the CUDA cores and spill at these tiles).

    Under the interpreter, which multiplies 16-bit tiles as raw integers (triton 3.x) and float32
    ones exactly: 16-bit operands are upcast (exact — their products fit float32) and float32
    operands go through the same three products, so the tests see the GPU's rounding."""
    if INTERPRET:
        if a.dtype == tl.float32:
            a_hi = _tf32(a)
            b_hi = _tf32(b)
            a_lo = _tf32(a - a_hi)
            b_lo = _tf32(b - b_hi)
            out = tl.dot(a_hi, b_lo, input_precision="ieee")
            out = tl.dot(a_lo, b_hi, out, input_precision="ieee")
            out = tl.dot(a_hi, b_hi, out, input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out
