"""Steps with a NaN/inf loss or gradient change nothing, and a model that is not finite is never
saved.

DeepSpeed already skips such steps itself under fp16 and bf16 (its overflow check, ZeRO 1-2) and
under fp32 with ZeRO 1-2 (an invalid gradient norm); it does not under fp32 without ZeRO, and it
never looks at the loss. :class:`StepGuard` wraps the torch optimizer's ``step`` so that the update
is skipped when the step's loss was not finite on any rank or a gradient it is handed is not: one
all-reduce per step decides for every rank, so the replicas stay identical. ``BatchNorm`` running
statistics are updated by the forward, before anyone knows the step will be skipped:
:class:`BufferSnapshot` puts them back.
"""
from __future__ import annotations

import types

import torch

from .collectives import any_rank


class StepGuard:
    """Installed on the optimizer DeepSpeed drives (``optimizer.step`` is replaced).

    Per optimizer step: :meth:`begin`, :meth:`observe_loss` for each micro-batch, then DeepSpeed
    calls ``step`` (once, or once per parameter group under ZeRO 1-2 -- the decision is taken at
    the first call, by every rank, and holds for the rest of the step); :attr:`skipped` tells."""

    def __init__(self, optimizer: torch.optim.Optimizer, device):
        self.optimizer, self.device = optimizer, device
        self._step = optimizer.step
        guard = self

        def step(opt, *args, **kwargs):
            return guard._guarded_step(*args, **kwargs)
        # a method of the optimizer: LR schedulers re-bind ``step.__func__`` to it
        optimizer.step = types.MethodType(step, optimizer)
        self.begin()

    def begin(self) -> None:
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._decision = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        # kept on the device: no synchronization per micro-batch
        self._loss_bad |= ~torch.isfinite(loss.detach()).all().to(self.device)

    @property
    def skipped(self) -> bool:
        return bool(self._decision)

    @property
    def loss_was_finite(self) -> bool:
        """Whether this step's loss was finite on every rank (a collective)."""
        return not any_rank(self._loss_bad, self.device)

    def _grads_bad(self) -> torch.Tensor:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        return ~norms.isfinite().all().to(self.device)

    def _guarded_step(self, *args, **kwargs):
        if self._decision is None:
            self._decision = any_rank(self._loss_bad | self._grads_bad(), self.device)
        if self._decision:
            return None
        return self._step(*args, **kwargs)


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm running statistics) to restore after a skipped
    step. A few hundred KB for a ResNet-50; copied once per step."""

    def __init__(self, module: torch.nn.Module):
        self.live = list(module.buffers())
        self.saved = [b.detach().clone() for b in self.live]

    def take(self) -> None:
        with torch.no_grad():
            for s, b in zip(self.saved, self.live):
                s.copy_(b)

    def restore(self) -> None:
        with torch.no_grad():
            for s, b in zip(self.saved, self.live):
                b.copy_(s)


def model_is_finite(module: torch.nn.Module, device) -> bool:
    """Every parameter and floating buffer of every rank is finite (ZeRO-3: each rank checks its
    own partition). A collective."""
    bad = False
    for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        data = getattr(t, "ds_tensor", t)  # ZeRO-3 keeps the rank's partition here
        if data.numel() and not bool(torch.isfinite(data.detach()).all()):
            bad = True
            break
    return not any_rank(bad, device)
