"""``collate_batch``: samples of :class:`~loctex.data.dataset.NarrativeDataset` -> the DESIGN §2.4
batch, exactly:

=================  ====================  ====================================================
images             float32 [B,3,S,S]     augmented, normalized
tokens             int64 [B,L]           padded with [PAD]=0 to the longest caption of the batch
attention_mask     bool [B,L]            real tokens
points_xy          float32 [P,2]         all points of the batch, concatenated in sample order
point_weights      float32 [P]
token_ranges       int32 [B,L,2]         ``[start, end)`` into ``points_xy`` (batch-global);
                                         padding rows are [0, 0]
loc_mask           bool [B,L]            token has a window and at least one point
index              int64 [B]             the narrative each row holds: its index in the data set
                                         the loader reads, the one actually loaded after any
                                         bad-image replacement (retrieval positives and
                                         localization targets come from it)
=================  ====================  ====================================================
"""
from __future__ import annotations

import numpy as np
import torch

BATCH_KEYS = ("images", "tokens", "attention_mask", "points_xy", "point_weights", "token_ranges",
              "loc_mask", "index")


def collate_batch(samples: list[dict]) -> dict[str, torch.Tensor]:
    B = len(samples)
    lengths = [len(s["tokens"]) for s in samples]
    L = max(lengths) if lengths else 0
    tokens = np.zeros((B, L), np.int64)
    mask = np.zeros((B, L), bool)
    ranges = np.zeros((B, L, 2), np.int32)
    loc = np.zeros((B, L), bool)
    offset = 0
    for b, s in enumerate(samples):
        n = lengths[b]
        tokens[b, :n] = s["tokens"]
        mask[b, :n] = True
        ranges[b, :n] = np.asarray(s["token_ranges"], np.int32) + offset
        loc[b, :n] = s["loc_mask"]
        offset += len(s["points_xy"])
    if offset >= 2**31:
        raise ValueError("more than 2**31 points in one batch")
    xy = [np.asarray(s["points_xy"], np.float32).reshape(-1, 2) for s in samples]
    w = [np.asarray(s["point_weights"], np.float32).reshape(-1) for s in samples]
    images = [s["image"] if torch.is_tensor(s["image"]) else torch.as_tensor(s["image"])
              for s in samples]
    return {
        "images": torch.stack(images) if images else torch.zeros(0, 3, 1, 1),
        "tokens": torch.from_numpy(tokens),
        "attention_mask": torch.from_numpy(mask),
        "points_xy": torch.from_numpy(np.concatenate(xy) if xy else np.zeros((0, 2), np.float32)),
        "point_weights": torch.from_numpy(np.concatenate(w) if w else np.zeros(0, np.float32)),
        "token_ranges": torch.from_numpy(ranges),
        "loc_mask": torch.from_numpy(loc),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
    }
