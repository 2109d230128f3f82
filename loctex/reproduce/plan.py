"""The units of work of a study and the order they run in.

A unit is one pre-training, one attention-head training, or one measurement of one backbone for
one seed. Each writes its result to ``OUT/units/<kind>/<name>.json`` atomically (a temporary file
renamed into place) when it finishes, and a unit whose file is there is not run again: an
interrupted study continues where it stopped, and a study re-run with more seeds reuses the
seeds it has. Units are ordered seed by seed, so an interrupted study holds whole seeds.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .study import Study

# the backbones compared, in table order; all are the same ResNet trained with the same seed, data
# order and step budget (random: none)
BACKBONES = ("random", "supervised", "contrastive", "loctex")
# the ones pre-trained through the engine from captions: they have a text tower (localization,
# retrieval) and a pre-training-data curve
CAPTIONED = ("contrastive", "loctex")
KINDS = ("pretrain", "head", "linear", "transfer", "localization")


def pct(fraction: float) -> str:
    return f"{round(100 * fraction):03d}"


@dataclass(frozen=True)
class Unit:
    kind: str                     # one of KINDS
    backbone: str                 # one of BACKBONES
    seed: int
    data: float = 1.0             # share of the pre-training images
    labels: float | None = None   # share of the target labels (transfer)

    @property
    def name(self) -> str:
        name = f"{self.backbone}-d{pct(self.data)}-s{self.seed}"
        return name if self.labels is None else f"{name}-l{pct(self.labels)}"

    def result_path(self, out: Path) -> Path:
        return Path(out) / "units" / self.kind / f"{self.name}.json"

    def pretraining(self) -> "Unit":
        """The pre-training unit whose backbone this unit measures."""
        return Unit("pretrain", self.backbone, self.seed, self.data)


def plan(study: Study) -> list[Unit]:
    units = []
    label_fractions = study.transfer.label_fractions
    for seed in range(study.seeds):
        units.append(Unit("pretrain", "supervised", seed))
        for backbone in CAPTIONED:
            units += [Unit("pretrain", backbone, seed, d) for d in study.pretrain.data_fractions]
        # contrastive-only never trained its attention head: train it on the frozen model before
        # any localization metric (loctex's head trained jointly, for the same number of steps)
        units.append(Unit("head", "contrastive", seed))
        for backbone in BACKBONES:
            units.append(Unit("linear", backbone, seed))
            units += [Unit("transfer", backbone, seed, 1.0, f) for f in label_fractions]
        for backbone in CAPTIONED:
            units += [Unit("transfer", backbone, seed, d, study.transfer.pretrain_label_fraction)
                      for d in study.pretrain.data_fractions if d != 1.0]
            units.append(Unit("localization", backbone, seed))
    return units


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that ``path`` is either absent or complete, whenever we are killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_result(out: Path, unit: Unit) -> dict | None:
    path = unit.result_path(out)
    return json.loads(path.read_text()) if path.is_file() else None


def run_units(units: list[Unit], out: Path, execute: Callable[[Unit], dict]) -> int:
    """Run every unit whose result file is missing (in order) and write its result; -> how many
    were already there (reused)."""
    reused = 0
    for i, unit in enumerate(units, 1):
        path = unit.result_path(out)
        if path.is_file():
            reused += 1
            continue
        t0 = time.perf_counter()
        print(f"[reproduce] {i}/{len(units)} {unit.kind} {unit.name}", flush=True)
        result = execute(unit)
        write_json_atomic(path, result)
        score = f", score {result['score']:.4f}" if isinstance(result.get("score"), float) else ""
        print(f"[reproduce] {unit.kind} {unit.name}: {time.perf_counter() - t0:.0f} s{score}",
              flush=True)
    return reused
