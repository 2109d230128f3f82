"""Scenes: a textured background, clutter the caption does not name, and 1-4 described objects.

Objects are filled through the very mask pycocotools rasterizes from the polygon stored in the COCO
file, so an object's pixels and its ground-truth mask agree exactly. Objects never overlap each
other (no occlusion to account for); clutter lies under them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from loctex.synth.vocab import BACKGROUNDS, CLUTTER, COLORS, PATTERNS, SHAPES, SIZES

NUM_OBJECTS_CDF = np.cumsum([0.25, 0.3, 0.25, 0.2])  # P(1), P(2), P(3), P(4) described objects


@dataclass
class SceneObject:
    shape: int          # index into SHAPES (category id - 1)
    color: int          # index into COLORS
    size: int           # index into SIZES
    polygon: list       # flat [x0, y0, x1, y1, ...] in pixels (COCO segmentation polygon)
    bbox: list          # COCO [x, y, w, h] in pixels, the mask's tight box
    area: int
    center: tuple       # (x, y) of the box center, normalized

    @property
    def box_xyxy(self):  # pixels
        return self.bbox[0], self.bbox[1], self.bbox[0] + self.bbox[2], self.bbox[1] + self.bbox[3]


@dataclass
class Scene:
    image: np.ndarray   # uint8 [S, S, 3]
    objects: list       # SceneObject, in placement order
    background: int     # index into BACKGROUNDS
    pattern: str
    clutter: list       # kinds of clutter present (words from CLUTTER)


@lru_cache(maxsize=4)
def _grid(size: int):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # xx, yy in (0, 1)


@lru_cache(maxsize=32)
def _interp(size: int, cells: int) -> np.ndarray:
    """[size, cells] weights that spread a coarse grid smoothly over ``size`` pixels (Gaussian)."""
    x = (np.arange(size) + 0.5) / size
    g = (np.arange(cells) + 0.5) / cells
    w = np.exp(-0.5 * ((x[:, None] - g[None, :]) * cells / 0.6) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng, size: int, cells: int, spread: float, channels: int) -> np.ndarray:
    """Smooth random field [channels, size, size]: a cells x cells grid interpolated (separable)."""
    u = _interp(size, cells)
    grid = rng.normal(0, spread, (channels, cells, cells)).astype(np.float32)
    return u @ grid @ u.T


def _background(rng, size: int):
    """A textured background as a PIL image (computed channels-first: contiguous, fast)."""
    bg = int(rng.integers(len(BACKGROUNDS)))
    base = np.array(BACKGROUNDS[bg][1], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    xx, yy = _grid(size)
    theta = rng.uniform(0, np.pi) if pattern != "checkered" else rng.uniform(-0.25, 0.25)
    u = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
    cells, spread = int(rng.integers(3, 7)), rng.uniform(8, 22)
    img = base[:, None, None] + _smooth_noise(rng, size, cells, spread, 1) \
        + _smooth_noise(rng, size, cells, spread * 0.35, 3)
    if pattern == "mottled":
        img += _smooth_noise(rng, size, int(rng.integers(8, 17)), rng.uniform(14, 30), 1)
    elif pattern == "striped":
        v = np.sin(np.float32(2 * np.pi * rng.uniform(3, 10)) * u + np.float32(rng.uniform(0, 2 * np.pi)))
        img += (np.float32(rng.uniform(15, 40)) * v) * rng.uniform(0.6, 1.0, (3, 1, 1)).astype(np.float32)
    elif pattern == "checkered":  # near axis-aligned: turned 45 degrees, cells would look like diamonds
        f = np.float32(2 * np.pi * rng.uniform(2, 6))
        w = yy * np.float32(np.cos(theta)) - xx * np.float32(np.sin(theta))
        v = np.sign(np.sin(f * u + np.float32(0.3)) * np.sin(f * w + np.float32(0.7)))
        img += np.float32(rng.uniform(15, 35)) * v
    else:  # plain: a gentle gradient
        img += np.float32(rng.uniform(-40, 40)) * (u - np.float32(0.5))
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    return Image.fromarray(img), bg, pattern


@lru_cache(maxsize=2)
def _noise_bank(n: int) -> np.ndarray:
    """Sensor noise at three strengths, drawn once (fixed seed): images take random windows of it."""
    g = np.random.default_rng(20210823).standard_normal(n)
    return np.stack([np.round(g * s) for s in (2.5, 4.5, 6.5)]).astype(np.int16)


def _clutter(rng, draw: ImageDraw.ImageDraw, size: int, bg_rgb) -> list:
    """Lines, dots, blobs and scribbles that no caption names; returns the kinds drawn."""
    kinds = sorted(set(int(k) for k in rng.integers(len(CLUTTER), size=int(rng.integers(1, 4)))))
    s = size / 128.0
    for _ in range(int(rng.integers(3, 11))):
        kind = kinds[int(rng.integers(len(kinds)))]
        if rng.random() < 0.6:  # muted, near the background
            rgb = np.asarray(bg_rgb) + rng.uniform(-70, 70, 3)
        else:                   # saturated: clutter that shares the objects' colors
            rgb = np.asarray(COLORS[int(rng.integers(len(COLORS)))][1]) + rng.uniform(-25, 25, 3)
        fill = tuple(int(c) for c in np.clip(rgb, 0, 255))
        x, y = rng.uniform(0, size, 2)
        if CLUTTER[kind] == "lines":
            a, n = rng.uniform(0, np.pi), rng.uniform(10, 45) * s
            draw.line([(x, y), (x + n * np.cos(a), y + n * np.sin(a))], fill=fill,
                      width=int(rng.integers(1, 3) * max(1, round(s))))
        elif CLUTTER[kind] == "dots":
            for _ in range(int(rng.integers(1, 5))):
                r = rng.uniform(0.8, 2.2) * s
                cx, cy = x + rng.normal(0, 8 * s), y + rng.normal(0, 8 * s)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif CLUTTER[kind] == "blobs":  # smooth amoeba outlines, unlike any category's corners
            a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            p1, p2 = rng.uniform(0, 2 * np.pi, 2)
            r = rng.uniform(2.5, 7) * s * (1 + 0.3 * np.sin(2 * a + p1) + 0.2 * np.sin(3 * a + p2))
            draw.polygon(list(zip(x + r * np.cos(a), y + r * np.sin(a))), fill=fill)
        else:  # scribbles: a short random walk
            pts = np.cumsum(rng.normal(0, 5 * s, (int(rng.integers(4, 8)), 2)), 0) + (x, y)
            draw.line([tuple(p) for p in pts], fill=fill, width=1)
    return [CLUTTER[k] for k in kinds]


def _place(rng, size: int, placed: list):
    """A transformed polygon for a new object that overlaps nothing placed, or None."""
    shape, color = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLORS)))
    size_idx = int(rng.integers(len(SIZES)))
    unit, max_rot = SHAPES[shape][1], SHAPES[shape][2]
    rot = rng.uniform(-np.pi, np.pi) if max_rot is None else rng.uniform(-max_rot, max_rot)
    if SHAPES[shape][0] == "crescent" and rng.random() < 0.5:  # crescents open either way
        unit = unit * [-1, 1]
    aspect = rng.uniform(0.9, 1.1)
    c, s = np.cos(rot), np.sin(rot)
    base = (unit * [aspect, 1 / aspect]) @ np.array([[c, s], [-s, c]])
    while size_idx >= 0:
        lo, hi = SIZES[size_idx][1]
        poly = base * (rng.uniform(lo, hi) * size / 2)
        radius = np.hypot(poly[:, 0], poly[:, 1]).max()
        mn, mx = poly.min(0), poly.max(0)
        centers = rng.uniform(-mn + 2, size - mx - 2, (25, 2))  # 25 tries at once
        ok = np.ones(25, bool)
        for c2, r2 in placed:
            ok &= np.hypot(*(centers - c2).T) > radius + r2 + 2
        if ok.any():
            center = centers[int(np.argmax(ok))]
            placed.append((center, radius))
            return shape, color, size_idx, poly + center
        size_idx -= 1
    return None


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    canvas, bg, pattern = _background(rng, size)
    clutter = _clutter(rng, ImageDraw.Draw(canvas), size, BACKGROUNDS[bg][1])
    img = np.array(canvas)
    xx, yy = _grid(size)

    objects, placed = [], []
    for _ in range(1 + int(np.searchsorted(NUM_OBJECTS_CDF, rng.random() * NUM_OBJECTS_CDF[-1], "right"))):
        got = _place(rng, size, placed)
        if got is None:
            continue
        shape, color, size_idx, poly = got
        flat = np.round(poly, 1).ravel().tolist()
        rle = mask_utils.frPyObjects([flat], size, size)[0]
        with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle).astype(bool)
        if not m.any():
            placed.pop()
            continue
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        x0, y0, w, h = (int(v) for v in bbox)
        m = m[y0:y0 + h, x0:x0 + w]  # work on the object's box only
        rgb = np.asarray(COLORS[color][1], np.float32) + rng.uniform(-18, 18, 3).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        cx, cy = (bbox[0] + bbox[2] / 2) / size, (bbox[1] + bbox[3] / 2) / size
        half = max(bbox[2], bbox[3]) / size / 2
        g = rng.uniform(-0.25, 0.25) / half
        shade = 1 + g * ((xx[0, x0:x0 + w] - cx) * np.cos(a) + (yy[y0:y0 + h, :1] - cy) * np.sin(a))
        fill = np.clip(shade[..., None] * rgb, 0, 255).astype(np.uint8)
        region = img[y0:y0 + h, x0:x0 + w]
        region[m] = fill[m]
        if rng.random() < 0.35:  # a darker outline
            p = np.pad(m, 1)
            inner = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
            region[m & ~inner] = (rgb * 0.55).astype(np.uint8)
        objects.append(SceneObject(shape, color, size_idx, flat, bbox, int(mask_utils.area(rle)),
                                   (cx, cy)))
    bank = _noise_bank(max(1 << 18, 2 * img.size))
    off = int(rng.integers(bank.shape[1] - img.size))
    noisy = img.astype(np.int16) + bank[int(rng.integers(3)), off:off + img.size].reshape(img.shape)
    return Scene(np.clip(noisy, 0, 255).astype(np.uint8), objects, bg, pattern, clutter)
