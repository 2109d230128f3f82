"""The dense probe (``loctex eval dense``): semantic segmentation by a light head on the
frozen backbone, trained on 10% / 50% / 100% of the labelled images and scored by mIoU.

* Labels: semantic masks rasterized from a COCO instances file with pycocotools (0 = background,
  1..K = the categories in id order; crowd regions are ignored), resized (nearest) to the image size.
* Head ("FPN-lite"): a 1x1 conv + BatchNorm per level on frozen layer2/3/4 (strides 8, 16, 32),
  upsampled to stride 8 and summed, a 3x3 conv, a 1x1 classifier, logits upsampled bilinearly to the
  image size. The backbone runs once: its features are cached (float16) and only the head trains.
  BatchNorm on every level makes the probe indifferent to the feature scale of each backbone.
* Every label fraction gets the same optimization budget (steps); subsets are nested and seeded.
  The training loss is taken at stride 4; predictions are scored at full resolution.
* mIoU over the classes (background included) from the pixel confusion matrix of the test images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .coco_sets import IGNORE, SegmentationSet, label_subsets
from .metrics import confusion_matrix, iou_per_class, mean_iou


class FPNLiteHead(nn.Module):
    def __init__(self, in_channels: list[int], num_classes: int, dim: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.BatchNorm2d(dim)) for c in in_channels)
        self.fuse = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1),
                                  nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, num_classes, 1))

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = sum(F.interpolate(lat(f.float()), size=size, mode="bilinear", align_corners=False)
                if f.shape[-2:] != size else lat(f.float()) for lat, f in zip(self.lateral, feats))
        return F.interpolate(self.fuse(x), size=out_size, mode="bilinear", align_corners=False)


@torch.no_grad()
def cached_features(backbone, paths: list[str], size: int, batch_size: int = 32,
                    num_workers: int = 2) -> list[torch.Tensor]:
    """Frozen layer2/3/4 of every image, float16 (the head trains on these, many times over)."""
    from .features import feature_pyramid, image_batches

    backbone = backbone.cpu().eval()
    levels: list[list[torch.Tensor]] = [[], [], []]
    for x in image_batches(paths, size, False, batch_size, num_workers):
        for i, f in enumerate(feature_pyramid(backbone, x)):
            levels[i].append(f.half())
    return [torch.cat(level) for level in levels]


def train_head(feats: list[torch.Tensor], masks: torch.Tensor, num_classes: int, steps: int,
               batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> FPNLiteHead:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = FPNLiteHead([f.shape[1] for f in feats], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    # the loss is taken at stride 4 (nearest-subsampled labels): 16x fewer logits than at full
    # resolution, finer than any feature level
    stride = 4 if min(masks.shape[-2:]) >= 32 else 1
    masks = masks[:, stride // 2::stride, stride // 2::stride]
    n = len(masks)
    head.train()
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + min(batch_size, n) > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos: pos + min(batch_size, n)]
        pos += len(idx)
        logits = head([f[idx] for f in feats], masks.shape[-2:])
        loss = F.cross_entropy(logits, masks[idx].long(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def predict_confusion(head: FPNLiteHead, feats: list[torch.Tensor], masks: torch.Tensor,
                      num_classes: int, batch_size: int = 32) -> np.ndarray:
    conf = np.zeros((num_classes, num_classes), np.int64)
    for s in range(0, len(masks), batch_size):
        logits = head([f[s: s + batch_size] for f in feats], masks.shape[-2:])
        conf += confusion_matrix(logits.argmax(1).numpy(), masks[s: s + batch_size].numpy(),
                                 num_classes, IGNORE)
    return conf


def run_dense_probe(backbone, train: SegmentationSet, test: SegmentationSet, size: int,
                    fractions=(0.1, 0.5, 1.0), steps: int = 300, batch_size: int = 16,
                    seed: int = 0, num_workers: int = 2) -> dict:
    """-> ``{"10%": {"mIoU", "per_class_iou", "images"}, ...}`` for each label fraction."""
    train_feats = cached_features(backbone, train.paths, size, num_workers=num_workers)
    test_feats = cached_features(backbone, test.paths, size, num_workers=num_workers)
    return run_dense_probe_on_features(train_feats, train, test_feats, test, fractions, steps,
                                       batch_size, seed)


def run_dense_probe_on_features(train_feats: list[torch.Tensor], train: SegmentationSet,
                                test_feats: list[torch.Tensor], test: SegmentationSet,
                                fractions=(0.1, 0.5, 1.0), steps: int = 300, batch_size: int = 16,
                                seed: int = 0) -> dict:
    """``run_dense_probe`` on features from ``cached_features``."""
    if train.class_names != test.class_names:
        raise ValueError("train and test instance files have different categories")
    K = len(train.class_names)
    train_masks, test_masks = torch.from_numpy(train.masks), torch.from_numpy(test.masks)
    results = {}
    for frac, idx in label_subsets(len(train.paths), fractions, seed).items():
        sel = torch.from_numpy(idx)
        head = train_head([f[sel] for f in train_feats], train_masks[sel], K, steps, batch_size,
                          seed=seed)
        conf = predict_confusion(head, test_feats, test_masks, K)
        iou = iou_per_class(conf)
        results[f"{round(100 * frac)}%"] = {
            "mIoU": mean_iou(conf), "images": int(len(idx)),
            "per_class_iou": {n: (None if np.isnan(v) else float(v))
                              for n, v in zip(train.class_names, iou)}}
    return results
