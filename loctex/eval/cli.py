"""``loctex eval voc07|localization|detection|dense``: each evaluation's module defines
``add_arguments(parser)`` and ``main(args)``; this file only routes to them."""
from __future__ import annotations

import argparse
import importlib

EVALS = {
    "voc07": ("loctex.eval.voc07", "PASCAL VOC07 classification, linear SVMs on frozen features"),
    "localization": ("loctex.eval.localization",
                     "attention vs mouse traces on held-out narratives (KL, pointing accuracy)"),
    "detection": ("loctex.eval.detection", "Mask R-CNN (FPN) fine-tuned, COCOeval bbox/segm AP"),
    "dense": ("loctex.eval.dense", "semantic segmentation: frozen-backbone probe or fine-tuning, mIoU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    for name, (module, help_text) in EVALS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_eval_module=module, _command=f"eval {name}")  # names it in errors


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._eval_module).main(args) or 0)
