"""Optimizer and learning-rate schedule.

* Parameter groups come from the model (``LocTexModel.param_groups``): visual backbone + heads at
  ``optim.lr``, textual backbone at ``optim.text_lr``, and no weight decay on tensors with ndim < 2
  (norms, biases, the logit scale).
* ``optim.name=adamw``: ``torch.optim.AdamW`` (``fused=True`` on CUDA). ``optim.name=lamb`` (very
  large batches): apex ``FusedLAMB`` when importable, else DeepSpeed's ``FusedLamb`` (a CUDA op it
  builds), else -- on CPU, where neither runs -- ``Lamb`` below, the same update in plain PyTorch.
* Schedule: linear warmup over ``optim.warmup_steps``, then cosine decay to
  ``lr * optim.min_lr_ratio`` at ``train.max_steps``; one multiplier for every group, so the
  visual/textual ratio stays fixed.
"""
from __future__ import annotations

import logging

import torch

from loctex.config import Config
from loctex.schedule import lr_multiplier

log = logging.getLogger(__name__)


class WarmupCosine:
    """Picklable ``lr_lambda`` (a LambdaLR with a plain function would not save its state)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.max_steps, self.min_ratio)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020) in plain PyTorch: Adam's update scaled per tensor by the trust ratio
    ``‖w‖ / ‖update‖`` (1 where either norm is 0). Bias-corrected moments, decoupled weight decay
    inside the update, as apex's FusedLAMB. For CPU runs; CUDA uses the fused versions."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                w = p.float()
                if group["weight_decay"]:
                    update.add_(w, alpha=group["weight_decay"])
                w_norm, u_norm = w.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                    torch.ones_like(w_norm))
                p.add_((update * trust * -group["lr"]).to(p.dtype))
        return loss


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg.optim)
    # any other module (e.g. the classification baseline): one lr, no decay on ndim < 2
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [g for g in (
        {"name": "decay", "params": decay, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.optim.lr, "weight_decay": 0.0},
    ) if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: Config, on_cuda: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, cfg)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=1e-8,
                                 weight_decay=o.weight_decay, fused=on_cuda or None)
    if o.name == "lamb":
        if on_cuda:
            try:
                from apex.optimizers import FusedLAMB
                return FusedLAMB(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            except ImportError:
                pass
            try:
                from deepspeed.ops.lamb import FusedLamb
                return FusedLamb(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            except Exception as exc:  # noqa: BLE001 - the op build can fail in many ways
                log.warning("DeepSpeed FusedLamb unavailable (%s); using the PyTorch LAMB", exc)
        return Lamb(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be adamw or lamb, got {o.name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    fn = WarmupCosine(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
