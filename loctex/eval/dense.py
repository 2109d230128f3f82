"""``loctex eval dense``: semantic segmentation transfer on a COCO-format set, at several label
fractions, scored by mIoU on the val split.

* ``--protocol probe`` (default): the dense probe, a light head on the frozen backbone
  (``loctex.eval.dense_probe``).
* ``--protocol finetune``: the backbone and the head fine-tuned end to end
  (``loctex.eval.dense_finetune``), CPU-sized.

``--data`` is a ``loctex synth`` directory or COCO's layout (``coco_split``), or give the instance
files and image folders one by one. Instance segmentation (Mask R-CNN, COCOeval) is
``loctex eval detection``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="'random', a torchvision-keyed .pth/.safetensors, or a run/checkpoint dir")
    p.add_argument("--arch", default="auto", help="auto (from the weights) or resnet18|34|50|101")
    p.add_argument("--protocol", choices=("probe", "finetune"), default="probe",
                   help="probe: frozen backbone, trained head; finetune: everything trains")
    p.add_argument("--data", help="a `loctex synth` output or a COCO-layout directory (train/val)")
    p.add_argument("--train-instances")
    p.add_argument("--train-images")
    p.add_argument("--test-instances")
    p.add_argument("--test-images")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--fractions", default="0.1,0.5,1.0", help="label fractions to train on")
    p.add_argument("--steps", type=int, default=300, help="training steps per fraction")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="finetune only (default: cuda if available); the probe runs on the CPU")
    p.add_argument("--max-images", type=int, default=None, help="cap per split (quick runs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="write the result as JSON here")


def split_files(args) -> tuple[str, str, str, str]:
    if args.data:
        from .coco_sets import coco_split
        (tr_json, tr_img), (te_json, te_img) = (coco_split(args.data, s) for s in ("train", "val"))
        return str(tr_json), str(tr_img), str(te_json), str(te_img)
    files = (args.train_instances, args.train_images, args.test_instances, args.test_images)
    if not all(files):
        raise SystemExit("eval dense: give --data DIR, or all of --train-instances, "
                         "--train-images, --test-instances and --test-images")
    return files


def main(args: argparse.Namespace) -> int:
    from .backbone import load_backbone
    from .coco_sets import load_segmentation_set

    backbone = load_backbone(args.weights, args.arch)
    tr_json, tr_img, te_json, te_img = split_files(args)
    train = load_segmentation_set(tr_json, tr_img, args.image_size, args.max_images)
    test = load_segmentation_set(te_json, te_img, args.image_size, args.max_images)
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.protocol == "probe":
        from .dense_probe import run_dense_probe
        result = run_dense_probe(backbone, train, test, args.image_size, fractions, args.steps,
                                 args.batch_size, args.seed, num_workers=args.workers)
    else:
        from .dense_finetune import finetune_segmentation
        from .maskrcnn import resolve_device
        device = resolve_device(args.device)
        result = {f"{round(100 * f)}%": finetune_segmentation(
            backbone, train, test, f, args.steps, args.seed, args.batch_size, device=device)
            for f in fractions}
    print_miou(result, f"dense {args.protocol} (mIoU) — {args.weights}")
    if args.out:
        out = {"task": "dense", "protocol": args.protocol, "weights": args.weights,
               "image_size": args.image_size, "steps": args.steps, "seed": args.seed,
               "fractions": result}
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def print_miou(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    fracs = list(result)
    table.add_column("class")
    for f in fracs:
        table.add_column(f"{f} labels", justify="right")
    for n in result[fracs[0]]["per_class_iou"]:
        table.add_row(n, *(_pct(result[f]["per_class_iou"][n]) for f in fracs))
    table.add_row("[bold]mIoU[/bold]", *(f"[bold]{_pct(result[f]['mIoU'])}[/bold]" for f in fracs))
    Console().print(table)


def _pct(v) -> str:
    return "—" if v is None or v != v else f"{100 * v:.1f}"
