"""COCO instance segmentation transfer: torchvision's Mask R-CNN R50-FPN initialised with a backbone
(``load_backbone``), fine-tuned on COCO train2017, scored on val2017 by pycocotools ``COCOeval``
(bbox and segm AP).

UNTESTED: this path needs CUDA and torchvision, which the CPU development and CI machines lack; it
has been written against torchvision's documented detection API but never run. Single process,
one GPU, bf16 autocast; the backbone's BatchNorm layers are frozen (FrozenBatchNorm2d, with the
loaded statistics), as in torchvision's and detectron2's fine-tuning recipes. Defaults follow the
1x schedule scaled linearly to the batch size (lr 0.02 at batch 16, steps at 2/3 and 8/9).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch


class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, coco, images_dir: str, train: bool):
        self.coco, self.dir, self.train = coco, Path(images_dir), train
        ids = sorted(coco.getImgIds())
        if train:  # images without a usable instance teach nothing to the box/mask heads
            ids = [i for i in ids if any(a["iscrowd"] == 0 and a["bbox"][2] > 1 and a["bbox"][3] > 1
                                         for a in coco.loadAnns(coco.getAnnIds(imgIds=i)))]
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        from PIL import Image
        info = self.coco.loadImgs(self.ids[i])[0]
        with Image.open(self.dir / info["file_name"]) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
                if a["iscrowd"] == 0 and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns \
            else torch.zeros((0, *img.shape[1:]), dtype=torch.uint8)
        target = {"boxes": boxes, "masks": masks, "image_id": info["id"],
                  "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}
        if self.train and torch.rand(()) < 0.5:  # horizontal flip
            img, target["masks"] = img.flip(-1), target["masks"].flip(-1)
            W = img.shape[-1]
            target["boxes"] = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0],
                                           boxes[:, 3]], 1)
        return img, target


def build_maskrcnn(backbone, num_classes: int = 91):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    fpn = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                              norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    # fpn.body is the ResNet-50 with torchvision's keys (fc dropped); FrozenBatchNorm2d takes the
    # loaded statistics and drops num_batches_tracked
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = fpn.body.load_state_dict(state, strict=False)
    if missing or [k for k in unexpected if "num_batches_tracked" not in k]:
        raise ValueError(f"backbone does not fit Mask R-CNN R50-FPN: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (it needs a resnet50)")
    return MaskRCNN(fpn, num_classes=num_classes)


@torch.no_grad()
def coco_results(model, loader, device) -> tuple[list, list]:
    from pycocotools import mask as mask_utils
    boxes_out, segs_out = [], []
    model.eval()
    for images, targets in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model([im.to(device) for im in images])
        for out, tgt in zip(outputs, targets):
            b = out["boxes"].float().cpu().numpy()
            for k in range(len(b)):
                base = {"image_id": tgt["image_id"], "category_id": int(out["labels"][k]),
                        "score": float(out["scores"][k])}
                x0, y0, x1, y1 = b[k].tolist()
                boxes_out.append({**base, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                m = (out["masks"][k, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                segs_out.append({**base, "segmentation": rle})
    return boxes_out, segs_out


def coco_ap(coco_gt, results: list, iou_type: str) -> dict:
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {"AP": 0.0}
    dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return {n: float(100 * v) for n, v in zip(names, ev.stats[:6])}


def run_maskrcnn(backbone, coco_root: str, max_iter: int = 90000, batch_size: int = 16,
                 lr: float = 0.02, workers: int = 8, out_dir: str | None = None) -> dict:
    from pycocotools.coco import COCO

    root = Path(coco_root)
    with contextlib.redirect_stdout(io.StringIO()):
        train_gt = COCO(str(root / "annotations" / "instances_train2017.json"))
        val_gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    device = torch.device("cuda")
    model = build_maskrcnn(backbone).to(device)
    collate = lambda batch: tuple(zip(*batch))  # noqa: E731
    train = torch.utils.data.DataLoader(CocoDetection(train_gt, root / "train2017", True),
                                        batch_size=batch_size, shuffle=True, num_workers=workers,
                                        collate_fn=collate, drop_last=True)
    val = torch.utils.data.DataLoader(CocoDetection(val_gt, root / "val2017", False),
                                      batch_size=4, num_workers=workers, collate_fn=collate)
    lr = lr * batch_size / 16
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    milestones = (int(max_iter * 2 / 3), int(max_iter * 8 / 9))
    warmup = min(1000, max_iter // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, 0.001 + s / max(warmup, 1)) * 0.1 ** sum(s >= m for m in milestones))
    step = 0
    model.train()
    while step < max_iter:
        for images, targets in train:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sum(model(images, targets).values())
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"loss is {float(loss)} at iteration {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                print(f"iter {step}/{max_iter} loss {float(loss):.3f} lr {sched.get_last_lr()[0]:.4f}",
                      flush=True)
            if step >= max_iter:
                break
    boxes, segs = coco_results(model, val, device)
    result = {"bbox": coco_ap(val_gt, boxes, "bbox"), "segm": coco_ap(val_gt, segs, "segm"),
              "max_iter": max_iter, "batch_size": batch_size}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "coco_instances_results.json").write_text(json.dumps(segs))
    return result
