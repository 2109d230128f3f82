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
index            int                   the narrative loaded (after any bad-image replacement)
===============  ====================  ========================================================

All randomness comes from :func:`loctex.data.augment.sample_decision` of ``(seed, epoch, index)``,
so samples are identical across worker counts, restarts and backends. A flip swaps left/right in the
caption and re-tokenizes (windows carried over).

Unreadable images (DESIGN §2.2). An image that is missing, cannot be read, or does not decode
strictly (:func:`loctex.data.jpeg.decode_strict`: corrupt scan data counts) is counted, logged once,
and replaced by the next narrative (:meth:`NarrativeDataset.candidates`), never a crash mid-epoch;
``index`` names the narrative actually loaded. Only image read and decode errors are replaced: any
other error (a bad ``data.image_size``, a bug) propagates with its own message. Each DataLoader
worker holds its own copy of the data set, so the count lives in shared memory with one slot per
worker (:meth:`NarrativeDataset.share_skip_counts`); ``skipped`` sums it.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from loctex.config import DataConfig
from loctex.data import align as A
from loctex.data import augment as G
from loctex.data.jpeg import BadImage, check_structure, decode_strict, jpeg_size
from loctex.data.packed import PackedNarratives
from loctex.data.tokenizer import CLS_ID, SEP_ID

log = logging.getLogger(__name__)

# Consecutive unreadable images tolerated before a sample gives up: more means a broken image root
# or storage, not damaged files.
MAX_IMAGE_TRIES = 16


class UnreadableImages(RuntimeError):
    """Every candidate of a sample had an unreadable image."""


def point_weights(point_dt: np.ndarray, cap_s: float) -> np.ndarray:
    """Each point's weight: its duration to the next point of its segment, capped (NaN -> cap);
    all ones when ``cap_s <= 0`` (weighting off)."""
    if cap_s <= 0:
        return np.ones(len(point_dt), np.float32)
    dt = np.asarray(point_dt, np.float32)
    return np.where(np.isfinite(dt), np.minimum(dt, cap_s), cap_s).astype(np.float32)


def _read_bytes(src) -> bytes:
    if hasattr(src, "read"):
        return src.read()
    with open(src, "rb") as f:
        return f.read()


def load_image(src, d: G.Decision, size: int, reduced_decode: bool = True):
    """Read ``src`` (a path or a file object), decode, crop/resize/flip: a PIL RGB image.

    JPEGs decode strictly through libjpeg-turbo (:func:`loctex.data.jpeg.decode_strict`) at the
    smallest DCT scale N/8 whose crop still has >= ``size`` pixels each way (``reduced_decode``),
    placing the crop box by that exact scale; other formats, and JPEG colour formats libjpeg-turbo's
    API cannot take (CMYK, ...), go through PIL (with ``draft``). Raises OSError (reading) or
    :class:`~loctex.data.jpeg.BadImage` (decoding) for an unreadable image; errors of the crop
    itself (say ``size`` 0) are not image errors and keep their own type."""
    img, source_size = _decode(_read_bytes(src), d, size, reduced_decode)
    return G.apply_to_image(img, d, size, source_size=source_size)


def _decode(data: bytes, d: G.Decision, size: int, reduced_decode: bool):
    """(PIL image, full-resolution (width, height)); raises BadImage."""
    import io

    from PIL import Image

    need = (max(1, math.ceil(size / max(d.w, 1e-6))), max(1, math.ceil(size / max(d.h, 1e-6))))
    if data[:2] == b"\xff\xd8":
        W, H = jpeg_size(data)
        kw = {"min_width": min(need[0], W), "min_height": min(need[1], H)} \
            if reduced_decode else {}
        arr = decode_strict(data, **kw)
        if arr is not None:
            return Image.fromarray(arr), (W, H)
        reason = check_structure(data)  # PIL decodes corrupt scans without a word
        if reason is not None:
            raise BadImage(reason)
    try:
        with Image.open(io.BytesIO(data)) as im:
            W, H = im.size
            if reduced_decode and im.format == "JPEG" and need[0] < W and need[1] < H:
                im.draft("RGB", need)  # PIL picks the largest 1/2^k reduction above the request
            im.load()
            return im.copy() if im.mode == "RGB" else im.convert("RGB"), (W, H)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"decode failed ({exc})") from None


class NarrativeDataset(torch.utils.data.Dataset):
    """Map-style data set over ``loctex prepare`` output. ``train=False``: no augmentation (the
    whole image resized to ``data.image_size``)."""

    def __init__(self, prepared, cfg: DataConfig | None = None, *, train: bool = True,
                 seed: int = 0, image_root: str | None = None):
        self.cfg = cfg or DataConfig()
        self.packed = self.open_narratives(prepared, image_root)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.augment = G.AugmentConfig.from_data_config(self.cfg)
        self.bad_images: set[str] = set()  # paths this process has warned about (once each)
        self.skip_counts = torch.zeros(1, dtype=torch.int64)  # slot 0: this process
        self._tokenizer = None

    def __len__(self) -> int:
        return len(self.packed)

    def share_skip_counts(self, num_workers: int) -> None:
        """Before the workers start: count skips in shared memory, slot ``1 + worker id`` for each
        worker (one writer per slot, so no lock), slot 0 for this process."""
        self.skip_counts = torch.zeros(num_workers + 1, dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> int:
        """Unreadable images replaced so far, over this process and its loader's workers."""
        return int(self.skip_counts.sum())

    def _count_skip(self) -> None:
        info = torch.utils.data.get_worker_info()
        slot = info.id + 1 if info is not None else 0
        self.skip_counts[slot if slot < len(self.skip_counts) else 0] += 1

    # hooks for other storage (loctex.data.shards.ShardNarrativeDataset reads tar shards)
    @staticmethod
    def open_narratives(prepared, image_root=None):
        return PackedNarratives(prepared, image_root)

    def image_file(self, index: int):
        """What ``load_image`` opens for narrative ``index``: a path (or a file object)."""
        return self.packed.image_path(self.packed.image_index(index))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from loctex.data.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.packed.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

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
        img = load_image(self.image_file(index), d,
                         self.cfg.image_size)
        x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        G.color_jitter_(x, d)
        return G.normalize_(x)

    def candidates(self, index: int) -> range:
        """The narratives tried for sample ``index``, in order: itself, then the next ones
        (wrapping around), ``MAX_IMAGE_TRIES`` in all; the first with a readable image is loaded.
        Every backend replaces bad images this way."""
        return range(index, index + MAX_IMAGE_TRIES)

    def give_up(self, index: int) -> UnreadableImages:
        root = getattr(self.packed, "image_root", None) or self.packed.dir
        return UnreadableImages(f"{MAX_IMAGE_TRIES} consecutive unreadable images from narrative "
                                f"{index}; see {root}")

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        n = len(self)
        for candidate in self.candidates(index):
            i = candidate % n
            d = self.decision(i, epoch)
            try:
                image = self.image(i, d)
            except (OSError, BadImage) as exc:
                path = str(self.packed.image_path(self.packed.image_index(i)))
                if path not in self.bad_images:
                    self.bad_images.add(path)
                    log.warning("skipping unreadable image %s (%s)", path, exc)
                self._count_skip()
                continue
            sample = self.annotations(i, d)
            sample["image"] = image
            sample["index"] = i
            return sample
        raise self.give_up(index)
