"""Checkpoints: save and resume a DeepSpeed run, and load a trained model for eval/export on CPU.

Layout of ``RUN/checkpoints/``::

    latest                 the tag of the newest complete checkpoint (replaced atomically)
    step_00000100/         DeepSpeed's files, rng_rank{R}.pt per rank, and loctex_checkpoint.json
    tmp-step_00000200/     a checkpoint being written (never read; removed by the next save)

A checkpoint is written under a ``tmp-`` tag, all ranks meet at a barrier, then rank 0 writes the
manifest ``loctex_checkpoint.json`` (every file with its size, the step, the config, what the model
needs to be rebuilt), renames the directory to its final tag and replaces ``latest`` with
``os.replace``. A process killed at any moment therefore leaves either the previous checkpoint as
``latest`` or the new one complete. On resume a checkpoint counts only if its manifest is there and
every file listed has its recorded size; otherwise the newest one that passes is taken. (Rank 0
renames, so ``checkpoints/`` must be on a file system all ranks share, as DeepSpeed assumes.)

DeepSpeed's ``client_state`` (key ``loctex``) holds the step, the epoch, the position in the epoch,
rank 0's RNG states and the config; each rank's own RNG states are in ``rng_rank{R}.pt`` because
DeepSpeed writes ``client_state`` from rank 0 only.

``load_model(path)`` rebuilds the model on CPU in float32 from a run directory, its ``checkpoints/``
directory or one tag directory; ZeRO shards are consolidated with ``deepspeed.utils.zero_to_fp32``.
Every ``.pt`` is read with ``torch.load(weights_only=True)`` (three DeepSpeed bookkeeping classes
allow-listed), never unpickled blindly (DESIGN §2.2).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loctex.config import Config, from_dict, to_dict

log = logging.getLogger(__name__)

MANIFEST = "loctex_checkpoint.json"
LATEST = "latest"
TMP_PREFIX = "tmp-"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


# ---- RNG states (stored as tensors and plain lists: loadable with weights_only=True) --------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- finding a checkpoint ------------------------------------------------------------------------
def read_manifest(tag_dir: Path) -> dict | None:
    """The manifest of a complete checkpoint, or None (with the reason logged) if it is not one."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        log.warning("checkpoint %s is incomplete (no readable manifest: %s)", tag_dir, exc)
        return None
    for name, size in manifest.get("files", {}).items():
        f = tag_dir / name
        if not f.is_file() or f.stat().st_size != size:
            log.warning("checkpoint %s is incomplete (%s missing or truncated)", tag_dir, name)
            return None
    return manifest


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir``: the one ``latest`` names if it passes
    validation, else the highest step that does."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and read_manifest(ckpt_dir / tag) is not None:
            return ckpt_dir / tag
        log.warning("%s names %r, which is not a complete checkpoint; looking for an older one",
                    latest, tag)
    for tag_dir in sorted(_step_dirs(ckpt_dir), key=lambda p: -_step_of(p)):
        if read_manifest(tag_dir) is not None:
            return tag_dir
    return None


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]


def _step_of(tag_dir: Path) -> int:
    return int(_TAG_RE.match(tag_dir.name).group(1))


def resolve(path: str | Path) -> Path:
    """A run directory, a ``checkpoints/`` directory or a tag directory -> the tag directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        if read_manifest(path) is None:
            raise ValueError(f"{path}: the checkpoint is incomplete (see the log)")
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if (ckpt_dir / LATEST).is_file() or _step_dirs(ckpt_dir):
            found = find_latest(ckpt_dir)
            if found is None:
                raise ValueError(f"{ckpt_dir}: no complete checkpoint")
            return found
    raise FileNotFoundError(f"{path}: not a run directory, a checkpoints directory or a checkpoint")


def resume_target(cfg: Config) -> Path | None:
    """Which checkpoint ``train.resume`` asks for: ``never`` -> None; ``auto`` -> the newest complete
    one of this run (None if there is none); a path -> that checkpoint (an error if it is not one)."""
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return find_latest(checkpoint_dir(cfg))
    return resolve(mode)


# ---- saving --------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What the loop needs to continue where it stopped."""
    step: int = 0             # optimizer steps done
    epoch: int = 0            # data_position // batches per epoch (for the record)
    data_position: int = 0    # micro-batches each rank consumed since the start: the loader's
                              # start_step on resume (epoch and place in it follow from it)
    samples_seen: int = 0     # images, all ranks


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(engine, cfg: Config, state: TrainState, rank: int, world_size: int,
         model_args: dict) -> Path:
    """Write the checkpoint of ``state.step`` (every rank calls this), make it ``latest``, and keep
    the newest ``train.keep_checkpoints``. ``model_args`` (vocab size, pad id) go to the manifest
    so that ``load_model`` can rebuild the model."""
    ckpt_dir = checkpoint_dir(cfg)
    tag = tag_for(state.step)
    tmp = ckpt_dir / (TMP_PREFIX + tag)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    client_state = {"loctex": {
        "step": state.step, "epoch": state.epoch, "data_position": state.data_position,
        "samples_seen": state.samples_seen, "world_size": world_size,
        "micro_batch_size": cfg.train.micro_batch_size, "rng": rng_state(),
        "config": to_dict(cfg)}}
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state,
                           save_latest=False)  # ends with a barrier: every rank's files are written
    final = ckpt_dir / tag
    if rank == 0:
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"tag": tag, "step": state.step, "epoch": state.epoch,
                    "data_position": state.data_position, "world_size": world_size,
                    "zero_stage": cfg.zero.stage, "precision": cfg.precision,
                    "model_args": model_args, "config": to_dict(cfg), "files": files,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved by an earlier run (train.resume=never)
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = ckpt_dir / (LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, ckpt_dir / LATEST)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, cfg.train.keep_checkpoints)
    _barrier()
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (the one ``latest`` names stays)."""
    if keep <= 0:
        return
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else ""
    dirs = sorted(_step_dirs(ckpt_dir), key=_step_of)
    for old in dirs[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


# ---- resuming ------------------------------------------------------------------------------------
def load(engine, tag_dir: Path, rank: int, world_size: int, cfg: Config) -> TrainState:
    """Load a checkpoint into the DeepSpeed engine (every rank) and restore this rank's RNG."""
    load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    info = client["loctex"]
    state = TrainState(step=info["step"], epoch=info["epoch"], data_position=info["data_position"],
                       samples_seen=info["samples_seen"])
    same_layout = (info["world_size"] == world_size
                   and info["micro_batch_size"] == cfg.train.micro_batch_size)
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        # another layout: the shards differ, so continue from the same number of images
        log.warning("resuming %s with another layout (world %d -> %d, micro-batch %d -> %d): "
                    "the data position is converted through the images seen (the order differs "
                    "from an uninterrupted run's) and the RNG reseeded",
                    tag_dir, info["world_size"], world_size, info["micro_batch_size"],
                    cfg.train.micro_batch_size)
        state.data_position = state.samples_seen // (world_size * cfg.train.micro_batch_size)
        seed = cfg.seed * 1_000_003 + state.step * 1009 + rank
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)
    return state


# ---- loading a trained model (eval, export) ------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """DeepSpeed's bookkeeping classes that its optimizer-state files pickle."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads():
    """Make every ``torch.load`` inside (DeepSpeed's zero_to_fp32 asks for weights_only=False)
    a weights-only load with DeepSpeed's few classes allow-listed."""
    original = torch.load
    allowed = _deepspeed_safe_globals()

    def safe_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(f, *args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full float32 state dict of the model of a checkpoint (ZeRO shards merged)."""
    tag_dir = Path(tag_dir)
    manifest = read_manifest(tag_dir)
    if manifest is None:
        raise ValueError(f"{tag_dir}: the checkpoint is incomplete")
    model_states = sorted(tag_dir.glob("*model_states.pt"))[0]  # rank 0's (stage 3: one per rank)
    with _weights_only_loads():
        module = torch.load(model_states, map_location="cpu")["module"]
        if manifest["zero_stage"] == 0:
            sd = dict(module)
        else:
            # the fp32 master weights, merged from every rank's optimizer shard
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            # frozen parameters have no optimizer state: take the module's own copy (stages 1-2
            # store it whole; a stage-3 partitioned placeholder is empty and is left out)
            for k, v in module.items():
                if k not in sd and v.numel() > 0:
                    sd[k] = v
    return {k: (v.float() if v.is_floating_point() else v).detach() for k, v in sd.items()}


def load_model(path: str | Path, strict: bool = True):
    """The trained model of a run / checkpoint, on CPU, float32, in eval mode."""
    from loctex.models import build_model

    tag_dir = resolve(path)
    manifest = read_manifest(tag_dir)
    cfg = from_dict(manifest["config"])
    model = build_model(cfg, **manifest["model_args"])
    sd = consolidated_state_dict(tag_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{tag_dir}: state dict does not match the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    model.loaded_from = str(tag_dir)
    model.train_config = cfg
    return model
