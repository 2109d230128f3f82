"""The performance targets the issues set, in their words, and how a set of benchmark rows meets them.

One table (``TARGETS``) read by the kernel benchmark's summary and by ``benchmarks/gpu_check.py``.
A row is a dict with ``kernel``, ``provider``, ``shape``, ``metric``, ``value`` (the bench's CSV);
each check answers (met: True / False / None for not measured, evidence).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


def lookup(rows, kernel: str, provider: str, metric: str, shape_has: str = ""):
    """The value of the first row that matches (shape containing ``shape_has``), else None."""
    for r in rows:
        if (r["kernel"], r["provider"], r["metric"]) == (kernel, provider, metric) and shape_has in r["shape"]:
            return float(r["value"]) if r["value"] not in ("", None) else None
    return None


Check = Callable[[list], "tuple[Optional[bool], str]"]


@dataclass(frozen=True)
class Target:
    issue: int
    where: str       # "cpu", "cuda" (a measured GPU run) or "paper" (the H100 roofline)
    words: str       # the issue's words
    check: Check


def _cpu_fused_loss(rows):
    s = lookup(rows, "trace_attention_loss", "cpp", "speedup_full", "B=32,L=64,grid=7x7")
    if s is None:
        return None, "not measured (C++ ops unavailable or shape not run)"
    return s >= 10, f"{s:.1f}x"


def _cpu_contrastive_64k(rows):
    ms = lookup(rows, "contrastive_loss", "blocked", "full_ms", "N=65536,D=512")
    if ms is None:
        return None, "not run"
    peak = lookup(rows, "contrastive_loss", "blocked", "peak_rss_mb", "N=65536,D=512")
    return True, f"ran: fwd+bwd {ms / 1e3:.0f} s" + ("" if peak is None else f", peak +{peak / 1024:.2f} GiB RSS")


def _gpu_fused_loss(grid):
    def check(rows):
        shape = f"B=256,L=96,grid={grid}"
        s = lookup(rows, "trace_attention_loss", "triton", "speedup_full", shape)
        m = lookup(rows, "trace_attention_loss", "triton", "memory_ratio", shape)
        if s is None or m is None:
            return None, "not measured"
        return s >= 10 and m >= 10, f"{s:.1f}x faster, {m:.1f}x less memory"
    return check


def _paper_fused_loss(grid):
    def check(rows):
        r = lookup(rows, "trace_attention_loss", "triton", "bound_ratio", f"B=256,L=96,grid={grid}")
        if r is None:
            return None, "shape not in the roofline"
        return r >= 10, f"reference bound / fused bound = {r:.1f}x"
    return check


def _gpu_contrastive_64k(rows):
    f = lookup(rows, "contrastive_loss", "triton", "frac_matmul", "N=65536,")
    mem = lookup(rows, "contrastive_loss", "triton", "peak_mem_mb", "N=65536,")
    if f is None or mem is None:
        return None, "not measured"
    return f >= 0.5 and mem < 2048, f"{f:.0%} of the matmul rate, {mem / 1024:.2f} GB extra"


def _gpu_contrastive_1m(rows):
    ms = lookup(rows, "contrastive_loss", "triton", "full_ms", "N=1048576,")
    if ms is None:
        return None, "not run"
    mem = lookup(rows, "contrastive_loss", "triton", "peak_mem_mb", "N=1048576,")
    return True, f"ran, fwd+bwd {ms / 1e3:.1f} s" + ("" if mem is None else f", {mem / 1024:.1f} GB extra")


TARGETS: tuple[Target, ...] = (
    Target(5, "cpu", "CPU, C++ fused loss, B=32, L=64, 7×7: ≥ 10× faster than the reference, "
                     "forward+backward", _cpu_fused_loss),
    Target(14, "cpu", "contrastive_loss on CPU tensors runs in O(N·D) memory, so that N = 65,536, "
                      "D = 512 runs on a 24 GB CPU machine", _cpu_contrastive_64k),
    Target(14, "paper", "fused loss forward+backward ≥ 10× faster than the reference at B=256, L=96, "
                        "7×7, checked on paper (H100 roofline bounds)", _paper_fused_loss("7x7")),
    Target(14, "paper", "fused loss forward+backward ≥ 10× faster than the reference at B=256, L=96, "
                        "14×14, checked on paper (H100 roofline bounds)", _paper_fused_loss("14x14")),
    Target(5, "cuda", "H100: fused loss forward+backward ≥ 10× faster than the reference with ≥ 10× "
                      "less peak memory at the paper-scale shape (B=256, L=96, 7×7)", _gpu_fused_loss("7x7")),
    Target(5, "cuda", "H100: fused loss forward+backward ≥ 10× faster than the reference with ≥ 10× "
                      "less peak memory at the paper-scale shape (B=256, L=96, 14×14)", _gpu_fused_loss("14x14")),
    Target(5, "cuda", "contrastive at N=65,536, D=512, bf16 reaches ≥ 50% of the measured bf16 matmul "
                      "rate on its 8·N²·D flops with < 2 GB extra memory", _gpu_contrastive_64k),
    Target(5, "cuda", "N = 1,048,576 runs on one GPU", _gpu_contrastive_1m),
)


def evaluate(rows, where: set[str] | None = None) -> list[tuple[Target, Optional[bool], str]]:
    """(target, met, evidence) for every target (or those whose ``where`` is in ``where``)."""
    return [(t, *t.check(rows)) for t in TARGETS if where is None or t.where in where]


def summary_lines(results) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    return [f"[{verdict[met]}] issue {t.issue} ({t.where}): {t.words} — {evidence}"
            for t, met, evidence in results]
