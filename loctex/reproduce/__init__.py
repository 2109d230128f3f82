"""``loctex reproduce``: the paper's questions, asked in miniature on the embedded data set, fairly
and with error bars.

Backbones (the same ResNet; the same initialization seed, batches, order and step budget):
random init; supervised pre-training on the embedded set's categories (the stand-in for
ImageNet-supervised, ``supervised.py``); contrastive-only (``configs/embedded_contrastive.yaml``
through the engine); LocTex (``configs/embedded.yaml`` through the engine). Measures, each per seed
(``measures.py``): fine-tuned transfer at several target label fractions (target-data efficiency);
transfer of LocTex and contrastive-only pre-trained on 25/50/100% of the images (pre-training-data
efficiency); VOC07-protocol linear classification on frozen features; localization and retrieval,
with contrastive-only's attention head first trained on its frozen model (``head.py``). Every cell
is mean ± sd over the pre-training seeds and every claim a paired difference with a 95% interval and
a verdict (``report.py``, ``stats.py``).

The settings are a study config (``study.py``): ``--quick`` is configs/reproduce_quick.yaml
(<= 15 min on two CPU cores), the default configs/reproduce_full.yaml (<= 2 h on two CPU cores),
``--device cuda`` configs/reproduce_cuda.yaml (larger, Mask R-CNN transfer). The work is split in
units (``plan.py``) whose results are written atomically and reused by a re-run with the same
``--out``: an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

STUDY_CONFIGS = {"quick": "reproduce_quick.yaml", "full": "reproduce_full.yaml",
                 "cuda": "reproduce_cuda.yaml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the small study (configs/reproduce_quick.yaml, <= 15 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="cuda: the larger study of configs/reproduce_cuda.yaml (unless --quick or "
                        "--config says which)")
    p.add_argument("--config", help="a study config instead (see configs/reproduce_*.yaml)")
    p.add_argument("--seeds", type=int, help="number of pre-training seeds (overrides the config)")
    p.add_argument("--out", default="runs/reproduce", help="output directory (reused on a re-run)")
    p.add_argument("--data", help="an existing `loctex synth` directory to use")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="study config overrides, e.g. pretrain.steps=50 "
                        "pretrain.engine.train.micro_batch_size=16")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes in evaluation")


def study_file(args: argparse.Namespace) -> Path:
    from .study import config_file
    if args.config:
        return Path(args.config)
    name = "quick" if args.quick else "cuda" if args.device == "cuda" else "full"
    return config_file(STUDY_CONFIGS[name])


def study_of(args: argparse.Namespace):
    from .study import load_study
    study = load_study(study_file(args), args.set)
    changes = {k: v for k, v in (("seeds", args.seeds), ("device", args.device)) if v}
    return dataclasses.replace(study, **changes)


def check_same_study(out: Path, study) -> None:
    """Finished units are only reusable by the same study (the seed count may grow)."""
    from .plan import write_json_atomic
    from .study import as_dict

    def comparable(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("seeds", "covers")}

    path = out / "study.json"
    now = json.loads(json.dumps(as_dict(study)))  # tuples as lists, like the file
    if path.is_file():
        before = json.loads(path.read_text())
        if comparable(before) != comparable(now):
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise SystemExit(f"{out} holds a study with other settings ({', '.join(diff)}); "
                             f"its results cannot be reused: choose another --out")
    write_json_atomic(path, now)


def executors():
    from . import measures, pretrain
    from .head import train_head_of_run

    def head(ws, unit):
        return train_head_of_run(ws.run_dir(unit), ws.study.pretrain.steps, ws.head_weights(unit),
                                 ws.study.device)

    return {"pretrain": pretrain.run, "head": head, "linear": measures.linear,
            "transfer": measures.transfer, "localization": measures.localization}


def command_line(args: argparse.Namespace) -> str:
    """The command that runs this study again (and reuses its results)."""
    words = ["loctex reproduce"] + (["--quick"] if args.quick else [])
    words += [f"--{k} {v}" for k, v in (("device", args.device), ("config", args.config),
                                          ("seeds", args.seeds), ("out", args.out),
                                          ("data", args.data)) if v]
    return " ".join(words + (["--set", *args.set] if args.set else []))


def _machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def main(args: argparse.Namespace) -> int:
    from .data import prepare
    from .plan import plan, run_units
    from .report import build, write
    from .workspace import Workspace

    t_start = time.perf_counter()
    machine_at_start = _machine()
    study = study_of(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_same_study(out, study)
    data = prepare(out, args.data, study.images, study.val_fraction)
    ws = Workspace(out, study, data, args.workers)
    run = executors()
    units = plan(study)
    reused = run_units(units, out, lambda unit: run[unit.kind](ws, unit))

    engine_cfg = ws.engine_config(units[0])
    unit_seconds = {u.result_path(out).relative_to(out).as_posix():
                    json.loads(u.result_path(out).read_text()).get("seconds") for u in units}
    meta = {"command": command_line(args),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": time.perf_counter() - t_start,
            "host": f"{machine_at_start} at the start, {_machine()} at the end",
            "units": len(units), "reused_units": reused, "unit_seconds": unit_seconds,
            "arch": engine_cfg.model.visual, "micro_batch_size": engine_cfg.train.micro_batch_size}
    report = build(out, study, meta)
    write(out, report)
    print_claims(report)
    print(f"[reproduce] {out / 'results.md'}, results.json, results.png "
          f"({meta['wall_s'] / 60:.1f} min; {reused} of {len(units)} units reused)", flush=True)
    return 0


def print_claims(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import interval_text

    table = Table(title=f"{report['study']['name']}: {report['study']['seeds']} seeds, paired "
                        f"differences (points) with 95% intervals")
    for col in ("claim", "difference [95% CI]", "verdict"):
        table.add_column(col)
    for c in report["claims"]:
        table.add_row(c["key"], interval_text(c, True), c["verdict"])
    Console().print(table)
