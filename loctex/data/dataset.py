"""``NarrativeDataset``: one training sample per narrative of a prepared directory (DESIGN §2.4).

``dataset[i]`` or ``dataset[(i, epoch)]`` returns a dict:

===============  ====================  ========================================================
key              dtype, shape          meaning
===============  ====================  ========================================================
image            float32 [3,S,S]       augmented crop, ImageNet-normalized
tokens           int64 [L]             ``[CLS] caption [SEP]``, L <= ``data.max_tokens``
points_xy        float32 [P,2]         trace points in the crop's coordinates (0..1 inside)
point_weights    float32 [P]           time to the next point of the segment, capped at
                                       ``data.point_weight_cap_s`` (a one-point segment gets the
                                       cap); all 1 when the cap is <= 0
token_ranges     int32 [L,2]           ``[start, end)`` into this sample's points (time-sorted)
                                       of each token's padded, lag-shifted window
loc_mask         bool [L]              the token has a window and at least one point
index            int                   the narrative
===============  ====================  ========================================================

All randomness comes from :func:`loctex.data.augment.sample_decision` of ``(seed, epoch, index)``,
so samples are identical across worker counts, restarts and backends. A flip swaps left/right in the
caption and re-tokenizes (windows carried over). An image that is missing or fails to decode is
counted in ``bad_images``, logged once, and replaced by the next narrative (deterministically),
never a crash mid-epoch.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import torch

from loctex.config import DataConfig
from loctex.data import align as A
from loctex.data import augment as G
from loctex.data.packed import PackedNarratives
from loctex.data.tokenizer import CLS_ID, SEP_ID

log = logging.getLogger(__name__)


def point_weights(point_dt: np.ndarray, cap_s: float) -> np.ndarray:
    """Each point's weight: its duration to the next point of its segment, capped (NaN -> cap);
    all ones when ``cap_s <= 0`` (weighting off)."""
    if cap_s <= 0:
        return np.ones(len(point_dt), np.float32)
    dt = np.asarray(point_dt, np.float32)
    return np.where(np.isfinite(dt), np.minimum(dt, cap_s), cap_s).astype(np.float32)


def load_image(path, d: G.Decision, size: int, reduced_decode: bool = True):
    """Open, decode (a reduced-size JPEG decode when the crop allows), crop/resize/flip: PIL RGB."""
    from PIL import Image

    with Image.open(path) as im:
        if reduced_decode and im.format == "JPEG":
            W, H = im.size
            # the smallest decode whose crop still has >= size pixels each way (libjpeg scales
            # by 1/2, 1/4, 1/8 and picks the largest reduction that stays above the request)
            need = (max(1, math.ceil(size / max(d.w, 1e-6))), max(1, math.ceil(size / max(d.h, 1e-6))))
            if need[0] < W and need[1] < H:
                im.draft("RGB", need)
        im.load()
        return G.apply_to_image(im, d, size)


class NarrativeDataset(torch.utils.data.Dataset):
    """Map-style data set over ``loctex prepare`` output. ``train=False``: no augmentation (the
    whole image resized to ``data.image_size``)."""

    def __init__(self, prepared, cfg: DataConfig | None = None, *, train: bool = True,
                 seed: int = 0, image_root: str | None = None):
        self.cfg = cfg or DataConfig()
        self.packed = PackedNarratives(prepared, image_root)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.augment = G.AugmentConfig.from_data_config(self.cfg)
        self.bad_images: Counter = Counter()
        self._tokenizer = None

    def __len__(self) -> int:
        return len(self.packed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from loctex.data.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.packed.tokenizer_path)
        return self._tokenizer

    def decision(self, index: int, epoch: int | None = None) -> G.Decision:
        img = self.packed.image_index(index)
        return G.sample_decision(self.seed, self.epoch if epoch is None else epoch, index,
                                 self.packed.image_size(img), self.augment, self.train)

    # -- the parts of a sample, usable on their own (the DALI backend needs all but the image) --
    def annotations(self, index: int, d: G.Decision) -> dict:
        """Tokens, points, weights, ranges and loc_mask of narrative ``index`` under decision
        ``d`` (numpy arrays; see the module doc)."""
        cfg = self.cfg
        ids, chars, windows = self.packed.tokens(index)
        if d.flip:
            flipped = G.flip_caption_tokens(self.packed.caption(index), chars, windows,
                                            self.tokenizer)
            if flipped is not None:
                ids, chars, windows = flipped
        keep = max(0, cfg.max_tokens - 2)
        ids, windows = ids[:keep], windows[:keep]
        L = len(ids) + 2
        tokens = np.empty(L, np.int64)
        tokens[0], tokens[1:-1], tokens[-1] = CLS_ID, ids, SEP_ID
        win = np.full((L, 2), np.nan, np.float32)
        win[1:-1] = A.apply_window(windows, cfg.window_pad_s, cfg.lag_s) if len(ids) else windows
        xy, t, _seg, dt = self.packed.points(index)
        ranges = A.point_ranges(win, t)
        loc_mask = np.isfinite(win[:, 0]) & (ranges[:, 1] > ranges[:, 0])
        return {"tokens": tokens, "points_xy": G.apply_to_points(xy, d),
                "point_weights": point_weights(dt, cfg.point_weight_cap_s),
                "token_ranges": ranges, "loc_mask": loc_mask}

    def image(self, index: int, d: G.Decision) -> torch.Tensor:
        """The augmented, normalized image tensor float32 [3,S,S]; raises on a bad image."""
        img = load_image(self.packed.image_path(self.packed.image_index(index)), d,
                         self.cfg.image_size)
        x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        G.color_jitter_(x, d)
        return G.normalize_(x)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        for attempt in range(16):
            i = (index + attempt) % len(self)
            d = self.decision(i, epoch)
            try:
                image = self.image(i, d)
            except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, not fatal
                path = str(self.packed.image_path(self.packed.image_index(i)))
                if path not in self.bad_images:
                    log.warning("skipping unreadable image %s (%s)", path, exc)
                self.bad_images[path] += 1
                continue
            sample = self.annotations(i, d)
            sample["image"] = image
            sample["index"] = i
            return sample
        raise RuntimeError(f"16 consecutive unreadable images from narrative {index}; "
                           f"see {self.packed.image_root}")
