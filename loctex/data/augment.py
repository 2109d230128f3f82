"""The sample source's randomness and the geometry it implies, and the image normalization.

All randomness of a training sample is one pure function, :func:`sample_decision`, of
``(seed, epoch, index)`` and the image's aspect ratio: a random resized crop box in normalized
coordinates of the source image, a horizontal flip, and color-jitter factors. Nothing depends on
worker ids, call order or the image library, so a resumed run, any number of DataLoader workers, and
another backend (the DALI pipeline consumes the same :class:`Decision`) all see identical decisions.

Geometry. A crop box ``(x0, y0, w, h)`` (fractions of the source width/height) is resized to the
output square, so a point at normalized source position ``(x, y)`` lands at
``((x - x0) / w, (y - y0) / h)`` in the output, and a horizontal flip maps ``x`` to ``1 - x``.
:func:`apply_to_image` (PIL) crops with sub-pixel accuracy through ``Image.resize(box=...)``, so the
pixels move exactly like the points; points outside the crop keep their (out of [0, 1]) coordinates.
A flip also swaps the words "left" and "right" in the caption (:func:`swap_left_right`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from loctex.config import DataConfig

# The normalization every backbone input gets (training, validation, evaluation, both backends):
# the statistics torchvision's ImageNet weights expect, so transferred backbones see familiar inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation of :func:`sample_decision`. The tunable parts come from ``DataConfig``
    (``data.crop_scale_min``, ``data.flip_prob``, ``data.color_jitter``; their defaults live
    there); the crop's upper area and aspect-ratio range are torchvision's fixed ones."""
    crop_scale_min: float             # random resized crop: smallest area fraction kept
    flip_prob: float
    color_jitter: float               # brightness/contrast/saturation factors in [1-j, 1+j]
    crop_scale_max: float = 1.0
    crop_ratio: tuple = (3 / 4, 4 / 3)  # output-pixel aspect ratio range of the crop

    @classmethod
    def from_data_config(cls, data: DataConfig | None = None) -> "AugmentConfig":
        data = DataConfig() if data is None else data
        return cls(crop_scale_min=data.crop_scale_min, flip_prob=data.flip_prob,
                   color_jitter=data.color_jitter)


@dataclass(frozen=True)
class Decision:
    """Everything random about one sample. Plain floats/bools; no image library involved."""
    x0: float = 0.0
    y0: float = 0.0
    w: float = 1.0
    h: float = 1.0
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @property
    def crop(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.w, self.h


IDENTITY = Decision()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a counter-based Philox keyed by (seed, epoch, index)."""
    return np.random.Generator(np.random.Philox(key=[(seed & 0xFFFFFFFFFFFFFFFF),
                                                     ((epoch & 0xFFFFFFFF) << 32)
                                                     | (index & 0xFFFFFFFF)]))


def sample_decision(seed: int, epoch: int, index: int, image_wh: tuple[int, int],
                    cfg: AugmentConfig | None = None, train: bool = True) -> Decision:
    """The decision for sample ``index`` in ``epoch``; ``train=False`` gives the identity (the
    whole image, resized). ``image_wh`` is the source size (from the prepared image table);
    ``cfg`` defaults to the ``DataConfig`` defaults."""
    if not train:
        return IDENTITY
    if cfg is None:
        cfg = AugmentConfig.from_data_config()
    rng = sample_rng(seed, epoch, index)
    u = rng.random(16)
    W, H = max(1, image_wh[0]), max(1, image_wh[1])
    lo, hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    box = None
    for k in range(5):  # torchvision's RandomResizedCrop, in fractions of the source
        area = cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min) * u[2 * k]
        ratio = math.exp(lo + (hi - lo) * u[2 * k + 1])       # crop width/height in pixels
        w = math.sqrt(area * ratio * H / W)
        h = math.sqrt(area / ratio * W / H)
        if w <= 1.0 and h <= 1.0:
            box = (w, h)
            break
    if box is None:  # fall back to the largest centered crop with a ratio in range
        r = min(max(W / H, cfg.crop_ratio[0]), cfg.crop_ratio[1])
        box = (min(1.0, r * H / W), min(1.0, W / (r * H)))
    w, h = box
    x0 = (1.0 - w) * u[10]
    y0 = (1.0 - h) * u[11]
    flip = bool(u[12] < cfg.flip_prob)
    j = cfg.color_jitter
    b, c, s = (1.0 - j + 2 * j * u[13], 1.0 - j + 2 * j * u[14], 1.0 - j + 2 * j * u[15])
    return Decision(float(x0), float(y0), float(w), float(h), flip, float(b), float(c), float(s))


# ------------------------------------------------------------------------------------------------
# Points and words
# ------------------------------------------------------------------------------------------------
def apply_to_points(xy: np.ndarray, d: Decision) -> np.ndarray:
    """Normalized source coordinates [P,2] -> normalized output coordinates (crop, flip)."""
    out = np.empty((len(xy), 2), np.float32)
    out[:, 0] = (xy[:, 0] - d.x0) / d.w
    out[:, 1] = (xy[:, 1] - d.y0) / d.h
    if d.flip:
        out[:, 0] = 1.0 - out[:, 0]
    return out


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def _same_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word.capitalize()
    return word


def swap_left_right(caption: str) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Swap whole words "left" <-> "right" (any case; "top-left" too). Returns the new caption and
    the replaced spans ``(old_start, old_end, new_start, new_end)``; word order is unchanged."""
    spans = []
    parts = []
    last = 0
    shift = 0
    for m in _LEFT_RIGHT.finditer(caption):
        word = m.group(0)
        new = _same_case(_SWAP[word.lower()], word)
        parts.append(caption[last:m.start()])
        parts.append(new)
        spans.append((m.start(), m.end(), m.start() + shift, m.start() + shift + len(new)))
        shift += len(new) - len(word)
        last = m.end()
    if not spans:
        return caption, []
    parts.append(caption[last:])
    return "".join(parts), spans


def flip_caption_tokens(caption: str, token_chars: np.ndarray, token_windows: np.ndarray,
                        tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Swap left/right in ``caption``, re-tokenize, and carry each token's time window over: a new
    token takes the window of the old token at the same place (characters outside the swapped words
    map one-to-one; a swapped word maps to the word it replaced). Returns (ids int32, chars int32
    [T,2], windows float32 [T,2]) of the new caption, or None when there is nothing to swap."""
    new_caption, spans = swap_left_right(caption)
    if not spans:
        return None
    enc = tokenizer.encode(new_caption, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    chars = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    # new character -> old character
    shift_starts = np.array([s[2] for s in spans])
    shifts = np.cumsum([0] + [(s[1] - s[0]) - (s[3] - s[2]) for s in spans])
    k = np.searchsorted(shift_starts, chars[:, 0], side="right")  # swaps at or before the token
    old_at = chars[:, 0] + shifts[k]
    inside = (k > 0)
    if inside.any():
        sp = np.array(spans)
        prev = sp[np.maximum(k - 1, 0)]
        within = inside & (chars[:, 0] < prev[:, 3])
        old_at[within] = prev[within, 0]  # a token of a swapped word: the replaced word's start
    old_chars = np.asarray(token_chars, np.int64)
    owner = np.searchsorted(old_chars[:, 0], old_at, side="right") - 1
    windows = np.full((len(ids), 2), np.nan, np.float32)
    ok = (owner >= 0) & (old_at < old_chars[np.maximum(owner, 0), 1])
    windows[ok] = np.asarray(token_windows, np.float32)[owner[ok]]
    return ids, chars.astype(np.int32), windows


# ------------------------------------------------------------------------------------------------
# Images (PIL / torch; the DALI backend does the same on the GPU)
# ------------------------------------------------------------------------------------------------
def crop_box_pixels(d: Decision, width: int, height: int) -> tuple[float, float, float, float]:
    """The crop as a PIL ``box`` (left, upper, right, lower) in continuous pixel coordinates."""
    return (d.x0 * width, d.y0 * height, (d.x0 + d.w) * width, (d.y0 + d.h) * height)


def decoded_scale(decoded: int, source: int) -> float:
    """The scale of a DCT-domain reduced JPEG decode (libjpeg scales by N/8): a decode of width
    ``ceil(source * N / 8)`` maps source pixel coordinate ``u`` to ``u * N / 8`` exactly."""
    if decoded >= source:
        return 1.0
    n = max(1, min(8, round(8 * decoded / source)))
    return n / 8


def apply_to_image(img, d: Decision, size: int, source_size: tuple[int, int] | None = None):
    """PIL image -> PIL RGB ``size`` x ``size``: sub-pixel crop + resize (bilinear), then flip.
    ``source_size``: the full-resolution (width, height) when ``img`` is a reduced-size decode, so
    the box is placed by the exact decode scale. Color jitter is applied on the tensor
    (:func:`color_jitter_`), after this."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    if source_size is None or tuple(source_size) == img.size:
        box = crop_box_pixels(d, *img.size)
    else:
        sx = decoded_scale(img.size[0], source_size[0])
        sy = decoded_scale(img.size[1], source_size[1])
        box = crop_box_pixels(d, source_size[0] * sx, source_size[1] * sy)
        box = (box[0], box[1], min(box[2], img.size[0]), min(box[3], img.size[1]))
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if d.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def color_jitter_(x, d: Decision):
    """In place on a float tensor [3,H,W] in [0,1]: brightness, contrast, saturation (fixed
    order, torchvision's formulas), clamped to [0, 1]."""
    if d.brightness != 1.0:
        x.mul_(d.brightness).clamp_(0, 1)
    if d.contrast != 1.0:
        gray_mean = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
        x.mul_(d.contrast).add_((1 - d.contrast) * gray_mean).clamp_(0, 1)
    if d.saturation != 1.0:
        gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        x.mul_(d.saturation).add_((1 - d.saturation) * gray[None]).clamp_(0, 1)
    return x


def normalize_(x):
    """In place: ImageNet mean/std."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(mean).div_(std)
