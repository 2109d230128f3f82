"""``loctex eval detection``: Mask R-CNN (torchvision, ResNet-FPN) fine-tuned from a backbone on a
COCO-format set and scored by pycocotools COCOeval, bbox and segm (``loctex.eval.maskrcnn``).

It runs on the CPU as on CUDA (slowly: seconds per iteration of 4 images at 128 px on two cores);
it never turns into another evaluation. The semantic segmentation transfers are
``loctex eval dense``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="'random', a torchvision-keyed .pth/.safetensors, or a run/checkpoint dir")
    p.add_argument("--arch", default="auto", help="auto (from the weights) or resnet18|34|50|101")
    p.add_argument("--coco-root", required=True,
                   help="a `loctex synth` directory, or COCO's layout: annotations/instances_"
                        "{train,val}*.json with the image folders they name (train2017/, ...)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="train on this seeded fraction of the training images")
    p.add_argument("--iters", type=int, default=1000, help="training iterations")
    p.add_argument("--image-size", type=int, default=None,
                   help="shorter side fed to the model (default: the training images' median "
                        "shorter side, so nothing is upscaled; 800 is COCO's standard)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02, help="at batch 16; scaled linearly")
    p.add_argument("--trainable-layers", type=int, default=3, choices=range(6),
                   help="ResNet stages trained from the top (3: stem and layer1 frozen)")
    p.add_argument("--max-val-images", type=int, default=None, help="score on the first N only")
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--out", required=True, help="the result, as JSON")


def main(args: argparse.Namespace) -> int:
    from .maskrcnn import run_detection

    try:
        result = run_detection(args.weights, args.coco_root, args.label_fraction, args.iters,
                               args.image_size, args.seed, args.device, args.batch_size,
                               arch=args.arch, lr=args.lr, trainable_layers=args.trainable_layers,
                               workers=args.workers, max_val_images=args.max_val_images)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"eval detection: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    print_ap(result)
    return 0


def print_ap(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Mask R-CNN {result['arch']}-FPN from {result['weights']}",
                  caption=f"{result['label_fraction']:.0%} labels, {result['iters']} iterations, "
                          f"{result['image_size']} px; AP in %")
    table.add_column("")
    table.add_column("bbox", justify="right")
    table.add_column("segm", justify="right")
    for name in result["bbox"]:
        table.add_row(name, *("—" if result[t][name] is None else f"{100 * result[t][name]:.1f}"
                              for t in ("bbox", "segm")))
    Console().print(table)
