"""``loctex eval voc07``: PASCAL VOC 2007 classification with linear SVMs on frozen features.

VirTex's protocol: frozen ``layer4``, global average pool, L2-normalize; one-vs-all ``LinearSVC`` per
class, cost from {0.01, 0.1, 1, 10} by 3-fold cross-validated AP on trainval; test mAP over the 20
classes (``loctex.eval.linear_probe`` holds the SVM part, shared with ``loctex reproduce``). Images:
shorter side resized to ``--image-size`` (224) and center-cropped, ImageNet normalization.

Reads the real VOCdevkit layout: ``VOC2007/ImageSets/Main/{class}_{trainval,test}.txt`` (lines
``<image id> <1|-1|0>``; 0 = difficult) and ``VOC2007/JPEGImages/<image id>.jpg``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .linear_probe import SVM_COSTS, svm_map


def voc_dir(root: str | Path) -> Path:
    """Accept ``VOCdevkit/`` or ``VOCdevkit/VOC2007/``."""
    root = Path(root)
    for cand in (root, root / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise FileNotFoundError(f"{root}: no ImageSets/Main (expected VOCdevkit/ or VOCdevkit/VOC2007/)")


def read_split(root: str | Path, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """-> (image paths, labels int8 [N, 20] in {1, -1, 0}, class names sorted)."""
    root = voc_dir(root)
    ann = sorted((root / "ImageSets" / "Main").glob(f"*_{split}.txt"))
    classes = [p.name[: -len(f"_{split}.txt")] for p in ann]
    if not classes:
        raise FileNotFoundError(f"{root}/ImageSets/Main: no <class>_{split}.txt files")
    labels: dict[str, np.ndarray] = {}
    for c, path in enumerate(ann):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                image_id, value = line.split()
                value = int(value)
                assert value in (1, -1, 0)
            except (ValueError, AssertionError):
                raise ValueError(f"{path}:{n}: expected '<image id> <1|-1|0>', got {line!r}") from None
            # an image a class file does not list counts as not scored for that class
            labels.setdefault(image_id, np.zeros(len(classes), np.int8))[c] = value
    ids = sorted(labels)
    paths = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids]
    return paths, np.stack([labels[i] for i in ids]), classes


def evaluate(weights: str, voc_root: str, arch: str = "auto", image_size: int = 224,
             batch_size: int = 64, workers: int = 2, difficult_in_training: str = "negative",
             n_jobs: int | None = None) -> dict:
    from .backbone import load_backbone
    from .features import default_device, pooled_features

    train_paths, train_y, classes = read_split(voc_root, "trainval")
    test_paths, test_y, test_classes = read_split(voc_root, "test")
    if classes != test_classes:
        raise ValueError(f"trainval and test class lists differ: {classes} vs {test_classes}")
    backbone = load_backbone(weights, arch)
    device = default_device()
    feats = [pooled_features(backbone, p, image_size, center_crop=True, batch_size=batch_size,
                             num_workers=workers, device=device) for p in (train_paths, test_paths)]
    result = svm_map(feats[0], train_y, feats[1], test_y, classes,
                     difficult_in_training=difficult_in_training, n_jobs=n_jobs)
    result.update(weights=weights, num_trainval=len(train_paths), num_test=len(test_paths),
                  costs=list(SVM_COSTS), difficult_in_training=difficult_in_training)
    return result


def print_result(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("class", "test AP", "cost", "CV AP", "note"):
        table.add_column(col, justify="left" if col in ("class", "note") else "right")
    for name, r in result["per_class"].items():
        table.add_row(name, f"{100 * r['ap']:.1f}", f"{r['cost']:g}", f"{100 * r['cv_ap']:.1f}",
                      r["note"])
    table.add_row("[bold]mAP[/bold]", f"[bold]{100 * result['mAP']:.2f}[/bold]", "", "", "")
    Console().print(table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="'random', a torchvision-keyed .pth/.safetensors, or a run/checkpoint dir")
    p.add_argument("--voc-root", required=True, help="VOCdevkit/ (or VOCdevkit/VOC2007/)")
    p.add_argument("--arch", default="auto", help="auto (from the weights) or resnet18|34|50|101")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--jobs", type=int, default=None, help="parallel SVM fits (default: cores)")
    p.add_argument("--difficult-train", choices=("negative", "ignore"), default="negative",
                   help="difficult trainval images: negatives as in VirTex's code, or left out")
    p.add_argument("--out", help="write the result as JSON here")


def main(args: argparse.Namespace) -> int:
    result = evaluate(args.weights, args.voc_root, args.arch, args.image_size, args.batch_size,
                      args.workers, args.difficult_train, args.jobs)
    print_result(result, f"VOC07 linear SVM — {args.weights}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
