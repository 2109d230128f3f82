"""``build_loader``: the one entry to the input pipeline. It opens the data set (a prepared directory
or tar shards), picks the batch sampler for it (:mod:`loctex.data.samplers`), the backend
(:func:`loctex.data.backends.resolve_backend`) and returns a loader of DESIGN §2.4 batches:

=====================  ===================  ==========================================
data set               backend              loader
=====================  ===================  ==========================================
prepared directory     torch                :class:`NarrativeLoader` (DataLoader workers)
tar shards             torch                :class:`~loctex.data.shards.ShardLoader`
either                 dali (training)      :class:`~loctex.data.dali.DaliLoader`
=====================  ===================  ==========================================

Each batch index travels with its epoch to the data set, whose augmentation is a function of
(seed, epoch, index): ``start_step=k`` resumes exactly where a run that had done ``k`` steps would
continue, whatever the number of workers.
"""
from __future__ import annotations

import torch

from loctex.data.backends import resolve_backend
from loctex.data.collate import collate_batch
from loctex.data.dali import DaliLoader
from loctex.data.dataset import NarrativeDataset
from loctex.data.samplers import EpochBatchSampler, RankBatchSampler, TarShardBatchSampler
from loctex.data.shards import ShardLoader, ShardNarrativeDataset, ShardStream, is_shard_dir
from loctex.data.workers import stop_signals_blocked, worker_init


class NarrativeLoader:
    """Iterable of §2.4 batches over a map-style data set (DataLoader workers);
    ``steps_per_epoch``, ``dataset``, ``sampler`` and ``skipped`` (unreadable images replaced so
    far, summed over the workers) are exposed."""

    backend = "torch"

    def __init__(self, dataset: NarrativeDataset, sampler: EpochBatchSampler, num_workers: int,
                 pin_memory: bool | None = None, prefetch_factor: int = 4):
        self.dataset, self.sampler = dataset, sampler
        self.steps_per_epoch = sampler.steps_per_epoch
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        dataset.share_skip_counts(num_workers)
        kw = {}
        if num_workers > 0:
            kw = {"persistent_workers": True, "prefetch_factor": prefetch_factor,
                  "worker_init_fn": worker_init}
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=num_workers,
            pin_memory=pin_memory, **kw)

    def __iter__(self):
        with stop_signals_blocked():  # the workers start here
            return iter(self.loader)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def __len__(self) -> int:
        return len(self.sampler)


def open_dataset(prepared, data_cfg, *, train: bool, seed: int) -> NarrativeDataset:
    """The map-style data set over a prepared directory or a shard directory."""
    cls = ShardNarrativeDataset if is_shard_dir(prepared) else NarrativeDataset
    return cls(prepared, data_cfg, train=train, seed=seed)


def build_loader(cfg, prepared: str | None = None, *, rank: int = 0, world_size: int = 1,
                 train: bool = True, start_step: int = 0, batch_size: int | None = None,
                 num_workers: int | None = None, epochs: int | None = None,
                 seed: int | None = None):
    """The loader for a :class:`loctex.config.Config` (``data.*``, ``train.micro_batch_size``,
    ``seed``). ``train=True``: shuffled, augmented, drop_last, infinite (``epochs=None``) from
    global step ``start_step``, on the configured backend. ``train=False``: in order, no
    augmentation, last partial batch kept, one pass by default, always the torch path (evaluation
    sets are small, and DALI batches have a fixed size). ``prepared`` defaults to
    ``data.prepared`` (train) or ``data.val_prepared`` (eval)."""
    data = cfg.data
    prepared = prepared or (data.prepared if train else (data.val_prepared or data.prepared))
    if not prepared:
        raise ValueError("no prepared directory: set data.prepared")
    seed = cfg.seed if seed is None else seed
    batch_size = batch_size or cfg.train.micro_batch_size
    num_workers = data.num_workers if num_workers is None else num_workers
    if not train and epochs is None:
        epochs = 1
    dataset = open_dataset(prepared, data, train=train, seed=seed)
    shards = isinstance(dataset, ShardNarrativeDataset)
    order = dict(seed=seed, shuffle=train, drop_last=train, start_step=start_step, epochs=epochs)
    if shards:  # each rank reads its own shards, one after the other
        sampler = TarShardBatchSampler(dataset.packed.store.shard_counts, batch_size, rank,
                                       world_size, **order)
    else:
        sampler = RankBatchSampler(len(dataset), batch_size, rank, world_size, **order)
    if train and resolve_backend(data.backend) == "dali":
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        return DaliLoader(dataset, sampler, data.image_size, num_workers, device_id=device_id)
    if shards:
        return ShardLoader(ShardStream(dataset, sampler), num_workers)
    return NarrativeLoader(dataset, sampler, num_workers)
