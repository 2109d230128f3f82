"""The fair localization comparison: contrastive-only pre-training never trains its cross-modal
attention head (``loss.localization_weight=0`` freezes it at its initialization), so before any
localization metric the head is trained on the frozen model -- visual and text towers, in eval mode
(BatchNorm statistics and dropout fixed) -- with the localization loss, for as many steps as LocTex
trained its head jointly, on the same batches in the same order. Only the head's parameters change;
the localization rows then compare what the two backbones let a head learn."""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .optim import train_steps


def freeze_all_but_head(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Only ``model.attention`` trains; -> its parameters."""
    model.requires_grad_(False)
    model.attention.requires_grad_(True)
    model.eval()
    return list(model.attention.parameters())


def train_attention_head(model, batches: Iterable[dict], steps: int, device: str = "cpu") -> list[float]:
    """Train ``model.attention`` for ``steps`` batches with ``LocTexLoss.localization_loss`` and
    the config's optimizer settings and schedule; everything else stays as it is. -> the losses."""
    from loctex.losses import build_loss

    cfg = model.train_config
    params = freeze_all_but_head(model.to(device))
    loss_fn = build_loss(cfg)

    def loss_of_batch(batch):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return loss_fn.localization_loss(model(batch), batch)

    return train_steps(loss_of_batch, params, batches, steps, cfg.optim)


def train_head_of_run(run_dir: str | Path, steps: int, out: str | Path, device: str = "cpu") -> dict:
    """Load the run's model, train its head on the run's own data order, save the head's state
    dict to ``out`` (atomically)."""
    from loctex.checkpoints import load_model
    from loctex.data.loader import build_loader

    t0 = time.perf_counter()
    model = load_model(run_dir)
    losses = train_attention_head(model, build_loader(model.train_config, train=True), steps, device)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.attention.state_dict().items()}, tmp)
    os.replace(tmp, out)
    return {"weights": str(out), "steps": steps, "loss_first": losses[0],
            "loss_last": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t0}


def load_with_head(run_dir: str | Path, head: str | Path | None = None):
    """The run's model, with its attention head replaced by ``head`` (a ``train_head_of_run`` file)."""
    from loctex.checkpoints import load_model
    model = load_model(run_dir)
    if head is not None:
        model.attention.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
    return model.eval()
