"""``loctex reproduce [--quick]``: the paper's comparison in miniature on the embedded data set.

1. data: ``loctex synth`` (unless ``OUT/data`` has it), the tokenizer, ``loctex prepare`` of both splits;
2. pre-training through the real engine (``python -m loctex.engine.launch``, i.e. engine/launch.py):
   contrastive-only (``configs/embedded_contrastive.yaml``) and LocTex (``configs/embedded.yaml``),
   same budget, same seed, same data order;
3. evaluation of both and of a random-init backbone of the same architecture:
   * linear probe: multi-label classification of the shape categories, VOC07's SVM protocol
     (``loctex.eval.linear_probe``, the code ``loctex eval voc07`` runs) on frozen, pooled, normalized
     layer4 features; test = the val split;
   * dense probe at 10/50/100% of the labels (``loctex.eval.dense_probe``), mIoU on the val split;
   * localization (pointing accuracy, box pointing game, KL) and retrieval recall@1 on the val
     narratives (``loctex.eval.localization``; not defined for the random backbone);
4. a table, ``OUT/results.json`` and ``OUT/results.png``.

``--quick`` shrinks the data and the budgets to fit in 15 minutes on two cores. Runs resume
(``train.resume=auto``), so a second invocation with the same ``--out`` reuses finished work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("random", "contrastive", "loctex")
CONFIGS = {"contrastive": "embedded_contrastive.yaml", "loctex": "embedded.yaml"}

# (images, pre-training steps, dense-probe steps); image size and the rest come from the configs
BUDGETS = {"full": (4000, 1000, 1000), "quick": (1000, 200, 500)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small data and budgets (<= 15 min, 2 cores)")
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    p.add_argument("--data", help="an existing `loctex synth` directory to use")
    p.add_argument("--num-images", type=int, help="images to synthesize (default: by budget)")
    p.add_argument("--steps", type=int, help="pre-training steps (default: by budget)")
    p.add_argument("--probe-steps", type=int, help="dense-probe head steps (default: by budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for both pre-training runs (e.g. data.image_size=96)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes in evaluation")


# ---- 1. data -------------------------------------------------------------------------------------
def _loctex(*argv: str) -> None:
    from loctex.cli import main
    rc = main(list(argv))
    if rc:
        raise SystemExit(f"loctex {' '.join(argv[:1])} failed (exit {rc})")


def prepare_data(out: Path, data: str | None, num_images: int, seed: int) -> dict:
    synth = Path(data) if data else out / "data"
    if not (synth / "synth.json").is_file():
        if data:
            raise SystemExit(f"--data {data}: no synth.json (not a `loctex synth` directory)")
        _loctex("synth", "--out", str(synth), "--num-images", str(num_images), "--seed", str(seed),
                "--val-fraction", "0.2")
    work = out / "prepared"
    tok = work / "tokenizer.json"
    if not tok.is_file():
        _loctex("tokenizer", "train", "--narratives", str(synth / "narratives_train.jsonl"),
                "--vocab-size", "2000", "--out", str(tok))
    prepared = {}
    for split in ("train", "val"):
        dest = work / split
        if not (dest / "manifest.json").is_file():
            _loctex("prepare", "--narratives", str(synth / f"narratives_{split}.jsonl"),
                    "--images", str(synth / "images"), "--out", str(dest), "--tokenizer", str(tok))
        prepared[split] = dest
    return {"synth": synth, "prepared": prepared}


# ---- 2. pre-training -----------------------------------------------------------------------------
def _free_port() -> int:
    """A free local port for the run's process group (two reproduce runs may overlap, e.g. tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(name: str, out: Path, data: dict, steps: int, seed: int, overrides: list[str]) -> Path:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loctex.engine.launch", "--config", str(REPO / "configs" / CONFIGS[name]),
           f"run_dir={run_dir}", f"seed={seed}", f"data.prepared={data['prepared']['train']}",
           f"data.val_prepared={data['prepared']['val']}", f"train.max_steps={steps}",
           f"train.checkpoint_every={steps}", "train.resume=auto", *overrides]
    log = run_dir / "train.log"
    print(f"[reproduce] pre-training {name}: {steps} steps (log: {log})", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port())}
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"pre-training {name} failed (exit {rc}); end of {log}:\n{tail}")
    print(f"[reproduce] {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return run_dir


# ---- 3. evaluation -------------------------------------------------------------------------------
def evaluate_backbone(backbone, data: dict, size: int, probe_steps: int, workers: int,
                      seed: int) -> dict:
    """Linear probe and dense probe of one frozen backbone (the features are computed once)."""
    import torch.nn.functional as F

    from loctex.eval.coco_sets import load_label_set, load_segmentation_set, synth_split
    from loctex.eval.dense_probe import cached_features, run_dense_probe_on_features
    from loctex.eval.linear_probe import svm_map

    sets = {s: synth_split(data["synth"], s) for s in ("train", "val")}
    labels = {s: load_label_set(*sets[s]) for s in sets}
    segs = {s: load_segmentation_set(*sets[s], size) for s in sets}
    feats = {s: cached_features(backbone, segs[s].paths, size, num_workers=workers) for s in sets}
    # VOC07's features: global average pool of layer4, L2-normalized
    pooled = {s: F.normalize(feats[s][-1].float().mean((2, 3)), dim=-1).numpy() for s in sets}
    probe = svm_map(pooled["train"], labels["train"].labels, pooled["val"], labels["val"].labels,
                    labels["train"].class_names, seed=seed)
    dense = run_dense_probe_on_features(feats["train"], segs["train"], feats["val"], segs["val"],
                                        steps=probe_steps, seed=seed)
    return {"linear_probe_mAP": probe["mAP"], "linear_probe": probe, "dense_probe": dense}


def evaluate_all(out: Path, data: dict, runs: dict, size: int, probe_steps: int, workers: int,
                 seed: int) -> dict:
    import torch

    from loctex.engine.checkpoint import load_model
    from loctex.eval.localization import evaluate as localization
    from loctex.models.resnet import build_resnet

    results = {}
    for name in MODELS:
        t0 = time.perf_counter()
        if name == "random":
            torch.manual_seed(seed)
            model, backbone = None, build_resnet(arch_of(runs)).eval()
        else:
            model = load_model(runs[name])
            backbone = model.visual
        r = evaluate_backbone(backbone, data, size, probe_steps, workers, seed)
        if model is not None:
            r["localization"] = localization(model, str(data["prepared"]["val"]),
                                             str(data["synth"] / "groundings_val.jsonl"),
                                             num_workers=workers)
        r["eval_s"] = time.perf_counter() - t0
        results[name] = r
        print(f"[reproduce] evaluated {name} in {r['eval_s']:.0f}s", flush=True)
    return results


def arch_of(runs: dict) -> str:
    from loctex.engine.checkpoint import read_manifest, resolve
    return read_manifest(resolve(runs["loctex"]))["config"]["model"]["visual"]


def run_config(run_dir: Path) -> dict:
    from loctex.engine.checkpoint import read_manifest, resolve
    return read_manifest(resolve(run_dir))["config"]


# ---- 4. report -----------------------------------------------------------------------------------
ROWS = [  # (label, chart label, getter)
    ("linear probe mAP", "linear probe\nmAP", lambda r: r["linear_probe_mAP"]),
    ("dense probe mIoU, 10% labels", "dense mIoU\n10% labels", lambda r: r["dense_probe"]["10%"]["mIoU"]),
    ("dense probe mIoU, 50% labels", "dense mIoU\n50% labels", lambda r: r["dense_probe"]["50%"]["mIoU"]),
    ("dense probe mIoU, 100% labels", "dense mIoU\n100% labels", lambda r: r["dense_probe"]["100%"]["mIoU"]),
    ("pointing accuracy (traces)", "pointing acc.\n(traces)", lambda r: r["localization"]["pointing_acc"]),
    ("box pointing game (nouns)", "box pointing\n(nouns)", lambda r: r["localization"]["box_pointing_acc"]),
    ("retrieval R@1 image->text", "R@1\nimage->text", lambda r: r["localization"]["i2t_r1"]),
    ("retrieval R@1 text->image", "R@1\ntext->image", lambda r: r["localization"]["t2i_r1"]),
    ("mean KL(trace || attention)", None, lambda r: r["localization"]["mean_kl"]),  # not a %
]


def table_rows(results: dict) -> list[tuple[str, list[float | None]]]:
    rows = []
    for label, _, get in ROWS:
        vals = []
        for name in MODELS:
            try:
                vals.append(float(get(results[name])))
            except (KeyError, TypeError):
                vals.append(None)
        rows.append((label, vals))
    return rows


def print_table(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in MODELS:
        table.add_column(name, justify="right")
    for label, vals in table_rows(results):
        kl = label.startswith("mean KL")
        best = [v for v in vals if v is not None]
        best = (min if kl else max)(best) if best else None
        cells = []
        for v in vals:
            text = "—" if v is None else (f"{v:.3f}" if kl else f"{100 * v:.1f}")
            cells.append(f"[bold]{text}[/bold]" if v is not None and v == best and len(vals) > 1 else text)
        table.add_row(label, *cells)
    Console().print(table)


def bar_chart(results: dict, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    short = {label: chart for label, chart, _ in ROWS}
    rows = [(short[label], vals) for label, vals in table_rows(results) if short[label]]
    x = np.arange(len(rows))
    width = 0.26
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for k, name in enumerate(MODELS):
        vals = [100 * v[k] if v[k] is not None else 0.0 for _, v in rows]  # random: no text tower
        ax.bar(x + (k - 1) * width, vals, width, label=name)
    ax.set_xticks(x, [label for label, _ in rows], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_images, steps, probe_steps = BUDGETS["quick" if args.quick else "full"]
    n_images = args.num_images or n_images
    steps = args.steps or steps
    probe_steps = args.probe_steps or probe_steps

    data = prepare_data(out, args.data, n_images, args.seed)
    t_data = time.perf_counter() - t_start
    runs, pretrain_s = {}, {}
    for name in ("contrastive", "loctex"):
        t0 = time.perf_counter()
        runs[name] = pretrain(name, out, data, steps, args.seed, args.set)
        pretrain_s[name] = time.perf_counter() - t0
    cfg = run_config(runs["loctex"])
    size = cfg["data"]["image_size"]
    results = evaluate_all(out, data, runs, size, probe_steps, args.workers, args.seed)

    budget = {"images": json.loads((data["synth"] / "synth.json").read_text())["num_images"],
              "pretrain_steps": steps, "micro_batch_size": cfg["train"]["micro_batch_size"],
              "image_size": size, "visual": cfg["model"]["visual"], "probe_steps": probe_steps,
              "seed": args.seed, "overrides": args.set, "quick": args.quick}
    title = (f"LocTex vs contrastive-only, embedded set ({budget['images']} images, {steps} steps, "
             f"{budget['visual']} @ {size}px, seed {args.seed})")
    print_table(results, title)
    report = {"title": title, "budget": budget, "runs": {k: str(v) for k, v in runs.items()},
              "table": {label: dict(zip(MODELS, vals)) for label, vals in table_rows(results)},
              "results": results,
              "seconds": {"data": t_data, "pretrain": pretrain_s,
                          "eval": {k: v["eval_s"] for k, v in results.items()},
                          "total": time.perf_counter() - t_start}}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    bar_chart(results, out / "results.png", title)
    print(f"[reproduce] {out / 'results.json'}, {out / 'results.png'} "
          f"({report['seconds']['total']:.0f}s in all)")
    return 0
