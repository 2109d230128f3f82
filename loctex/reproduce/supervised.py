"""The supervised baseline (the stand-in for ImageNet-supervised pre-training): the same ResNet,
trained to say which categories of the embedded set each image holds (multi-label, binary cross
entropy on a linear classifier over layer4's global average pool), from the same initialization
seed, on the same batches in the same order with the same augmentation (the engine's loader with
the LocTex run's config), with the same optimizer settings and step budget as the engine's runs.
The categories come from the COCO instances file of the training images; nothing else of the
captions or traces is used."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .optim import train_steps


def narrative_labels(prepared: str | Path, instances_json: str | Path) -> tuple[torch.Tensor, list[str]]:
    """float [narratives, K]: 1 where the narrative's image holds category k (crowd included)."""
    from loctex.data.packed import PackedNarratives
    from loctex.eval.coco_sets import read_coco

    coco = read_coco(instances_json)
    cat_ids = sorted(coco.getCatIds())
    col = {c: k for k, c in enumerate(cat_ids)}
    per_image: dict[str, np.ndarray] = {}
    for img in coco.dataset["images"]:
        row = np.zeros(len(cat_ids), np.float32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            row[col[ann["category_id"]]] = 1.0
        per_image[int(img["id"])] = row
    packed = PackedNarratives(prepared)
    # the LN image_id of a COCO image is its integer id
    rows = [per_image[int(packed.image_id(packed.image_index(i)))] for i in range(len(packed))]
    return torch.from_numpy(np.stack(rows)), [coco.loadCats(c)[0]["name"] for c in cat_ids]


def pooled_layer4(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    x = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))
    return x.mean((2, 3))


def train_supervised(cfg, instances_json: str | Path, out: str | Path, device: str = "cpu") -> dict:
    """Train for ``cfg.train.max_steps`` steps and save the backbone's torchvision-keyed state dict
    to ``out`` (written atomically; ``loctex.eval.backbone.load_backbone`` reads it)."""
    from loctex.data.loader import build_loader
    from loctex.models.resnet import build_resnet

    t0 = time.perf_counter()
    labels, classes = narrative_labels(cfg.data.prepared, instances_json)
    torch.manual_seed(cfg.seed)
    backbone = build_resnet(cfg.model.visual, zero_init_residual=cfg.model.zero_init_residual)
    backbone.fc.requires_grad_(False)  # never used: the classifier below replaces it
    classifier = nn.Linear(backbone.fc.in_features, labels.shape[1])
    model = nn.ModuleDict({"backbone": backbone, "classifier": classifier}).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of_batch(batch):
        x = batch["images"].to(device)
        y = labels[batch["index"]].to(device)
        return F.binary_cross_entropy_with_logits(classifier(pooled_layer4(backbone, x)), y)

    losses = train_steps(loss_of_batch, params, build_loader(cfg, train=True), cfg.train.max_steps,
                         cfg.optim)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()
                if not k.startswith("fc.")}, tmp)
    os.replace(tmp, out)
    return {"weights": str(out), "classes": classes, "steps": cfg.train.max_steps,
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
            "seconds": time.perf_counter() - t0}
