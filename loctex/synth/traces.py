"""Mouse traces like an annotator's pointer.

While a phrase about an object is spoken, the pointer circles over that object (shifted in time by
the annotator's lag or lead); while the background is described it sweeps wide loops that may leave
the image by a few percent; in between it travels on minimum-jerk paths, sometimes through a detour
or far out of the image. Points are sampled at ~20 Hz with hand jitter. Only points within the band
of 10% around the image are recorded, and a new segment starts each time the pointer re-enters it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DT = 0.05     # seconds between points (~20 Hz)
BAND = 0.1    # points are recorded up to this far outside [0, 1]


@dataclass(frozen=True)
class Style:
    """How one annotator speaks and points."""
    rate: float           # speech duration factor (1 = ~2.5 words/s)
    lag: float            # mean seconds the pointer trails speech (< 0: it leads)
    scribble: float       # radius of the circling, as a fraction of the object's half size
    jitter: float         # hand tremor factor
    exit_p: float         # chance of leaving the image during a long move
    left_to_right: float  # chance of describing objects from left to right


def annotator_pool(seed: int, n: int = 48) -> list[tuple[int, Style]]:
    rng = np.random.default_rng([seed, 0xA77])
    ids = np.sort(rng.choice(np.arange(1, 200), n, replace=False))
    return [(int(i), Style(rate=rng.uniform(0.85, 1.15), lag=float(np.clip(rng.normal(0.2, 0.25), -0.4, 0.8)),
                           scribble=rng.uniform(0.12, 0.9), jitter=rng.uniform(0.6, 1.5),
                           exit_p=rng.uniform(0.05, 0.35), left_to_right=rng.uniform(0.2, 0.8)))
            for i in ids]


def _min_jerk(u):
    return u * u * u * (10 - 15 * u + 6 * u * u)


def _outside(rng, near):
    """A point 15-35% beyond the image edge closest to ``near``: off the recorded band."""
    p = np.clip(np.asarray(near, float) + rng.normal(0, 0.1, 2), 0.05, 0.95)
    axis = int(rng.integers(2))
    p[axis] = -rng.uniform(0.15, 0.35) if p[axis] < 0.5 else 1 + rng.uniform(0.15, 0.35)
    return p


def _edge(rng, near):
    """A point 2-9% outside the image (inside the recorded band)."""
    p = np.clip(np.asarray(near, float) + rng.normal(0, 0.15, 2), 0.0, 1.0)
    axis = int(rng.integers(2))
    p[axis] = -rng.uniform(0.02, 0.09) if p[axis] < 0.5 else 1 + rng.uniform(0.02, 0.09)
    return p


class _Dwell:
    """Pointer motion over one target during [a, b]: circling an object, or loops for the background."""

    def __init__(self, rng, target, objects, style: Style, a: float, b: float):
        self.a, self.b = a, b
        if target == "bg":
            self.c = 0.5 + rng.normal(0, 0.05, 2)
            self.r = rng.uniform(0.25, 0.6, 2)  # > 0.6 leaves the recorded band
            w = 2 * np.pi * rng.uniform(0.25, 0.5)
            self.w = np.array([w, w * rng.uniform(0.7, 1.4)])
            self.phase = rng.uniform(0, 2 * np.pi, 2)
            self.mod = 0.0
        else:
            x0, y0, x1, y1 = objects[target]
            half = np.array([x1 - x0, y1 - y0]) / 2
            self.c = np.array([x0 + x1, y0 + y1]) / 2 + rng.normal(0, 0.08, 2) * half
            self.r = style.scribble * rng.uniform(0.8, 1.2) * half
            w = 2 * np.pi * rng.uniform(0.6, 1.5) * (1 if rng.random() < 0.5 else -1)
            p = rng.uniform(0, 2 * np.pi)
            self.w, self.phase = np.array([w, w]), np.array([p, p + np.pi / 2])
            self.mod = 0.25

    def __call__(self, t):
        u = np.atleast_1d(np.asarray(t, float))[:, None] - self.a
        pos = self.c + self.r * np.sin(self.w * u + self.phase) * (1 + self.mod * np.sin(2.3 * self.w[0] * u))
        return pos


def _travel(rng, t, p0, p1, g0, g1, style: Style, nominal: float, first: bool, leave: bool = False):
    """Positions at times ``t`` (within [g0, g1]) moving from p0 to p1 (via a point off the
    recorded band when ``leave``)."""
    dur = g1 - g0
    pts = [p0]
    if leave:
        pts.append(_outside(rng, (p0 + p1) / 2))
    elif dur > 0.8 and not first:
        r = rng.random()
        if r < style.exit_p:
            pts.append(_outside(rng, (p0 + p1) / 2))
        elif r < style.exit_p + 0.12:
            pts.append(_edge(rng, (p0 + p1) / 2))
        elif r < style.exit_p + 0.3:
            pts.append(rng.uniform(0.1, 0.9, 2))
    pts.append(p1)
    move = dur if len(pts) > 2 else min(dur, nominal * rng.uniform(1.0, 1.6) if not first else rng.uniform(0.5, 1.2))
    s0 = g1 - move  # hold still (but for jitter) before moving
    legs = len(pts) - 1
    u = np.clip((t - s0) / max(move, 1e-6), 0, 1) * legs
    leg = np.minimum(u.astype(int), legs - 1)
    frac = _min_jerk(u - leg)[:, None]
    pts = np.asarray(pts)
    return pts[leg] + (pts[leg + 1] - pts[leg]) * frac


def make_traces(rng, words, boxes, style: Style) -> list:
    """Trace segments, each ``(x, y, t)`` arrays (rounded as written), for the spoken ``words`` over
    objects with normalized ``boxes`` (x0, y0, x1, y1)."""
    # Chunks: runs of words about one target; a chunk lasts until the next word starts (its pause).
    chunks = []
    for i, w in enumerate(words):
        if w.target is None:
            continue
        if chunks and chunks[-1][0] == w.target and chunks[-1][3] == i - 1:
            chunks[-1][2], chunks[-1][3] = w.end, i
        else:
            chunks.append([w.target, w.start, w.end, i])
    leave = []
    for c in chunks:
        nxt = words[c[3] + 1].start if c[3] + 1 < len(words) else None
        # At a sentence end the pointer sometimes leaves the image during the pause and re-enters.
        leave.append(nxt is not None and words[c[3]].text.endswith(".") and nxt - c[2] > 0.45
                     and rng.random() < 1.5 * style.exit_p)
        c[2] = c[2] + 0.1 if leave[-1] else nxt if nxt is not None else c[2] + rng.uniform(0.2, 0.5)

    lag = style.lag + rng.normal(0, 0.15)
    n = len(chunks)
    shift = np.clip(lag + rng.normal(0, 0.1, n), -0.6, 1.0)
    a = np.array([c[1] for c in chunks]) + shift - rng.uniform(0, 0.15, n)
    b = np.array([c[2] for c in chunks]) + shift
    centers = [np.array([0.5, 0.5]) if c[0] == "bg" else
               np.array([(boxes[c[0]][0] + boxes[c[0]][2]) / 2, (boxes[c[0]][1] + boxes[c[0]][3]) / 2])
               for c in chunks]
    tau = [float(np.clip(0.2 + 0.3 * np.hypot(*(centers[j + 1] - centers[j])), 0.2, 0.6)) for j in range(n - 1)]
    a[0] = max(a[0], 0.0)
    for j in range(n - 1):  # make room to travel, keeping every dwell at least 0.2 s
        if a[j + 1] - b[j] < tau[j]:
            m = (b[j] + a[j + 1]) / 2
            b[j], a[j + 1] = m - tau[j] / 2, m + tau[j] / 2
        if b[j] < a[j] + 0.2:
            b[j] = a[j] + 0.2
            a[j + 1] = max(a[j + 1], b[j] + tau[j])
    b[-1] = max(b[-1], a[-1] + 0.2)
    end = max(words[-1].end + rng.uniform(0.3, 1.0), b[-1] + 0.1)

    t = np.arange(int(end / DT) + 1) * DT + rng.uniform(-0.01, 0.01, int(end / DT) + 1)
    t[0] = 0.0
    pos = np.empty((len(t), 2))
    dwells = [_Dwell(rng, c[0], boxes, style, a[j], b[j]) for j, c in enumerate(chunks)]
    idx_a, idx_b = np.searchsorted(t, a), np.searchsorted(t, b)
    prev_end = rng.uniform(0.1, 0.9, 2) if rng.random() < 0.65 else _outside(rng, rng.uniform(0, 1, 2))
    g0, i0 = 0.0, 0
    for j, d in enumerate(dwells):
        pos[i0:idx_a[j]] = _travel(rng, t[i0:idx_a[j]], prev_end, d(a[j])[0], g0, a[j], style,
                                   tau[j - 1] if j else 0.5, first=(j == 0), leave=j > 0 and leave[j - 1])
        pos[idx_a[j]:idx_b[j]] = d(t[idx_a[j]:idx_b[j]])
        prev_end, g0, i0 = d(b[j])[0], b[j], idx_b[j]
    final = _outside(rng, prev_end) if rng.random() < 0.5 else prev_end + rng.normal(0, 0.05, 2)
    pos[i0:] = _travel(rng, t[i0:], prev_end, final, g0, end, style, 0.5, first=True)

    # Hand jitter: smooth tremor (moving sum of white noise) plus a little white noise.
    walk = np.cumsum(rng.standard_normal((len(t) + 6, 2)), 0)
    pos += style.jitter * (0.006 / np.sqrt(6) * (walk[6:] - walk[:-6]) + 0.0025 * rng.standard_normal(pos.shape))
    pos[1:-1] = 0.25 * pos[:-2] + 0.5 * pos[1:-1] + 0.25 * pos[2:]

    inside = (np.abs(pos - 0.5) <= 0.5 + BAND).all(1)
    edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    pos, t = np.round(pos, 4), np.round(t, 3)
    return [(pos[s:e, 0], pos[s:e, 1], t[s:e])
            for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def traces_json(segments) -> str:
    """The LN ``traces`` value as JSON text, written directly: far faster than json.dumps of dicts."""
    out = []
    for xs, ys, ts in segments:
        out.append("[" + ", ".join(f'{{"x": {x!r}, "y": {y!r}, "t": {t!r}}}'
                                   for x, y, t in zip(xs.tolist(), ys.tolist(), ts.tolist())) + "]")
    return "[" + ", ".join(out) + "]"
