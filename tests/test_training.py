"""A few hundred optimizer steps of the LocTex model lower both losses (issue 3).

A plain loop over batches from the in-test generator (tests/_model_batches.py, DESIGN §2.4): colored
shapes whose color/shape words carry a mouse trace around the shape. The product's training loop
(DeepSpeed, schedules, checkpoints) is the engine's and is tested there.
"""
import math
import statistics

import torch

from loctex.config import load_config
from loctex.losses import build_loss
from loctex.models import build_model

from _model_batches import VOCAB, make_batch


def test_a_few_hundred_steps_lower_both_losses():
    cfg = load_config("configs/embedded.yaml", [
        "model.embed_dim=128", "model.attention_dim=64",
        "model.text.layers=1", "model.text.width=64", "model.text.heads=4"])
    torch.manual_seed(0)
    model = build_model(cfg, len(VOCAB)).train()
    objective = build_loss(cfg)
    optimizer = torch.optim.AdamW(model.param_groups(), betas=cfg.optim.betas)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(200):
        batch = make_batch(8, 64, generator)  # 64 px -> a 2x2 attention grid
        out = objective(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        history.append((out["loss_contrastive"].item(), out["loss_localization"].item()))

    def mean(rows):
        return [statistics.mean(col) for col in zip(*rows)]

    (c0, l0), (c1, l1) = mean(history[:10]), mean(history[-20:])
    assert all(math.isfinite(v) for v in (c0, l0, c1, l1))
    assert c1 < 0.8 * c0, f"contrastive loss {c0:.3f} -> {c1:.3f}"
    assert l1 < 0.8 * l0, f"localization loss {l0:.3f} -> {l1:.3f}"
