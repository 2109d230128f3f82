"""A tiny in-test generator of batches in the DESIGN §2.4 contract, for the model tests.

Each image holds a few colored squares/disks on a noisy gray background; its caption is
"[CLS] a <color> <shape> and a <color> <shape> ..." and the "mouse trace" of each object is a few
points scattered around the object's center, recorded while its color and shape words were spoken.
Captions identify their image (contrastive signal) and every color/shape token has a trace (the
localization signal); "a" and "and" have no window, so they are not targets.
"""
from __future__ import annotations

import torch

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0),
          "yellow": (1.0, 0.9, 0.1), "white": (1.0, 1.0, 1.0), "purple": (0.6, 0.1, 0.8)}
SHAPES = ("square", "disk")
VOCAB = ["[PAD]", "[CLS]", "a", "and", *COLORS, *SHAPES]
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def make_batch(batch_size: int, image_size: int, generator: torch.Generator, objects: int = 2,
               points_per_object: int = 6) -> dict:
    S = image_size
    yy, xx = torch.meshgrid((torch.arange(S) + 0.5) / S, (torch.arange(S) + 0.5) / S, indexing="ij")
    images = 0.5 + 0.05 * torch.randn(batch_size, 3, S, S, generator=generator)
    L = 1 + 4 * objects - 1
    tokens = torch.zeros(batch_size, L, dtype=torch.long)
    token_ranges = torch.zeros(batch_size, L, 2, dtype=torch.int32)
    points, weights = [], []
    n_points = 0
    colors = list(COLORS)
    for b in range(batch_size):
        words = ["[CLS]"]
        color_ids = torch.cat([torch.randperm(len(colors), generator=generator)
                               for _ in range(-(-objects // len(colors)))])[:objects]
        for j in range(objects):
            color, shape = colors[int(color_ids[j])], SHAPES[int(torch.randint(2, (1,), generator=generator))]
            cx, cy = (0.15 + 0.7 * torch.rand(2, generator=generator)).tolist()
            half = 0.12
            if shape == "square":
                inside = ((xx - cx).abs() < half) & ((yy - cy).abs() < half)
            else:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 < half ** 2
            images[b, :, inside] = torch.tensor(COLORS[color])[:, None]
            pts = torch.tensor([cx, cy]) + 0.04 * torch.randn(points_per_object, 2, generator=generator)
            points.append(pts)
            weights.append(torch.full((points_per_object,), 0.1))
            first = len(words) + (1 if j > 0 else 0)  # index of this object's "a"
            words += (["and"] if j > 0 else []) + ["a", color, shape]
            for t in (first + 1, first + 2):          # color and shape tokens share the trace
                token_ranges[b, t] = torch.tensor([n_points, n_points + points_per_object])
            n_points += points_per_object
        tokens[b] = torch.tensor([WORD_ID[w] for w in words])
    loc_mask = token_ranges[..., 1] > token_ranges[..., 0]
    return {
        "images": (images - 0.5) / 0.25,
        "tokens": tokens,
        "attention_mask": torch.ones(batch_size, L, dtype=torch.bool),
        "points_xy": torch.cat(points).float(),
        "point_weights": torch.cat(weights).float(),
        "token_ranges": token_ranges,
        "loc_mask": loc_mask,
    }
