"""``loctex eval localization``: does the cross-modal attention follow the mouse traces?

On held-out narratives (a prepared directory), for every token with a localization target
(``loc_mask`` and a rendered trace, DESIGN §3), with the attention ``A`` of the trained model and the
trace heat map ``P`` rendered on the same grid with the run's ``loss.sigma``:

* mean KL(P ‖ A) over target tokens;
* pointing accuracy: the fraction of target tokens whose attention arg-max cell lies in the
  smallest set of cells holding half of P's mass (``metrics.pointing_hits``);
* retrieval recall@1 both ways (image -> caption, caption -> image; another caption of the same
  image counts as a hit), from the same forward passes;
* on the embedded set, with ``--groundings`` (``groundings_{split}.jsonl`` from ``loctex synth``):
  the box pointing game: for each token inside a noun that names an object, whether the center of
  the attention's arg-max cell falls in that object's box. Tokens are matched to nouns through the
  tokenizer's character offsets; this needs the evaluation images un-cropped (the eval loader
  resizes the whole image, so normalized boxes stay valid).
Needs the whole model: ``--weights`` is a run or checkpoint directory.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="a run directory or a checkpoint directory")
    p.add_argument("--data", required=True, help="a prepared directory (`loctex prepare`)")
    p.add_argument("--groundings", help="groundings_{split}.jsonl of `loctex synth`: adds the box "
                                        "pointing game")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sigma", type=float, default=None, help="default: the run's loss.sigma")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--out", help="write the result as JSON here")


def main(args: argparse.Namespace) -> int:
    from loctex.checkpoints import load_model
    model = load_model(args.weights)
    result = evaluate(model, args.data, args.groundings, args.batch_size, args.sigma, args.workers)
    print_result(result, f"localization — {args.weights}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def print_result(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def load_groundings(path: str | Path) -> dict[tuple[str, int], list[tuple[int, int, list]]]:
    """``(image_id, annotator_id) -> [(noun start, noun end, box), ...]`` (character spans of the
    caption; boxes normalized x0, y0, x1, y1)."""
    out = {}
    with open(path) as f:
        for line in f:
            g = json.loads(line)
            out[(str(g["image_id"]), int(g["annotator_id"]))] = [
                (*x["noun_span"], x["box"]) for x in g["groundings"]]
    return out


def token_boxes(dataset, indices, length: int, groundings) -> torch.Tensor:
    """[B, L, 4] boxes of the batch's tokens that lie inside a grounded noun; NaN elsewhere.
    Position p of ``tokens`` is ``[CLS]`` + the caption's tokens (character offsets from the
    prepared set), so caption token j sits at p = j + 1."""
    packed = dataset.packed
    boxes = torch.full((len(indices), length, 4), float("nan"))
    for b, i in enumerate(indices):
        key = (packed.image_id(packed.image_index(i)), int(packed.arrays["narr_annotator"][i]))
        _, chars, _ = packed.tokens(i)
        for c0, c1, box in groundings.get(key, ()):
            inside = (chars[:, 0] < c1) & (chars[:, 1] > c0)
            pos = np.flatnonzero(inside) + 1
            pos = pos[pos < length - 1]  # truncated captions lose their tail (and [SEP] is last)
            boxes[b, pos] = torch.tensor(box, dtype=torch.float32)
    return boxes


@torch.no_grad()
def evaluate(model, prepared: str, groundings: str | None = None, batch_size: int = 32,
             sigma: float | None = None, num_workers: int = 2) -> dict:
    """Localization (KL, pointing, box pointing) and retrieval recall@1 of ``model`` on the
    narratives of ``prepared``, in one pass (no augmentation: whole images resized)."""
    import loctex.kernels as K
    from loctex.data.collate import collate_batch
    from loctex.data.dataset import NarrativeDataset

    from .metrics import box_pointing_hits, kl_divergence, pointing_hits, recall_at_k

    cfg = model.train_config
    sigma = cfg.loss.sigma if sigma is None else sigma
    dataset = NarrativeDataset(prepared, cfg.data, train=False, seed=cfg.seed)
    ground = load_groundings(groundings) if groundings else None

    def collate(samples):
        return collate_batch(samples), [s["index"] for s in samples]

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate)
    model.eval()
    kl_sum, hits, targets, box_hits, box_tokens = 0.0, 0, 0, 0, 0
    image_embs, text_embs, image_of = [], [], []
    for batch, indices in loader:
        out = model(batch, return_attention=True)
        attn = out["attention"].float()
        image_embs.append(out["image_emb"])
        text_embs.append(out["text_emb"])
        image_of += [dataset.packed.image_index(i) for i in indices]
        heat, valid = K.render_traces(batch["points_xy"], batch["point_weights"],
                                      batch["token_ranges"], attn.shape[-2:], sigma)
        target = valid & batch["loc_mask"]
        if target.any():
            kl_sum += float(kl_divergence(heat[target], attn[target]).sum())
            hits += int(pointing_hits(attn[target], heat[target]).sum())
            targets += int(target.sum())
        if ground is not None:
            boxes = token_boxes(dataset, indices, attn.shape[1], ground)
            has = ~boxes[..., 0].isnan() & batch["attention_mask"]
            if has.any():
                box_hits += int(box_pointing_hits(attn[has], boxes[has]).sum())
                box_tokens += int(has.sum())
    image_of = torch.tensor(image_of)
    same_image = image_of[:, None] == image_of[None, :]  # another caption of the image counts
    image_emb, text_emb = torch.cat(image_embs), torch.cat(text_embs)
    result = {
        "narratives": len(image_of),
        "target_tokens": targets,
        "mean_kl": kl_sum / targets if targets else float("nan"),
        "pointing_acc": hits / targets if targets else float("nan"),
        "i2t_r1": recall_at_k(image_emb, text_emb, 1, same_image),
        "t2i_r1": recall_at_k(text_emb, image_emb, 1, same_image),
        "sigma": sigma,
    }
    if ground is not None:
        result.update(box_pointing_acc=box_hits / box_tokens if box_tokens else float("nan"),
                      grounded_tokens=box_tokens)
    return result
