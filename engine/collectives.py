"""The few collectives the loop and validation need, as no-ops in a single process.

Every function here must be called by every rank in the same order (they are collectives)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def any_rank(flag: bool | torch.Tensor, device) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place)."""
    if initialized():
        dist.all_reduce(t)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over the ranks (in place)."""
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return (all_sum(t) / world_size()).tolist()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' ``t`` (equal shapes) concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)
