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
    """``n`` annotators (id, style); ids look like LN's: small integers, not contiguous."""
    rng = np.random.default_rng([seed, 0xA77])
    ids = np.sort(rng.choice(np.arange(1, 200), n, replace=False))
    pool = []
    for i in ids:
        pool.append((int(i), Style(
            rate=rng.uniform(0.85, 1.15), lag=float(np.clip(rng.normal(0.2, 0.25), -0.4, 0.8)),
            scribble=rng.uniform(0.12, 0.9), jitter=rng.uniform(0.6, 1.5), exit_p=rng.uniform(0.05, 0.35),
            left_to_right=rng.uniform(0.2, 0.8))))
    return pool


def _min_jerk(u):
    return u * u * u * (10 - 15 * u + 6 * u * u)


def _outside(rng, near):
    """A point 15-35% beyond an image edge, off the recorded band (near ``near`` along the edge)."""
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


def _plan(words):
    """Chunks ``[target, start, end, last word index]``: runs of words about one target (filler
    words, whose target is None, belong to none)."""
    chunks = []
    for i, w in enumerate(words):
        if w.target is None:
            continue
        if chunks and chunks[-1][0] == w.target and chunks[-1][3] == i - 1:
            chunks[-1][2], chunks[-1][3] = w.end, i
        else:
            chunks.append([w.target, w.start, w.end, i])
    return chunks


def make_traces(rng, words, boxes, style: Style) -> list:
    """Trace segments, each ``(x, y, t)`` arrays (rounded as written), for the spoken ``words`` over
    objects with normalized ``boxes`` (x0, y0, x1, y1).

    Time is cut into dwells (one per chunk of words about one target) and the gaps between them;
    the few per-piece parameters are drawn in Python, then every point is evaluated at once."""
    chunks = _plan(words)
    n = len(chunks)
    leave = np.zeros(n + 1, bool)  # gap j (before dwell j; gap n is after the last) leaves the band
    for j, c in enumerate(chunks):
        # A dwell lasts until the next word starts (the pointer stays during the pause), except that
        # at a sentence end the pointer sometimes leaves the image during the pause and re-enters.
        nxt = words[c[3] + 1].start if c[3] + 1 < len(words) else None
        leave[j + 1] = (nxt is not None and words[c[3]].text.endswith(".") and nxt - c[2] > 0.45
                        and rng.random() < 1.5 * style.exit_p)
        c[2] = c[2] + 0.1 if leave[j + 1] else nxt if nxt is not None else c[2] + rng.uniform(0.2, 0.5)

    # Dwell parameters: circling an object (ellipse around its center), loops for the background.
    is_bg = np.array([c[0] == "bg" for c in chunks])
    box = np.array([(0.3, 0.3, 0.7, 0.7) if c[0] == "bg" else boxes[c[0]] for c in chunks], float)
    half = (box[:, 2:] - box[:, :2]) / 2
    center = (box[:, :2] + box[:, 2:]) / 2 + rng.normal(0, 0.08, (n, 2)) * half
    radius = style.scribble * rng.uniform(0.8, 1.2, (n, 1)) * half
    omega = 2 * np.pi * rng.uniform(0.6, 1.5, (n, 1)) * np.where(rng.random((n, 1)) < 0.5, 1, -1)
    omega = np.repeat(omega, 2, 1)
    phase = rng.uniform(0, 2 * np.pi, (n, 1)) + [0, np.pi / 2]
    mod = np.full(n, 0.25)
    if is_bg.any():
        k = int(is_bg.sum())
        center[is_bg] = 0.5 + rng.normal(0, 0.05, (k, 2))
        radius[is_bg] = rng.uniform(0.25, 0.6, (k, 2))  # > 0.6 leaves the recorded band
        w = 2 * np.pi * rng.uniform(0.25, 0.5, (k, 1))
        omega[is_bg] = w * np.concatenate([np.ones((k, 1)), rng.uniform(0.7, 1.4, (k, 1))], 1)
        phase[is_bg] = rng.uniform(0, 2 * np.pi, (k, 2))
        mod[is_bg] = 0.0

    # Dwell times: speech shifted by the annotator's lag; room to travel between dwells.
    shift = np.clip(style.lag + rng.normal(0, 0.15) + rng.normal(0, 0.1, n), -0.6, 1.0)
    a = np.array([c[1] for c in chunks]) + shift - rng.uniform(0, 0.15, n)
    b = np.array([c[2] for c in chunks]) + shift
    tau = np.clip(0.2 + 0.3 * np.hypot(*(center[1:] - center[:-1]).T), 0.2, 0.6)  # travel seconds
    a[0] = max(a[0], 0.0)
    for j in range(n - 1):  # keep every dwell at least 0.2 s
        if a[j + 1] - b[j] < tau[j]:
            m = (b[j] + a[j + 1]) / 2
            b[j], a[j + 1] = m - tau[j] / 2, m + tau[j] / 2
        if b[j] < a[j] + 0.2:
            b[j] = a[j] + 0.2
            a[j + 1] = max(a[j + 1], b[j] + tau[j])
    b[-1] = max(b[-1], a[-1] + 0.2)
    end = max(words[-1].end + rng.uniform(0.3, 1.0), b[-1] + 0.1)

    def dwell(j, t):
        u = (t - a[j])[:, None]
        return center[j] + radius[j] * np.sin(omega[j] * u + phase[j]) \
            * (1 + mod[j][:, None] * np.sin(2.3 * omega[j, :1] * u))

    starts, ends = dwell(np.arange(n), a), dwell(np.arange(n), b)
    # Gaps: from where the pointer was to where the next dwell starts, after holding still, on a
    # minimum-jerk path; some go through a detour (a point in the image, near or far off its edge).
    p0 = np.concatenate([[rng.uniform(0.1, 0.9, 2) if rng.random() < 0.65 else _outside(rng, rng.random(2))],
                         ends])
    p1 = np.concatenate([starts, [_outside(rng, ends[-1]) if rng.random() < 0.5
                                  else ends[-1] + rng.normal(0, 0.05, 2)]])
    g0, g1 = np.concatenate([[0.0], b]), np.concatenate([a, [end]])
    via, legs, move = p1.copy(), np.ones(n + 1, int), np.empty(n + 1)
    for j in range(n + 1):
        first = j == 0 or j == n
        mid = (p0[j] + p1[j]) / 2
        r = rng.random()
        if leave[j] or (not first and g1[j] - g0[j] > 0.8 and r < style.exit_p):
            via[j], legs[j] = _outside(rng, mid), 2
        elif not first and g1[j] - g0[j] > 0.8 and r < style.exit_p + 0.3:
            via[j], legs[j] = (_edge(rng, mid) if r < style.exit_p + 0.12 else rng.uniform(0.1, 0.9, 2)), 2
        dur = g1[j] - g0[j]
        move[j] = dur if legs[j] == 2 else min(dur, rng.uniform(0.5, 1.2) if first
                                               else tau[j - 1] * rng.uniform(1.0, 1.6))
    pts = np.stack([p0, via, p1], 1)  # [gaps, 3, 2]; one-leg gaps go p0 -> via (= p1)

    t = np.arange(int(end / DT) + 1) * DT + rng.uniform(-0.01, 0.01, int(end / DT) + 1)
    t[0] = 0.0
    piece = np.searchsorted(np.stack([a, b], 1).ravel(), t, side="right")  # odd: in dwell (piece-1)//2
    in_dwell = piece % 2 == 1
    pos = np.empty((len(t), 2))
    pos[in_dwell] = dwell((piece[in_dwell] - 1) // 2, t[in_dwell])
    g = piece[~in_dwell] // 2
    s0 = g1[g] - move[g]
    u = np.clip((t[~in_dwell] - s0) / np.maximum(move[g], 1e-6), 0, 1) * legs[g]
    leg = np.minimum(u.astype(int), legs[g] - 1)
    start = pts[g, leg]
    pos[~in_dwell] = start + (pts[g, leg + 1] - start) * _min_jerk(u - leg)[:, None]

    # Hand jitter: smooth tremor (moving sum of white noise) plus a little white noise.
    walk = np.cumsum(rng.standard_normal((len(t) + 6, 2)), 0)
    tremor = 0.006 / np.sqrt(6) * (walk[6:] - walk[:-6]) + 0.0025 * rng.standard_normal(pos.shape)
    pos += style.jitter * tremor
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
