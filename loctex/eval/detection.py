"""``loctex eval detection``: instance-segmentation transfer.

* ``--mode maskrcnn`` (the default where CUDA and torchvision are available and ``--coco-root`` is
  given): Mask R-CNN R50-FPN fine-tuned on COCO, bbox and segm AP by ``COCOeval``
  (``loctex.eval.maskrcnn``; untested on the CPU machines).
* ``--mode dense`` (otherwise): the dense probe on the embedded set (``loctex.eval.dense_probe``):
  a light segmentation head on the frozen backbone trained on 10% / 50% / 100% of the labels,
  mIoU on the held-out split. ``--data`` is a ``loctex synth`` directory, or give the instance
  files and image folders one by one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="'random', a torchvision-keyed .pth/.safetensors, or a run/checkpoint dir")
    p.add_argument("--arch", default="auto", help="auto (from the weights) or resnet18|34|50|101")
    p.add_argument("--mode", choices=("auto", "maskrcnn", "dense"), default="auto")
    p.add_argument("--out", help="write the result as JSON here")
    m = p.add_argument_group("Mask R-CNN on COCO (CUDA + torchvision)")
    m.add_argument("--coco-root", help="COCO 2017: train2017/, val2017/, annotations/")
    m.add_argument("--max-iter", type=int, default=90000)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--lr", type=float, default=0.02, help="at batch 16; scaled linearly")
    d = p.add_argument_group("dense probe on the embedded set (CPU)")
    d.add_argument("--data", help="a `loctex synth` output directory (train/val splits)")
    d.add_argument("--train-instances")
    d.add_argument("--train-images")
    d.add_argument("--test-instances")
    d.add_argument("--test-images")
    d.add_argument("--image-size", type=int, default=128)
    d.add_argument("--fractions", default="0.1,0.5,1.0", help="label fractions to train on")
    d.add_argument("--steps", type=int, default=300, help="head training steps per fraction")
    d.add_argument("--max-images", type=int, default=None, help="cap per split (quick runs)")
    d.add_argument("--workers", type=int, default=2)


def _dense_files(args) -> tuple[str, str, str, str]:
    if args.data:
        from .coco_sets import synth_split
        (tr_json, tr_img), (te_json, te_img) = (synth_split(args.data, s) for s in ("train", "val"))
        return str(tr_json), str(tr_img), str(te_json), str(te_img)
    files = (args.train_instances, args.train_images, args.test_instances, args.test_images)
    if not all(files):
        raise SystemExit("dense probe: give --data DIR, or all of --train-instances, "
                         "--train-images, --test-instances and --test-images")
    return files


def choose_mode(args) -> str:
    if args.mode != "auto":
        return args.mode
    import importlib.util

    import torch
    gpu = torch.cuda.is_available() and importlib.util.find_spec("torchvision") is not None
    return "maskrcnn" if gpu and args.coco_root else "dense"


def main(args: argparse.Namespace) -> int:
    from .backbone import load_backbone

    mode = choose_mode(args)
    backbone = load_backbone(args.weights, args.arch)
    if mode == "maskrcnn":
        if not args.coco_root:
            raise SystemExit("--mode maskrcnn needs --coco-root")
        from .maskrcnn import run_maskrcnn
        result = run_maskrcnn(backbone, args.coco_root, args.max_iter, args.batch_size, args.lr)
        print(json.dumps(result, indent=2))
    else:
        from .coco_sets import load_segmentation_set
        from .dense_probe import run_dense_probe
        tr_json, tr_img, te_json, te_img = _dense_files(args)
        train = load_segmentation_set(tr_json, tr_img, args.image_size, args.max_images)
        test = load_segmentation_set(te_json, te_img, args.image_size, args.max_images)
        fractions = [float(f) for f in args.fractions.split(",")]
        result = run_dense_probe(backbone, train, test, args.image_size, fractions, args.steps,
                                 num_workers=args.workers)
        print_dense(result, f"dense probe (mIoU) — {args.weights}")
    result = {"mode": mode, "weights": args.weights, **result}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def print_dense(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    fracs = list(result)
    table.add_column("class")
    for f in fracs:
        table.add_column(f"{f} labels", justify="right")
    names = list(result[fracs[0]]["per_class_iou"])
    for n in names:
        table.add_row(n, *(_pct(result[f]["per_class_iou"][n]) for f in fracs))
    table.add_row("[bold]mIoU[/bold]", *(f"[bold]{_pct(result[f]['mIoU'])}[/bold]" for f in fracs))
    Console().print(table)


def _pct(v) -> str:
    return "—" if v is None or v != v else f"{100 * v:.1f}"
