"""The embedded data set's vocabulary: shape kinds (the COCO categories), colors, sizes, backdrops.

Shapes are unit polygons (box-centered, the longer side spanning [-1, 1]). Their rotation jitter is
limited so that kinds stay distinguishable (a square turned 45 degrees would be a diamond).
"""
from __future__ import annotations

import numpy as np


def _ngon(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star() -> np.ndarray:
    a = -np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _cross(w: float = 0.3) -> np.ndarray:
    p = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
         (-1, -w), (-w, -w)]
    return np.array(p, float) * 0.85


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _crescent() -> np.ndarray:
    # Outer arc of the unit circle through the left, inner arc of a circle centered at (0.55, 0)
    # through the arc's two ends: a moon that opens to the right.
    outer = np.linspace(np.pi / 3, 5 * np.pi / 3, 24)
    c, r = 0.55, np.hypot(0.5 - 0.55, np.sin(np.pi / 3))
    a0 = np.arctan2(-np.sin(np.pi / 3), 0.5 - c)  # lower end, seen from the inner center
    inner = np.linspace(a0 + 2 * np.pi, -a0, 16)  # back through the left side
    p = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                        np.stack([c + r * np.cos(inner), r * np.sin(inner)], 1)[1:-1]])
    return p


# name, unit polygon, max rotation jitter (radians; None = any), nouns used in captions
SHAPES = [
    ("circle", _ngon(36), None, ["circle", "circle", "circle", "disk"]),
    ("square", _ngon(4, np.sqrt(2) * 0.75, np.pi / 4), 0.2, ["square", "square", "square", "box"]),
    ("triangle", _ngon(3, 1.0), 0.3, ["triangle"]),
    ("diamond", np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]), 0.2,
     ["diamond", "diamond", "diamond", "rhombus"]),
    ("star", _star(), None, ["star"]),
    ("cross", _cross(), 0.2, ["cross", "cross", "cross", "plus sign"]),
    ("heart", _heart(), 0.3, ["heart"]),
    ("crescent", _crescent(), 0.5, ["crescent", "crescent", "moon"]),
]
# Every unit polygon spans exactly [-1, 1] along its longer side, so that size words mean the same
# extent for every kind.
for _s in SHAPES:
    _s[1][:] = (_s[1] - (_s[1].max(0) + _s[1].min(0)) / 2) / ((_s[1].max(0) - _s[1].min(0)).max() / 2)
CATEGORIES = [{"id": i + 1, "name": s[0], "supercategory": "shape"} for i, s in enumerate(SHAPES)]

# Saturated object colors (RGB); backgrounds and most clutter are muted so that objects read clearly.
COLORS = [
    ("red", (215, 35, 35)), ("orange", (245, 140, 20)), ("yellow", (240, 220, 40)),
    ("green", (40, 175, 60)), ("cyan", (40, 205, 220)), ("blue", (35, 70, 215)),
    ("purple", (140, 50, 190)), ("pink", (245, 120, 190)),
]

# size word -> (extent range as a fraction of the image side, words used in captions)
SIZES = [
    ("small", (0.13, 0.18), ["small", "small", "little", "tiny"]),
    ("medium", (0.21, 0.26), ["medium-sized", "medium", "mid-sized"]),
    ("large", (0.29, 0.36), ["large", "big", "big", "huge"]),
]

# Muted background bases, named with words that are not object colors.
BACKGROUNDS = [
    ("gray", (128, 128, 128)), ("brown", (115, 85, 60)), ("beige", (200, 185, 150)),
    ("olive", (110, 112, 70)), ("slate", (88, 98, 118)), ("tan", (172, 140, 102)),
    ("dark", (55, 55, 60)), ("pale", (208, 208, 200)),
]
PATTERNS = ["mottled", "striped", "checkered", "plain"]
CLUTTER = ["lines", "dots", "blobs", "scribbles"]
