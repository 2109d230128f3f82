"""``build_loader``: the torch input pipeline (DataLoader workers) with deterministic per-rank
sharding, ``drop_last``, and resumption at a global step.

Order. Epoch ``e`` is the permutation ``default_rng([seed, e]).permutation(N)`` (training) or
``arange(N)`` (evaluation). Global step ``k`` of the epoch takes the slice
``[k*B*W, (k+1)*B*W)`` of it (``B`` = micro batch, ``W`` = world size) and rank ``r`` its
``[r*B, (r+1)*B)`` part, so the union over ranks is the global batch in rank order. With
``drop_last`` an epoch has ``N // (B*W)`` steps. Each index travels with its epoch to the data set,
whose augmentation is a function of (seed, epoch, index): ``start_step=k`` resumes exactly where a
run that had done ``k`` steps would continue, whatever the number of workers.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from loctex.data.collate import collate_batch
from loctex.data.dataset import NarrativeDataset

log = logging.getLogger(__name__)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches as lists of ``(index, epoch)``; infinite when ``epochs`` is None."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, start_step: int = 0,
                 epochs: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.start_step, self.epochs = int(start_step), epochs
        global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = (self.n // global_batch if drop_last
                                else math.ceil(self.n / global_batch))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.n} samples cannot fill one global batch of {global_batch} "
                             f"({self.batch_size} x {self.world_size} ranks) with drop_last")

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        epoch, step = divmod(self.start_step, self.steps_per_epoch)
        gb = self.batch_size * self.world_size
        while self.epochs is None or epoch < self.epochs:
            order = self.order(epoch)
            for k in range(step, self.steps_per_epoch):
                lo = k * gb + self.rank * self.batch_size
                idx = order[lo:min(lo + self.batch_size, self.n)]
                if len(idx):
                    yield [(int(i), epoch) for i in idx]
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite sampler has no length; see steps_per_epoch")
        return max(0, self.epochs * self.steps_per_epoch - self.start_step)


def _worker_init(_):
    torch.set_num_threads(1)


class NarrativeLoader:
    """Iterable of §2.4 batches; ``steps_per_epoch``, ``dataset``, ``sampler`` and ``skipped``
    (unreadable images replaced so far, summed over the workers) are exposed."""

    def __init__(self, dataset: NarrativeDataset, sampler: ShardedBatchSampler, num_workers: int,
                 pin_memory: bool | None = None, prefetch_factor: int = 4):
        self.dataset, self.sampler = dataset, sampler
        self.steps_per_epoch = sampler.steps_per_epoch
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        dataset.share_skip_counts(num_workers)
        kw = {}
        if num_workers > 0:
            kw = {"persistent_workers": True, "prefetch_factor": prefetch_factor,
                  "worker_init_fn": _worker_init}
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=num_workers,
            pin_memory=pin_memory, **kw)

    def __iter__(self):
        return iter(self.loader)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def __len__(self) -> int:
        return len(self.sampler)


def build_loader(cfg, prepared: str | None = None, *, rank: int = 0, world_size: int = 1,
                 train: bool = True, start_step: int = 0, batch_size: int | None = None,
                 num_workers: int | None = None, epochs: int | None = None,
                 seed: int | None = None) -> NarrativeLoader:
    """The torch-backend loader for a :class:`loctex.config.Config` (``data.*``,
    ``train.micro_batch_size``, ``seed``). ``train=True``: shuffled, augmented, drop_last, infinite
    (``epochs=None``) starting at global step ``start_step``. ``train=False``: in order, no
    augmentation, last partial batch kept, one pass by default. ``prepared`` defaults to
    ``data.prepared`` (train) or ``data.val_prepared`` (eval)."""
    data = cfg.data
    prepared = prepared or (data.prepared if train else (data.val_prepared or data.prepared))
    if not prepared:
        raise ValueError("no prepared directory: set data.prepared")
    seed = cfg.seed if seed is None else seed
    batch_size = batch_size or cfg.train.micro_batch_size
    num_workers = data.num_workers if num_workers is None else num_workers
    from loctex.data import backends  # issue 6: shard directories, data.backend dispatch
    dataset = backends.open_dataset(prepared, data, train=train, seed=seed)
    if not train and epochs is None:
        epochs = 1
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world_size, seed=seed,
                                  shuffle=train, drop_last=train, start_step=start_step,
                                  epochs=epochs)
    return backends.make_loader(cfg, dataset, sampler, num_workers, train=train)
