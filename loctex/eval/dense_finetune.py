"""End-to-end fine-tuned semantic segmentation (``loctex eval dense --protocol finetune``): the
target-data-efficiency transfer that fits a CPU. Unlike the dense probe the backbone is not frozen.

* Model: the backbone's layer2/3/4 (strides 8, 16, 32) under the dense probe's ``FPNLiteHead``,
  logits upsampled to the image size. Labels: ``SegmentationSet`` masks (0 background, 1..K,
  255 ignored), the same as the probe's.
* Everything trains: AdamW, ``lr`` for the head (3e-3, the probe's) and ``backbone_lr`` (10x
  lower, the usual fine-tuning ratio) for the backbone, cosine decay over ``steps``, random
  horizontal flips.
  The backbone's BatchNorm uses batch statistics while training (its running statistics adapt to
  the target images, which a random backbone needs as much as a pre-trained one).
* A label fraction is a seeded subset of the training images (``label_subsets``: nested across
  fractions for one seed); every fraction gets the same number of steps.
* Deterministic for a seed on CPU: the head's initialization, the batches and the flips all come
  from ``seed``; the caller's backbone is copied, never changed.
* Scored by mIoU (background included) on the val images, from the pixel confusion matrix.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .coco_sets import IGNORE, SegmentationSet, label_subsets
from .dense_probe import FPNLiteHead
from .features import feature_pyramid, load_images
from .metrics import confusion_matrix, iou_per_class, mean_iou


class SegmentationNet(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        c = backbone.out_channels  # layer4's; each stage below has half the channels
        self.head = FPNLiteHead([c // 4, c // 2, c], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(feature_pyramid(self.backbone, x), x.shape[-2:])


@torch.no_grad()
def segmentation_confusion(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                           num_classes: int, batch_size: int = 16,
                           device: str | torch.device = "cpu") -> np.ndarray:
    model.eval()
    conf = np.zeros((num_classes, num_classes), np.int64)
    for s in range(0, len(images), batch_size):
        pred = model(images[s: s + batch_size].to(device)).argmax(1).cpu().numpy()
        conf += confusion_matrix(pred, masks[s: s + batch_size].numpy(), num_classes, IGNORE)
    return conf


def finetune_segmentation(backbone: nn.Module, train: SegmentationSet, val: SegmentationSet,
                          label_fraction: float = 1.0, steps: int = 100, seed: int = 0,
                          batch_size: int = 8, lr: float = 3e-3, backbone_lr: float = 3e-4,
                          device: str | torch.device = "cpu") -> dict:
    """Fine-tune ``backbone`` (a copy) and a segmentation head on ``label_fraction`` of ``train``;
    -> ``{"mIoU", "per_class_iou", "images", "steps", "seconds"}`` on ``val``. Images are read at
    the masks' size."""
    if train.class_names != val.class_names:
        raise ValueError("train and val instance files have different categories")
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    t0 = time.perf_counter()
    size, K = train.masks.shape[-1], len(train.class_names)
    idx = label_subsets(len(train.paths), [label_fraction], seed)[label_fraction]
    images = load_images([train.paths[i] for i in idx], size)
    masks = torch.from_numpy(train.masks[idx]).long()

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SegmentationNet(copy.deepcopy(backbone).float(), K).to(device)
    opt = torch.optim.AdamW([{"params": model.head.parameters(), "lr": lr},
                             {"params": model.backbone.parameters(), "lr": backbone_lr}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    n, b = len(idx), min(batch_size, len(idx))
    order, pos = torch.randperm(n, generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + b > n:
            order, pos = torch.randperm(n, generator=g), 0
        sel = order[pos: pos + b]
        pos += b
        x, y = images[sel], masks[sel]
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        loss = F.cross_entropy(model(x.to(device)), y.to(device), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    conf = segmentation_confusion(model, load_images(val.paths, size),
                                  torch.from_numpy(val.masks), K, device=device)
    iou = iou_per_class(conf)
    return {"mIoU": mean_iou(conf), "images": int(n), "steps": steps,
            "per_class_iou": {c: (None if np.isnan(v) else float(v))
                              for c, v in zip(train.class_names, iou)},
            "seconds": time.perf_counter() - t0}
