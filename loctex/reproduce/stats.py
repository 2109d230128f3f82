"""The statistics of the study, each a small pure function on lists of numbers (one per seed).

* A cell of a table is ``summary(values)``: mean and sample standard deviation (ddof=1) over seeds.
* A claim compares two backbones trained with the same seeds: ``paired_interval(a, b)`` is the
  mean of the per-seed differences ``a_s - b_s`` with its two-sided t interval (n - 1 degrees of
  freedom), and ``verdict`` reads it: *supported* when the whole interval lies on the claimed side
  of 0, *contradicted* when it lies wholly on the other side, *inconclusive* otherwise (and always
  with fewer than two seeds).
* ``crossing`` reads a curve (score against a data fraction): the fraction at which it first reaches
  a target score, interpolated linearly in log fraction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else math.nan


def sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); nan below two values."""
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy comes with scikit-learn)."""
    from scipy.stats import t
    return float(t.ppf(p, df))


def summary(values: Sequence[float]) -> dict:
    """A table cell: ``{"mean", "sd", "n", "values"}``."""
    values = [float(v) for v in values]
    return {"mean": mean(values), "sd": sd(values), "n": len(values), "values": values}


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``a_s - b_s`` over the seeds s with its ``level`` t interval:
    ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)``; lo and hi are nan below two seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one of each per seed, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, m, s = len(d), mean(d), sd(d)
    half = t_quantile((1 + level) / 2, n - 1) * s / math.sqrt(n) if n >= 2 else math.nan
    return {"diff": m, "sd": s, "n": n, "lo": m - half, "hi": m + half, "level": level,
            "per_seed": d}


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """One word for an interval of (claimed better) - (other)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if not higher_is_better:
        lo, hi = -hi, -lo
    if lo > 0:
        return SUPPORTED
    if hi < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def crossing(fractions: Sequence[float], scores: Sequence[float], target: float) -> tuple[str, float]:
    """Where the curve ``scores`` over increasing ``fractions`` first reaches ``target``:
    ``("=", f)`` between two measured points (linear in log fraction), ``("<=", fractions[0])``
    when the smallest fraction already reaches it, ``(">", fractions[-1])`` when none does."""
    pts = list(zip(fractions, scores))
    if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        raise ValueError(f"fractions must increase: {list(fractions)}")
    if pts[0][1] >= target:
        return "<=", float(pts[0][0])
    for (f0, s0), (f1, s1) in zip(pts, pts[1:]):
        if s1 >= target:  # s0 < target <= s1
            w = (target - s0) / (s1 - s0)
            return "=", float(math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))))
    return ">", float(pts[-1][0])
