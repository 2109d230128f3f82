"""From the units' result files to the study's answer: every cell as mean ± sd over seeds, each of
the paper's claims as a paired difference (by seed) with its 95% t interval and a verdict, the
data-efficiency read-outs; written as ``results.json``, ``results.md`` and (``plots.py``)
``results.png``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import stats
from .plan import BACKBONES, CAPTIONED, Unit, pct, read_result, write_json_atomic
from .study import Study, as_dict

LOCALIZATION = (  # (key in the result, label, higher is better)
    ("pointing_acc", "pointing accuracy (traces)", True),
    ("box_pointing_acc", "box pointing game (nouns)", True),
    ("mean_kl", "KL(trace ‖ attention)", False),
    ("i2t_r1", "retrieval R@1 image→text", True),
    ("t2i_r1", "retrieval R@1 text→image", True),
)
LABELS = {"random": "random init", "supervised": "supervised (categories)",
          "contrastive": "contrastive-only", "loctex": "LocTex"}
COLORS = {"random": "tab:gray", "supervised": "tab:green", "contrastive": "tab:blue",
          "loctex": "tab:red"}


class Results:
    """Per-seed values of every measured cell (lists in seed order, so paired across backbones)."""

    def __init__(self, out: Path, study: Study):
        self.out, self.study = Path(out), study
        self.seeds = range(study.seeds)

    def _values(self, kind: str, backbone: str, data: float = 1.0, labels=None,
                key: str = "score") -> list[float]:
        vals = []
        for s in self.seeds:
            r = read_result(self.out, Unit(kind, backbone, s, data, labels))
            if r is None:
                raise FileNotFoundError(f"no result for {Unit(kind, backbone, s, data, labels).name}")
            v = r.get(key)
            vals.append(math.nan if v is None else float(v))
        return vals

    def transfer(self, backbone: str, labels: float, data: float = 1.0) -> list[float]:
        return self._values("transfer", backbone, data, labels)

    def linear(self, backbone: str) -> list[float]:
        return self._values("linear", backbone)

    def localization(self, backbone: str, key: str) -> list[float]:
        return self._values("localization", backbone, key=key)

    def pretrain_curve(self, backbone: str) -> dict[float, list[float]]:
        lf = self.study.transfer.pretrain_label_fraction
        return {d: self.transfer(backbone, lf, d) for d in self.study.pretrain.data_fractions}

    def transfer_mean_over_labels(self, backbone: str) -> list[float]:
        rows = [self.transfer(backbone, f) for f in self.study.transfer.label_fractions]
        return [stats.mean(col) for col in zip(*rows)]

    def pretrain_mean_over_data(self, backbone: str) -> list[float]:
        rows = list(self.pretrain_curve(backbone).values())
        return [stats.mean(col) for col in zip(*rows)]


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str
    measure: str                                   # what the difference is of
    values: Callable[[Results, str], list[float]]  # per-seed values of one backbone
    better: str
    other: str
    higher_is_better: bool = True


CLAIMS = (
    Claim("transfer", "LocTex transfers better than contrastive-only pre-training",
          "fine-tuned transfer, mean over the label fractions",
          Results.transfer_mean_over_labels, "loctex", "contrastive"),
    Claim("pretraining_data", "LocTex needs less pre-training data than contrastive-only",
          "transfer at each pre-training data fraction, mean over the fractions (its curve lies "
          "above: a given score with fewer images)",
          Results.pretrain_mean_over_data, "loctex", "contrastive"),
    Claim("vs_supervised", "LocTex transfers better than supervised pre-training on the same "
          "images (the paper: comparable to ImageNet-supervised with 10x less data)",
          "fine-tuned transfer, mean over the label fractions",
          Results.transfer_mean_over_labels, "loctex", "supervised"),
    Claim("linear_probe", "LocTex's frozen features classify better than contrastive-only's "
          "(the paper: +4 points VOC07 mAP over earlier vision-language pre-training)",
          "linear-probe mAP (VOC07 protocol)", Results.linear, "loctex", "contrastive"),
    Claim("localization", "LocTex's attention follows the traces better than contrastive-only's "
          "(its head trained on the frozen model for as many steps)",
          "pointing accuracy", lambda r, b: r.localization(b, "pointing_acc"),
          "loctex", "contrastive"),
    Claim("localization_boxes", "LocTex's attention finds the named objects better than "
          "contrastive-only's (same head budget)",
          "box pointing game", lambda r, b: r.localization(b, "box_pointing_acc"),
          "loctex", "contrastive"),
    Claim("pretraining_helps", "check: LocTex pre-training beats random initialization",
          "fine-tuned transfer, mean over the label fractions",
          Results.transfer_mean_over_labels, "loctex", "random"),
)


def judge(claim: Claim, results: Results) -> dict:
    a, b = claim.values(results, claim.better), claim.values(results, claim.other)
    iv = stats.paired_interval(a, b)
    return {"key": claim.key, "statement": claim.statement, "measure": claim.measure,
            "difference": f"{claim.better} - {claim.other}", **iv,
            "higher_is_better": claim.higher_is_better,
            "verdict": stats.verdict(iv["lo"], iv["hi"], claim.higher_is_better)}


def _means(curve: dict[float, list[float]]) -> tuple[list[float], list[float]]:
    return list(curve), [stats.mean(v) for v in curve.values()]


def efficiency(results: Results) -> dict:
    """How much data each backbone needs to reach the other's score at 100%, read on the mean
    curves (interpolated linearly in log fraction): pre-training images (LocTex vs contrastive-only)
    and target labels (LocTex vs supervised)."""
    out = {}
    curves = {b: results.pretrain_curve(b) for b in CAPTIONED}
    for who, other in (("loctex", "contrastive"), ("contrastive", "loctex")):
        xs, ys = _means(curves[who])
        target = stats.mean(curves[other][1.0])
        rel, f = stats.crossing(xs, ys, target)
        out[f"pretrain_data_{who}_to_reach_{other}"] = {"relation": rel, "fraction": f,
                                                         "target": target}
    lfs = results.study.transfer.label_fractions
    for who, other in (("loctex", "supervised"), ("supervised", "loctex")):
        ys = [stats.mean(results.transfer(who, f)) for f in lfs]
        target = stats.mean(results.transfer(other, lfs[-1]))
        rel, f = stats.crossing(lfs, ys, target)
        out[f"target_labels_{who}_to_reach_{other}"] = {"relation": rel, "fraction": f,
                                                         "target": target}
    return out


def cells(results: Results) -> dict:
    s = results.study
    return {
        "transfer": {b: {pct(f): stats.summary(results.transfer(b, f))
                         for f in s.transfer.label_fractions} for b in BACKBONES},
        "pretraining_data": {b: {pct(d): stats.summary(v)
                                 for d, v in results.pretrain_curve(b).items()} for b in CAPTIONED},
        "linear_probe": {b: stats.summary(results.linear(b)) for b in BACKBONES},
        "localization": {key: {b: stats.summary(results.localization(b, key)) for b in CAPTIONED}
                         for key, _, _ in LOCALIZATION},
    }


def build(out: Path, study: Study, meta: dict) -> dict:
    results = Results(out, study)
    return {**meta, "study": as_dict(study), "metric": _metric(study),
            "cells": cells(results), "claims": [judge(c, results) for c in CLAIMS],
            "efficiency": efficiency(results)}


def _metric(study: Study) -> str:
    from .measures import METRICS
    return METRICS[study.transfer.task]


# ---- writing ---------------------------------------------------------------------------------
def _cell(c: dict, percent: bool = True) -> str:
    m, s = c["mean"], c["sd"]
    if math.isnan(m):
        return "—"
    k = 100 if percent else 1
    digits = 1 if percent else 3
    sd = "" if math.isnan(s) else f" ± {k * s:.{digits}f}"
    return f"{k * m:.{digits}f}{sd}"


def interval_text(c: dict, percent: bool) -> str:
    k, digits = (100, 1) if percent else (1, 3)
    lo = "—" if math.isnan(c["lo"]) else f"{k * c['lo']:+.{digits}f}"
    hi = "—" if math.isnan(c["hi"]) else f"{k * c['hi']:+.{digits}f}"
    return f"{k * c['diff']:+.{digits}f} [{lo}, {hi}]"


def _fraction(e: dict) -> str:
    return {"<=": "≤ ", ">": "> ", "=": ""}[e["relation"]] + f"{100 * e['fraction']:.0f}%"


def _reused(report: dict) -> str:
    n = report.get("reused_units", 0)
    return f"; {n} of {report['units']} units were reused from an earlier run" if n else ""


def markdown(report: dict) -> str:
    st, c, metric = report["study"], report["cells"], report["metric"]
    lf = st["transfer"]["label_fractions"]
    df = st["pretrain"]["data_fractions"]
    n = st["seeds"]
    lines = [f"# LocTex in miniature: `{st['name']}` study", "",
             f"{report['date']} · `{report['command']}` · {report['wall_s'] / 60:.1f} min wall "
             f"({report['host']}){_reused(report)}", "",
             "## What this budget covers", "", st["covers"].strip(), "",
             f"Embedded set: {st['images']} synthetic images ({100 * (1 - st['val_fraction']):.0f}% "
             f"train, the rest val), {st['image_size']} px; every backbone the same "
             f"{report['arch']}; pre-training {st['pretrain']['steps']} steps of "
             f"{report['micro_batch_size']} images for every method and data fraction; "
             f"{n} pre-training seed{'s' * (n != 1)} (each cell: mean ± sd over seeds); transfer: "
             f"{st['transfer']['task']} ({metric}) fine-tuned end to end for "
             f"{st['transfer']['steps']} steps of {st['transfer']['batch_size']} images.", "",
             "## Claims", "",
             "Difference = the first backbone minus the second, paired by seed, mean with its 95% "
             "t interval, in points. *supported*: the interval lies wholly on the claimed side of "
             "0; *contradicted*: wholly on the other; *inconclusive* otherwise, at this budget.", "",
             "| claim | measure | difference [95% CI] | verdict |", "|---|---|---|---|"]
    for cl in report["claims"]:
        lines.append(f"| {cl['statement']} | {cl['measure']} | "
                     f"{interval_text(cl, True)} | **{cl['verdict']}** |")
    e = report["efficiency"]
    lines += ["", "Data efficiency, read on the mean curves (interpolated in log fraction; "
              "descriptive only -- where the curves are flat within their sd these fractions are "
              "noise, and the paired claims above are what to read):", "",
              f"- pre-training images LocTex needs to match contrastive-only on 100%: "
              f"{_fraction(e['pretrain_data_loctex_to_reach_contrastive'])}; contrastive-only to "
              f"match LocTex on 100%: {_fraction(e['pretrain_data_contrastive_to_reach_loctex'])}",
              f"- target labels LocTex needs to match supervised pre-training on 100% of the labels: "
              f"{_fraction(e['target_labels_loctex_to_reach_supervised'])}; supervised to match "
              f"LocTex: {_fraction(e['target_labels_supervised_to_reach_loctex'])}", "",
              f"## Target-data efficiency: fine-tuned {st['transfer']['task']} ({metric}, %)", "",
              "| backbone | " + " | ".join(f"{100 * f:.0f}% labels" for f in lf) + " |",
              "|---|" + "---:|" * len(lf)]
    for b in BACKBONES:
        lines.append(f"| {LABELS[b]} | " + " | ".join(_cell(c["transfer"][b][pct(f)]) for f in lf) + " |")
    lines += ["", f"## Pre-training-data efficiency ({metric} at "
              f"{100 * st['transfer']['pretrain_label_fraction']:.0f}% labels, %)", "",
              "| backbone | " + " | ".join(f"{100 * d:.0f}% images" for d in df) + " |",
              "|---|" + "---:|" * len(df)]
    for b in CAPTIONED:
        lines.append(f"| {LABELS[b]} | " + " | ".join(_cell(c["pretraining_data"][b][pct(d)])
                                                     for d in df) + " |")
    lines += ["", "## Linear classification (VOC07 protocol, frozen features, mAP %)", "",
              "| " + " | ".join(LABELS[b] for b in BACKBONES) + " |", "|" + "---:|" * len(BACKBONES),
              "| " + " | ".join(_cell(c["linear_probe"][b]) for b in BACKBONES) + " |", "",
              "## Localization and retrieval (val narratives)", "",
              "contrastive-only's attention head was trained on its frozen model for as many steps "
              "as LocTex trained its own.", "",
              "| metric | contrastive-only | LocTex |", "|---|---:|---:|"]
    for key, label, _ in LOCALIZATION:
        percent = key != "mean_kl"
        lines.append(f"| {label}{' (%)' if percent else ''} | " + " | ".join(
            _cell(c["localization"][key][b], percent) for b in CAPTIONED) + " |")
    lines += ["", "![results](results.png)", ""]
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    write_json_atomic(out / "results.json", report)
    (out / "results.md").write_text(markdown(report))
    from .plots import plot
    plot(report, out / "results.png")
