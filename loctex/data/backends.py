"""Backend choice (``data.backend: auto|dali|torch``) and the data-source kind (a prepared directory
or tar shards) for :func:`loctex.data.loader.build_loader`, which calls :func:`make_loader`.

* ``torch``: DataLoader workers (PIL reduced-size decode), the reference semantics.
* ``dali``: :class:`loctex.data.dali.DaliLoader`; on a machine without a CUDA GPU it runs the
  CPU-only pipeline (what the tests use). Falls back to torch with a warning when DALI is not
  installed.
* ``auto``: DALI when it is importable *and* a CUDA GPU is present, else torch.

Evaluation loaders (``train=False``: in order, last partial batch kept) always use the torch path:
they are small, and DALI batches have a fixed size.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("loctex.data")
_announced: set = set()


def _say(msg: str, warn: bool = False) -> None:
    """Log once per process (loaders are rebuilt every epoch)."""
    if msg in _announced:
        return
    _announced.add(msg)
    if warn:
        log.warning(msg)
    elif log.isEnabledFor(logging.INFO) and logging.getLogger().hasHandlers():
        log.info(msg)
    else:  # logging not configured (scripts, the engine): say it anyway, once per process
        print(f"[loctex] {msg}", file=sys.stderr, flush=True)


def resolve_backend(requested: str) -> str:
    """``auto|dali|torch`` -> ``dali|torch``, logging the choice and why."""
    import torch

    from loctex.data.dali import dali_available
    requested = (requested or "auto").lower()
    if requested not in ("auto", "dali", "torch"):
        raise ValueError(f"data.backend must be auto, dali or torch; got {requested!r}")
    gpu = torch.cuda.is_available()
    if requested == "torch":
        _say("data backend: torch (data.backend=torch)")
        return "torch"
    if not dali_available():
        _say(f"data backend: torch (data.backend={requested}; nvidia.dali is not importable - "
             f"pip install nvidia-dali-cuda120)", warn=requested == "dali")
        return "torch"
    if requested == "auto" and not gpu:
        _say("data backend: torch (data.backend=auto; DALI is installed but no CUDA GPU)")
        return "torch"
    _say(f"data backend: dali ({'GPU decode' if gpu else 'CPU-only pipeline, no CUDA GPU'}; "
         f"data.backend={requested})")
    return "dali"


def open_dataset(prepared, data_cfg, *, train: bool, seed: int):
    """The map-style data set over a prepared directory or a shard directory."""
    from loctex.data.shards import ShardNarrativeDataset, is_shard_dir
    if is_shard_dir(prepared):
        return ShardNarrativeDataset(prepared, data_cfg, train=train, seed=seed)
    from loctex.data.dataset import NarrativeDataset
    return NarrativeDataset(prepared, data_cfg, train=train, seed=seed)


def make_loader(cfg, dataset, sampler, num_workers: int, *, train: bool):
    """Wrap a data set and its (per-rank, resumable) batch sampler into the configured backend."""
    from loctex.data.shards import ShardBatchSampler, ShardNarrativeDataset

    backend = resolve_backend(cfg.data.backend) if train else "torch"
    if isinstance(dataset, ShardNarrativeDataset) and not isinstance(sampler, ShardBatchSampler):
        # Shards are read per rank, shard after shard: same epochs/steps/start_step semantics.
        sampler = ShardBatchSampler(dataset.packed.store.shard_counts, sampler.batch_size,
                                    sampler.rank, sampler.world_size, seed=sampler.seed,
                                    shuffle=sampler.shuffle, drop_last=sampler.drop_last,
                                    start_step=sampler.start_step, epochs=sampler.epochs)
    if backend == "dali":
        import torch

        from loctex.data.dali import DaliLoader
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        return DaliLoader(dataset, sampler, cfg.data.image_size, num_workers, device_id=device_id)
    if isinstance(dataset, ShardNarrativeDataset):
        from loctex.data.shards import ShardLoader, ShardStream
        return ShardLoader(ShardStream(dataset, sampler), num_workers)
    from loctex.data.loader import NarrativeLoader
    return NarrativeLoader(dataset, sampler, num_workers)

