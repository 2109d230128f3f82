"""Instance-segmentation transfer: torchvision's Mask R-CNN with an FPN on a ResNet backbone
(``load_backbone``), fine-tuned on a COCO-format set's train split and scored on its val split by
pycocotools ``COCOeval`` (bbox and segm). Runs on CPU (slowly) and CUDA.

Choices (torchvision's and detectron2's fine-tuning recipe unless said otherwise):
* The backbone's BatchNorm layers become ``FrozenBatchNorm2d`` holding the loaded statistics: the
  detection batches (a few images) are too small to estimate them. The stem and ``layer1``
  (detectron2's ``FREEZE_AT=2``) stay frozen: ``trainable_layers=3`` trains ``layer2``-``layer4``,
  the FPN and the heads. A backbone whose BatchNorm never saw data (the random one) would freeze
  the identity there, and its un-normalized features blow up with depth (measured at 128 px: a
  random R50-FPN's first loss ~37, diverging within 4 iterations; ~10 with statistics); it first
  gets running statistics averaged over the first ``BN_IMAGES`` training images (weights
  untouched). A pre-trained backbone keeps its own.
* Image size: torchvision resizes the shorter side to ``min_size`` (800 by default, which would
  blow the embedded set's 128 px images up 6x); here ``min_size = image_size`` and ``max_size``
  keeps torchvision's 1333/800 ratio. The default ``image_size`` is the training images' median
  shorter side (no upscaling; pass 800 for COCO's standard recipe). Below 512 px, where the images
  hold few and small objects, anchors start at 16 px instead of 32 and the box head samples 128
  RoIs per image instead of 512 (on the CPU RoIAlign's backward and the box head dominate an
  iteration: R18-FPN, 4 images of 128 px, 4.1 -> 2.1 CPU seconds).
* Categories map to contiguous labels 1..K (0 is background) and back to their ids in the results.
* SGD, momentum 0.9, weight decay 1e-4, lr 0.02 at batch 16 scaled linearly, linear warm-up over
  min(1000, iters/10) iterations, x0.1 at 2/3 and 8/9 of the schedule (the 1x schedule's shape).
* Mixed precision only on CUDA (bf16 where supported, else fp16 with a gradient scaler); CPU fp32.
* AP values are fractions in [0, 1] (the project's convention, like mIoU and mAP); COCOeval's -1
  (no ground truth in that area range) becomes ``None``; no detections at all gives 0.0 wherever
  there is ground truth (COCOeval is run on an empty result set, not skipped).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BN_IMAGES = 64  # training images that give a random backbone its BatchNorm statistics


def usable(ann: dict) -> bool:
    """An annotation the box and mask heads can learn from (not crowd, not degenerate)."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1


class CocoInstances(torch.utils.data.Dataset):
    """(image float [3, H, W] in 0..1, target) pairs in torchvision's detection format; the model
    normalizes and resizes. ``flip``: a random horizontal flip (training)."""

    def __init__(self, coco, images_dir: str | Path, image_ids: list[int], label_of: dict[int, int],
                 flip: bool):
        self.coco, self.dir, self.ids = coco, Path(images_dir), list(image_ids)
        self.label_of, self.flip = label_of, flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from PIL import Image

        info = self.coco.loadImgs(self.ids[i])[0]
        with Image.open(self.dir / info["file_name"]) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])) if usable(a)]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = (torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns
                     else torch.zeros((0, *img.shape[1:]), dtype=torch.uint8))
        if self.flip and torch.rand(()) < 0.5:
            W = img.shape[-1]
            img, masks = img.flip(-1), masks.flip(-1)
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], 1)
        target = {"boxes": boxes, "masks": masks, "image_id": info["id"],
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                         dtype=torch.int64)}
        return img, target


def build_maskrcnn(backbone, num_classes: int, image_size: int, trainable_layers: int = 3):
    """Mask R-CNN + FPN whose ResNet body holds ``backbone``'s weights (``num_classes`` counts the
    background). ``backbone``: a torchvision-keyed ResNet (``load_backbone``'s result)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from .backbone import infer_arch

    state = {k: v.float() for k, v in backbone.state_dict().items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    fpn = resnet_fpn_backbone(backbone_name=infer_arch(state), weights=None,
                              norm_layer=FrozenBatchNorm2d, trainable_layers=trainable_layers)
    fpn.body.load_state_dict(state)  # strict: every tensor of the body comes from the backbone
    small = image_size < 512  # small images hold few, small objects
    anchors = AnchorGenerator(sizes=tuple(((16 if small else 32) * 2 ** i,) for i in range(5)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(fpn, num_classes=num_classes, min_size=image_size,
                    max_size=round(image_size * 1333 / 800), rpn_anchor_generator=anchors,
                    box_batch_size_per_image=128 if small else 512)


def _collate(batch):
    return tuple(zip(*batch))


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 (fp16 where unsupported) on CUDA, none (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled)


def train_maskrcnn(model, loader, iters: int, lr: float, device: torch.device,
                   progress: bool = True) -> list[float]:
    """Fine-tune for ``iters`` iterations (cycling the loader); -> the loss of each iteration."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    milestones = (int(iters * 2 / 3), int(iters * 8 / 9))
    warmup = max(1, min(1000, iters // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, 0.001 + s / warmup) * 0.1 ** sum(s >= m for m in milestones))
    amp = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    losses: list[float] = []
    log_every = max(1, iters // 20)
    model.to(device).train()
    with _progress(progress) as bar:
        task = bar.add_task("Mask R-CNN", total=iters, info="")
        while len(losses) < iters:
            for images, targets in loader:
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                           for t in targets]
                with _autocast(amp):
                    loss = sum(model(images, targets).values())
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"Mask R-CNN loss is {value} at iteration "
                                             f"{len(losses)} (lower --lr?)")
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                losses.append(value)
                bar.update(task, advance=1, info=f"loss {value:.3f}")
                if progress and not bar.console.is_terminal and len(losses) % log_every == 0:
                    # a log file gets no live bar (rich draws it once, at the end): lines instead
                    bar.console.print(f"iteration {len(losses)}/{iters} loss {value:.3f}")
                if len(losses) >= iters:
                    break
    return losses


@torch.no_grad()
def predict(model, loader, device: torch.device, category_of: dict[int, int],
            progress: bool = True) -> tuple[list[dict], list[dict]]:
    """COCO results of every image: (bbox results, segm results with RLE masks at 0.5)."""
    from pycocotools import mask as mask_utils

    boxes_out, segs_out = [], []
    model.to(device).eval()
    with _progress(progress) as bar:
        task = bar.add_task("inference", total=len(loader.dataset), info="")
        for images, targets in loader:
            with _autocast(_amp_dtype(device)):
                outputs = model([im.to(device) for im in images])
            for out, tgt in zip(outputs, targets):
                boxes = out["boxes"].float().cpu().numpy()
                scores, labels = out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()
                masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rles = (mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
                        if len(masks) else [])
                for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                    base = {"image_id": int(tgt["image_id"]), "category_id": category_of[labels[k]],
                            "score": scores[k]}
                    boxes_out.append({**base, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                    segs_out.append({**base, "segmentation": {
                        "size": [int(s) for s in rles[k]["size"]],
                        "counts": rles[k]["counts"].decode("ascii")}})
            bar.update(task, advance=len(images))
    return boxes_out, segs_out


def coco_scores(coco_gt, results: list[dict], iou_type: str,
                image_ids: list[int] | None = None) -> dict:
    """COCOeval's AP, AP50, AP75, APs, APm, APl (fractions; None where COCOeval says -1, i.e. no
    ground truth in that range) of ``results`` on ``image_ids`` (default: all images)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools under NumPy 2
        if results:
            # loadRes adds numpy fields (area, bbox, id) to the dicts it gets: give it copies
            dt = coco_gt.loadRes([dict(r) for r in results])
        else:  # loadRes rejects an empty list; an empty result set scores 0 where there is truth
            dt = COCO()
            dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                          "categories": coco_gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(coco_gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: (None if v < 0 else float(v)) for n, v in zip(AP_NAMES, ev.stats[:6])}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    from .features import default_device

    device = default_device() if device is None else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device (use --device cpu)")
    return device


def training_image_ids(coco, label_fraction: float, seed: int) -> list[int]:
    """The seeded ``label_fraction`` of the images holding a usable instance (sorted ids; nested
    across fractions for one seed, see ``label_subsets``)."""
    from .coco_sets import label_subsets

    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    ids = [i for i in sorted(coco.getImgIds())
           if any(usable(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=i)))]
    if not ids:
        raise ValueError("no training image holds a usable (non-crowd, non-degenerate) instance")
    return [ids[k] for k in label_subsets(len(ids), [label_fraction], seed)[label_fraction]]


def median_short_side(coco) -> int:
    return int(np.median([min(i["height"], i["width"]) for i in coco.dataset["images"]]))


def run_detection(weights, coco_root: str | Path, label_fraction: float = 1.0, iters: int = 1000,
                  image_size: int | None = None, seed: int = 0,
                  device: str | torch.device | None = None, batch_size: int = 4,
                  arch: str = "auto", lr: float = 0.02, trainable_layers: int = 3,
                  workers: int = 2, max_val_images: int | None = None,
                  progress: bool = True) -> dict:
    """Fine-tune Mask R-CNN from ``weights`` on ``coco_root``'s train split, score it on the val
    split; -> a JSON-ready dict (``bbox`` and ``segm`` hold ``AP_NAMES``; see the module doc).

    ``weights``: what ``load_backbone`` takes (``random``, a weights file, a run directory) or an
    already loaded ResNet. ``coco_root``: a ``loctex synth`` directory or COCO's layout
    (``coco_split``). ``label_fraction``: the seeded subset of the training images (those with a
    usable instance) that is trained on. ``lr`` is at batch 16 and scaled linearly."""
    from .backbone import (batchnorm_never_saw_data, estimate_batchnorm_statistics, infer_arch,
                           load_backbone)
    from .coco_sets import coco_split, read_coco
    from .features import load_images

    device = resolve_device(device)
    (train_json, train_dir), (val_json, val_dir) = (coco_split(coco_root, s)
                                                     for s in ("train", "val"))
    train_gt, val_gt = read_coco(train_json), read_coco(val_json)
    cat_ids = sorted(train_gt.getCatIds())
    if cat_ids != sorted(val_gt.getCatIds()):
        raise ValueError(f"{train_json.name} and {val_json.name} have different categories")
    label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
    category_of = {i: c for c, i in label_of.items()}

    train_ids = training_image_ids(train_gt, label_fraction, seed)
    val_ids = sorted(val_gt.getImgIds())[:max_val_images]
    image_size = image_size or median_short_side(train_gt)

    if isinstance(weights, torch.nn.Module):
        backbone = copy.deepcopy(weights)  # the caller's module stays as it is
    else:
        backbone = load_backbone(weights, arch)
    bn_ids = train_ids[:BN_IMAGES] if batchnorm_never_saw_data(backbone) else []
    if bn_ids:
        estimate_batchnorm_statistics(backbone.to(device), load_images(
            [str(train_dir / i["file_name"]) for i in train_gt.loadImgs(bn_ids)], image_size))
    torch.manual_seed(seed)  # the heads' initialization, the flips of worker-less loading
    model = build_maskrcnn(backbone, len(cat_ids) + 1, image_size, trainable_layers)
    train = torch.utils.data.DataLoader(
        CocoInstances(train_gt, train_dir, train_ids, label_of, flip=True), batch_size=batch_size,
        shuffle=True, num_workers=workers, collate_fn=_collate,
        drop_last=len(train_ids) >= batch_size, generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda")
    val = torch.utils.data.DataLoader(
        CocoInstances(val_gt, val_dir, val_ids, label_of, flip=False), batch_size=batch_size,
        num_workers=workers, collate_fn=_collate)

    t0 = time.perf_counter()
    losses = train_maskrcnn(model, train, iters, lr * batch_size / 16, device, progress)
    t1 = time.perf_counter()
    boxes, segs = predict(model, val, device, category_of, progress)
    t2 = time.perf_counter()
    scores = {"bbox": coco_scores(val_gt, boxes, "bbox", val_ids),
              "segm": coco_scores(val_gt, segs, "segm", val_ids)}
    t3 = time.perf_counter()
    return {
        "task": "maskrcnn",
        "weights": str(weights) if isinstance(weights, (str, Path)) else "<module>",
        "arch": infer_arch(backbone.state_dict()),
        "coco_root": str(coco_root), "label_fraction": label_fraction,
        "train_images": len(train_ids), "val_images": len(val_ids), "iters": iters,
        "batch_size": batch_size, "image_size": image_size, "seed": seed, "device": str(device),
        "trainable_layers": trainable_layers, "lr": lr * batch_size / 16,
        "batchnorm_statistics": (f"estimated on {len(bn_ids)} training images" if bn_ids
                                 else "the backbone's own"),
        **scores, "detections": len(boxes),
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "seconds": {"train": t1 - t0, "per_iter": (t1 - t0) / max(iters, 1),
                    "inference": t2 - t1, "cocoeval": t3 - t2},
    }
