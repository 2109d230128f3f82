"""Which narratives this rank reads, batch by batch: the order shared by every loader path.

:class:`EpochBatchSampler` is the contract: ``batch(epoch, k)`` is this rank's ``k``-th batch of
epoch ``epoch`` (narrative indices into the data set), a pure function of the seed, so the
DataLoader path, the tar-shard stream and the DALI sample source all read the same narratives, and a
run resumes at a global step (``start_step``) whatever the number of workers. Iterating yields
``[(index, epoch), ...]`` per batch (the data set takes the epoch for its augmentation decision);
``epochs=None`` is infinite.

* :class:`RankBatchSampler` (map-style data sets): epoch ``e`` is the permutation
  ``default_rng([seed, e]).permutation(N)`` (training) or ``arange(N)`` (evaluation). Global step
  ``k`` takes its slice ``[k*B*W, (k+1)*B*W)`` (``B`` micro batch, ``W`` world size) and rank ``r``
  the part ``[r*B, (r+1)*B)``, so the union over ranks is the global batch in rank order. With
  ``drop_last`` an epoch has ``N // (B*W)`` steps.
* :class:`TarShardBatchSampler` (tar shards, read one after the other): :func:`tar_shard_order`
  deals the shards to ranks per epoch; each rank cuts its own order into batches.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches, epoch after epoch, from global step ``start_step`` on. Subclasses set
    ``steps_per_epoch`` (the same on every rank, so distributed steps stay in lockstep) and
    define :meth:`batch`."""

    steps_per_epoch: int

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, start_step: int = 0,
                 epochs: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.start_step, self.epochs = int(start_step), epochs
        self._cache: tuple[int, np.ndarray] | None = None  # one epoch's order

    def batch(self, epoch: int, k: int) -> np.ndarray:
        """Narrative indices of this rank's batch ``k`` of ``epoch`` (may be short, or empty,
        at the end of an epoch without ``drop_last``)."""
        raise NotImplementedError

    def _epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def epoch_order(self, epoch: int) -> np.ndarray:
        """:meth:`_epoch_order`, cached for the epoch in progress (DALI asks once per sample)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._epoch_order(epoch))
        return self._cache[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch of the epoch) of global step ``step``, counted from epoch 0."""
        return divmod(int(step), self.steps_per_epoch)

    def __iter__(self):
        epoch, step = self.position(self.start_step)
        while self.epochs is None or epoch < self.epochs:
            for k in range(step, self.steps_per_epoch):
                idx = self.batch(epoch, k)
                if len(idx):
                    yield [(int(i), epoch) for i in idx]
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite sampler has no length; see steps_per_epoch")
        return max(0, self.epochs * self.steps_per_epoch - self.start_step)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None  # rebuilt where it is used (spawned DALI workers)
        return state


class RankBatchSampler(EpochBatchSampler):
    """A map-style data set: one global order per epoch, cut into global batches, this rank's
    slice of each (see the module doc)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 **kw):
        super().__init__(num_samples, batch_size, rank, world_size, **kw)
        global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = (self.num_samples // global_batch if self.drop_last
                                else math.ceil(self.num_samples / global_batch))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of "
                             f"{global_batch} ({self.batch_size} x {self.world_size} ranks)")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def batch(self, epoch: int, k: int) -> np.ndarray:
        lo = k * self.batch_size * self.world_size + self.rank * self.batch_size
        return self.epoch_order(epoch)[lo:min(lo + self.batch_size, self.num_samples)]


class TarShardBatchSampler(EpochBatchSampler):
    """Tar shards: this rank's :func:`tar_shard_order` cut into batches.
    ``steps_per_epoch = (N // world) // batch``, the same on every rank."""

    def __init__(self, shard_counts, batch_size: int, rank: int = 0, world_size: int = 1, **kw):
        self.shard_counts = np.asarray(shard_counts, np.int64)
        super().__init__(int(self.shard_counts.sum()), batch_size, rank, world_size, **kw)
        per_rank = self.num_samples // self.world_size
        self.steps_per_epoch = (per_rank // self.batch_size if self.drop_last
                                else -(-per_rank // self.batch_size))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples cannot give every one of "
                             f"{self.world_size} ranks a batch of {self.batch_size}")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return tar_shard_order(self.shard_counts, self.seed, epoch, self.rank, self.world_size,
                               self.shuffle)

    def batch(self, epoch: int, k: int) -> np.ndarray:
        return self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]


def tar_shard_order(shard_counts, seed: int, epoch: int, rank: int, world_size: int,
                    shuffle: bool = True) -> np.ndarray:
    """Global sample indices that ``rank`` visits in ``epoch``, in order.

    Shards are permuted per epoch (seeded) and dealt round-robin to ranks (``perm[rank::world]``);
    each shard's samples are permuted (seeded by epoch and shard). A rank reads its own shards one
    after the other - what streaming from object storage needs. Every rank gets exactly
    ``N // world_size`` samples, so distributed steps stay in lockstep and the number of steps per
    epoch is a constant: ranks whose shards hold more pass their tail samples, in order, to the ranks
    whose shards hold fewer. Position ``p`` of this order is what a resumed run restarts from.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    counts = np.asarray(shard_counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    n_shards = len(counts)
    perm = (np.random.default_rng([seed, epoch, 1]).permutation(n_shards) if shuffle
            else np.arange(n_shards))
    lists = []
    for r in range(world_size):
        parts = [np.zeros(0, np.int64)]
        for s in perm[r::world_size]:
            idx = np.arange(starts[s], starts[s + 1], dtype=np.int64)
            if shuffle:
                idx = np.random.default_rng([seed, epoch, 2, int(s)]).permutation(idx)
            parts.append(idx)
        lists.append(np.concatenate(parts))
    length = int(counts.sum()) // world_size
    surplus = np.concatenate([np.zeros(0, np.int64)] + [lst[length:] for lst in lists])
    taken = 0
    for r in range(rank):
        taken += length - min(length, len(lists[r]))
    deficit = length - min(length, len(lists[rank]))
    return np.concatenate([lists[rank][:length], surplus[taken:taken + deficit]])
