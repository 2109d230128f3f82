"""Measurement units, each of one backbone and one seed, with the library's own evaluations:

* ``linear``: VOC07's linear-SVM protocol (``loctex.eval.linear_probe``, what ``loctex eval voc07``
  runs) on frozen, pooled, L2-normalized layer4 features; the classes are the embedded set's
  categories, trained on the train split and scored (mAP) on the val split;
* ``transfer``: the backbone fine-tuned end to end on a share of the target labels and scored on
  the val split -- semantic segmentation (``loctex.eval.dense_finetune``, mIoU) or Mask R-CNN
  (``loctex.eval.maskrcnn``, mask AP from COCOeval), as the study says;
* ``localization``: pointing accuracy, box pointing game, KL(trace ‖ attention) and retrieval R@1
  on the val narratives (``loctex.eval.localization``); contrastive-only with the head that
  ``head.py`` trained on its frozen model.
"""
from __future__ import annotations

import time

from .plan import Unit
from .workspace import Workspace

METRICS = {"segmentation": "mIoU", "maskrcnn": "mask AP"}


def linear(ws: Workspace, unit: Unit) -> dict:
    from loctex.eval.features import pooled_features
    from loctex.eval.linear_probe import svm_map

    t0 = time.perf_counter()
    backbone = ws.backbone(unit)
    train, val = ws.label_sets()
    size, device = ws.study.image_size, ws.study.device
    x = {name: pooled_features(backbone, s.paths, size, num_workers=ws.workers, device=device)
         for name, s in (("train", train), ("val", val))}
    probe = svm_map(x["train"], train.labels, x["val"], val.labels, train.class_names,
                    seed=unit.seed)
    return {"score": probe["mAP"], "metric": "mAP", "detail": probe,
            "seconds": time.perf_counter() - t0}


def transfer(ws: Workspace, unit: Unit) -> dict:
    t0 = time.perf_counter()
    t = ws.study.transfer
    backbone = ws.backbone(unit)
    if t.task == "maskrcnn":
        from loctex.eval.maskrcnn import run_detection
        detail = run_detection(backbone, ws.data.synth, label_fraction=unit.labels, iters=t.steps,
                               image_size=ws.study.image_size, seed=unit.seed,
                               device=ws.study.device, batch_size=t.batch_size,
                               workers=ws.workers, progress=False)
        score = detail["segm"]["AP"]
    else:
        from loctex.eval.dense_finetune import finetune_segmentation
        train, val = ws.segmentation_sets()
        detail = finetune_segmentation(backbone, train, val, label_fraction=unit.labels,
                                       steps=t.steps, seed=unit.seed, batch_size=t.batch_size,
                                       device=ws.study.device)
        score = detail["mIoU"]
    return {"score": score, "metric": METRICS[t.task], "detail": detail,
            "seconds": time.perf_counter() - t0}


def localization(ws: Workspace, unit: Unit) -> dict:
    from loctex.eval.localization import evaluate

    from .head import load_with_head

    t0 = time.perf_counter()
    head = ws.head_weights(unit) if unit.backbone == "contrastive" else None
    model = load_with_head(ws.run_dir(unit), head)
    result = evaluate(model, str(ws.data.prepared("val")), str(ws.data.groundings("val")),
                      num_workers=ws.workers)
    return {**result, "head": "trained on the frozen model" if head else "pre-trained jointly",
            "seconds": time.perf_counter() - t0}
