"""``results.png``: transfer score against the share of target labels (every backbone) and against
the share of pre-training images (LocTex and contrastive-only, with supervised and random init at
100% as reference lines); mean ± sd over seeds."""
from __future__ import annotations

import math
from pathlib import Path

from .plan import BACKBONES, CAPTIONED, pct
from .report import COLORS, LABELS


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, c, metric = report["study"], report["cells"], report["metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lf = st["transfer"]["label_fractions"]
    for b in BACKBONES:
        _curve(left, lf, [c["transfer"][b][pct(f)] for f in lf], b)
    left.set_xscale("log")
    left.set_xlabel("target labels (%)")
    left.set_title("target-data efficiency (100% pre-training data)", fontsize=10)
    df = st["pretrain"]["data_fractions"]
    lab = st["transfer"]["pretrain_label_fraction"]
    for b in CAPTIONED:
        _curve(right, df, [c["pretraining_data"][b][pct(d)] for d in df], b)
    for b in ("supervised", "random"):
        right.axhline(100 * c["transfer"][b][pct(lab)]["mean"], ls="--", color=COLORS[b],
                      label=f"{LABELS[b]} (100% images)")
    right.set_xscale("log")
    right.set_xlabel("pre-training images (%)")
    right.set_title(f"pre-training-data efficiency ({100 * lab:.0f}% labels)", fontsize=10)
    for ax, xs in ((left, lf), (right, df)):
        ax.set_xticks([100 * x for x in xs], [f"{100 * x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{st['name']}: mean ± sd over {st['seeds']} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curve(ax, fractions, cells, backbone) -> None:
    """One backbone's mean ± sd (in %) against fractions (in %)."""
    ax.errorbar([100 * f for f in fractions], [100 * x["mean"] for x in cells],
                yerr=[0 if math.isnan(x["sd"]) else 100 * x["sd"] for x in cells],
                marker="o", capsize=3, color=COLORS[backbone], label=LABELS[backbone])
