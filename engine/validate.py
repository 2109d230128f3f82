"""Periodic validation and the attention-map PNG grid.

Every rank runs the model on its shard of the validation set (ZeRO-3 needs every rank in each
forward), with equal batch counts on all ranks (the last incomplete global batch is left out, so
the contrastive loss sees the training global batch). Reported:

    val_loss, val_loss_contrastive, val_loss_localization   means over the validation batches
    i2t_r1, i2t_r5, t2i_r1, t2i_r5    image->text and text->image retrieval recall@1/5 over the
                                      whole validation set (a caption of the same image counts)
    loc_acc                           localization (pointing) accuracy: the fraction of target tokens
                                      whose attention arg-max cell lies in the half-mass set of their
                                      rendered trace (``loctex.eval.metrics.pointing_hits``)
    val_images                        how many images were scored

Retrieval positives come from each batch's ``index`` (the narratives actually loaded, after any
bad-image replacement) through ``image_of``, so a replaced image cannot shift them.

``attention_grid`` draws, for the first validation images, the image and, for a few words of its
caption, the word's attention map beside its rendered trace (matplotlib Agg). Both panels of a word
share one colour scale, from 0 to the larger of their peaks, in units of the uniform map (1/cells),
and each title gives its peak as a multiple of uniform: flat attention looks flat.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import loctex.kernels as K
from loctex.data.augment import IMAGENET_MEAN, IMAGENET_STD
from loctex.eval.metrics import pointing_hits, recall_at_k
from loctex.losses import build_loss

from .collectives import all_mean, gather_rows
from .devices import to_device

# perceptually uniform: equal steps in value look like equal steps in colour
COLORMAP = "viridis"
# words not worth showing in the grid (they have traces, but rarely a place)
STOPWORDS = {"a", "an", "the", "and", "of", "in", "on", "is", "are", "with", "this", "that", "to",
             "it", "at", "we", "can", "see", "there", "which", "its", "some", "image", "picture",
             "in this", "i", "left", "right", "side", "top", "bottom", "background"}


@torch.no_grad()
def validate(model, batches, cfg, device, keep_for_grid: int = 0,
             image_of=None) -> tuple[dict, dict | None]:
    """Run the validation ``batches`` (this rank's, equally many and equally sized on every rank)
    through ``model`` (the DeepSpeed engine or a plain module). ``image_of(batch["index"])`` -> the
    image id of each row makes another caption of the same image a retrieval hit (None: only a
    row's own caption is). Returns (metrics, grid sample or None): the sample holds the first
    ``keep_for_grid`` items of this rank's first batch."""
    was_training = model.training
    model.eval()
    sums = np.zeros(3)
    n_batches = 0
    image_embs, text_embs, image_ids = [], [], []
    hits = torch.zeros(2, dtype=torch.float64)  # hits, targets
    sample = None
    objective = build_loss(cfg)
    for batch in batches:
        if image_of is not None:
            image_ids.append(image_of(batch["index"]))
        batch = to_device(batch, device)
        out = model(batch, return_attention=True)
        losses = objective(out, batch)
        sums += [float(losses["loss"]), float(losses["loss_contrastive"]),
                 float(losses["loss_localization"])]
        n_batches += 1
        image_embs.append(out["image_emb"].float())
        text_embs.append(out["text_emb"].float())
        attn = out["attention"].float()
        heat, valid = K.render_traces(batch["points_xy"].float(), batch["point_weights"].float(),
                                      batch["token_ranges"], attn.shape[-2:], cfg.loss.sigma)
        target = valid & batch["loc_mask"].bool()
        if target.any():
            h = pointing_hits(attn[target].cpu(), heat[target].cpu())
            hits += torch.tensor([float(h.sum()), float(h.numel())], dtype=torch.float64)
        if sample is None and keep_for_grid:
            n = min(keep_for_grid, batch["images"].shape[0])
            # the trace is drawn finer than the feature grid, with its points on top
            fine, _ = K.render_traces(batch["points_xy"].float(), batch["point_weights"].float(),
                                      batch["token_ranges"], (32, 32), cfg.loss.sigma)
            sample = {"images": batch["images"][:n].float().cpu(),
                      "tokens": batch["tokens"][:n].cpu(), "attention": attn[:n].cpu(),
                      "heat": fine[:n].cpu(), "target": target[:n].cpu(),
                      "points_xy": batch["points_xy"].float().cpu(),
                      "token_ranges": batch["token_ranges"][:n].cpu()}
    if was_training:
        model.train()
    losses = all_mean(list(sums / max(n_batches, 1)), device)
    hits = all_mean(hits.tolist(), device)
    image_emb = gather_rows(torch.cat(image_embs)).cpu()
    text_emb = gather_rows(torch.cat(text_embs)).cpu()
    positives = None
    if image_of is not None:
        all_ids = gather_rows(torch.cat(image_ids).to(device)).cpu()
        positives = all_ids[:, None] == all_ids[None, :]
    metrics = {
        "val_loss": losses[0], "val_loss_contrastive": losses[1], "val_loss_localization": losses[2],
        "i2t_r1": recall_at_k(image_emb, text_emb, 1, positives),
        "i2t_r5": recall_at_k(image_emb, text_emb, 5, positives),
        "t2i_r1": recall_at_k(text_emb, image_emb, 1, positives),
        "t2i_r5": recall_at_k(text_emb, image_emb, 5, positives),
        "loc_acc": hits[0] / hits[1] if hits[1] > 0 else float("nan"),
        "val_images": int(image_emb.shape[0]),
    }
    return metrics, sample


def _denormalize(img: torch.Tensor) -> np.ndarray:
    x = img * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def choose_words(tokens: torch.Tensor, target: torch.Tensor, decode, k: int) -> list[int]:
    """Up to ``k`` token positions with a localization target, content words first."""
    positions = [int(t) for t in torch.nonzero(target).flatten()]
    words = {t: decode(int(tokens[t])) for t in positions}

    def content(t):
        w = words[t].strip("#Ġ▁ ").lower()
        return len(w) > 2 and w.isalpha() and w not in STOPWORDS

    ranked = [t for t in positions if content(t)] + [t for t in positions if not content(t)]
    seen, out = set(), []
    for t in ranked:  # one panel per distinct word
        if words[t] not in seen:
            seen.add(words[t])
            out.append(t)
        if len(out) == k:
            break
    return sorted(out)


def attention_grid(sample: dict, path: Path, decode=None, words_per_image: int = 3,
                   title: str = "") -> Path:
    """One row per image: the image, then per chosen word its attention map (one block per grid
    cell) and its rendered trace with the word's trace points, both over the image, on the word's
    shared colour scale (see the module docstring). ``decode(token_id) -> str`` labels the words."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = decode or (lambda i: f"#{i}")
    n = sample["images"].shape[0]
    cols = 1 + 2 * words_per_image
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.4), squeeze=False)
    for r in range(n):
        img = _denormalize(sample["images"][r])
        S = img.shape[0]
        extent = (0, S, S, 0)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title("image", fontsize=7)
        words = choose_words(sample["tokens"][r], sample["target"][r], decode, words_per_image)
        for j in range(words_per_image):
            ax_a, ax_t = axes[r, 1 + 2 * j], axes[r, 2 + 2 * j]
            if j < len(words):
                t = words[j]
                w = decode(int(sample["tokens"][r, t]))
                # as multiples of the uniform map, so that maps over different grids compare
                attn = sample["attention"][r, t].numpy() * sample["attention"][r, t].numel()
                trace = sample["heat"][r, t].numpy() * sample["heat"][r, t].numel()
                top = max(float(attn.max()), float(trace.max()), 1e-12)
                # the attention is shown cell by cell (its real resolution), the trace smooth
                for ax, m, name, interp in ((ax_a, attn, "attn", "nearest"),
                                            (ax_t, trace, "trace", "bilinear")):
                    ax.imshow(img)
                    ax.imshow(m, cmap=COLORMAP, vmin=0.0, vmax=top, alpha=0.5, extent=extent,
                              interpolation=interp)
                    ax.set_title(f"{name}: {w}\npeak {m.max():.2f}x uniform", fontsize=7)
                s, e = (int(v) for v in sample["token_ranges"][r, t])
                pts = sample["points_xy"][s:e].numpy() * S
                ax_t.plot(pts[:, 0], pts[:, 1], ".", color="white", markersize=2)
                ax_t.set_xlim(0, S)
                ax_t.set_ylim(S, 0)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
