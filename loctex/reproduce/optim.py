"""The optimizer settings of the in-process trainings (the supervised baseline, the attention
head): the engine's (engine/optim.py) -- AdamW, no weight decay on tensors with ndim < 2, linear
warmup then cosine decay to ``optim.min_lr_ratio`` (``loctex.schedule``) -- so that they train like
the engine's runs."""
from __future__ import annotations

import torch
from torch import nn

from loctex.schedule import lr_multiplier



def adamw(params: list[nn.Parameter], optim) -> torch.optim.AdamW:
    """AdamW with the engine's settings; no weight decay on tensors with ndim < 2."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr,
                             betas=tuple(optim.betas), eps=1e-8)


def train_steps(loss_of_batch, params: list[nn.Parameter], batches, steps: int, optim) -> list[float]:
    """``steps`` updates of ``params`` with AdamW, the warmup-cosine schedule and gradient clipping
    of ``optim`` (the engine's settings); ``loss_of_batch(batch)`` gives each step's loss.
    -> the losses."""
    opt = adamw(params, optim)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, optim.warmup_steps, steps, optim.min_lr_ratio))
    losses = []
    batches = iter(batches)
    for _ in range(steps):
        loss = loss_of_batch(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
