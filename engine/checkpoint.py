"""Checkpoints of a training run: saving, resuming, pruning, RNG states. Reading (the layout, the
manifest and its verification, safe loading, ``load_model``) is ``loctex.checkpoints``.

Saving. Every rank calls ``save``. A checkpoint is written under a ``tmp-`` tag; every rank then
checksums its share of the files (in parallel), rank 0 writes the manifest ``loctex_checkpoint.json``
(every file with its size and checksum, the step, the config, what the model needs to be rebuilt),
renames the directory to its final tag and replaces ``latest`` with ``os.replace``. A process killed
at any moment therefore leaves either the previous checkpoint as ``latest`` or the new one complete.
(Rank 0 renames, so ``checkpoints/`` must be on a file system all ranks share, as DeepSpeed assumes.)

A checkpoint that cannot be written (no space, read-only, quota) raises ``CheckpointError`` on every
rank with one line naming the directory, the bytes needed and the bytes free; the partial directory
is removed and ``latest`` stays on the last complete checkpoint. Free space is checked before writing
against the previous checkpoint's size (or, for the first one, the model's and optimizer's tensors).
Write errors inside DeepSpeed's ``save_checkpoint`` are held until it returns, because it ends with a
barrier that a rank raising early would leave the others waiting at; the ranks then agree to fail.

Resuming. Rank 0 picks the checkpoint (``train.resume``: ``auto`` the newest intact one, skipping
damaged ones by name; ``never`` none; a path that one) and tells the others, so they cannot disagree.
DeepSpeed's ``client_state`` (key ``loctex``) holds the step, the epoch, the position in the epoch,
rank 0's RNG states and the config; each rank's own RNG states are in ``rng_rank{R}.pt`` because
DeepSpeed writes ``client_state`` from rank 0 only. Every file is read weights-only
(``loctex.checkpoints.weights_only_loads``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loctex.checkpoints import (LATEST, MANIFEST, TMP_PREFIX, CheckpointError, file_entry,
                                find_latest, latest_named, read_manifest, refuse_foreign_types,
                                resolve, safe_load, step_dirs, tag_for, weights_only_loads)
from loctex.config import Config, to_dict

log = logging.getLogger(__name__)


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


# ---- collectives (no-ops in a single process) ----------------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- choosing the checkpoint to resume from ------------------------------------------------------
def resume_target(cfg: Config) -> Path | None:
    """Which checkpoint ``train.resume`` asks for: ``never`` -> None; ``auto`` -> the newest intact
    one of this run (None if there is none; ``CheckpointError`` if there are some and none is
    intact); a path -> that checkpoint (``CheckpointError`` if it is not an intact one). A checkpoint
    holding a type that loading would refuse is refused here already. Collective: rank 0 checks,
    every rank gets its answer (so no rank is left waiting in a load that another refused)."""
    mode = cfg.train.resume
    if mode == "never":
        return None
    answer = None
    if _rank() == 0:
        try:
            found = find_latest(checkpoint_dir(cfg)) if mode == "auto" else resolve(mode)
            if found is not None:
                refuse_foreign_types(found)
            answer = ("ok", None if found is None else str(found))
        except (CheckpointError, OSError) as exc:
            answer = ("error", str(exc))
    status, value = _from_rank0(answer)
    if status == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


# ---- saving --------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What the loop needs to continue where it stopped."""
    step: int = 0             # optimizer steps done
    epoch: int = 0            # data_position // batches per epoch (for the record)
    data_position: int = 0    # micro-batches each rank consumed since the start: the loader's
                              # start_step on resume (epoch and place in it follow from it)
    samples_seen: int = 0     # images, all ranks


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    for p in (Path(path), *Path(path).absolute().parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _tensor_bytes(engine, rank: int) -> int:
    """This rank's part of a checkpoint as its tensors predict it: the model (rank 0 writes it,
    except under ZeRO-3) and the optimizer's parameters and state (every rank its partition under
    ZeRO; rank 0 alone otherwise). Shared storage is counted once."""
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    if rank == 0 and engine.zero_optimization_stage() < 3:  # ZeRO-3's weights are the optimizer's
        for t in itertools.chain(engine.module.parameters(), engine.module.buffers()):
            add(t)
    if rank == 0 or getattr(engine, "save_zero_checkpoint", False):
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        masters = [p for group in getattr(inner, "param_groups", []) for p in group["params"]]
        # ZeRO-3 hands its fp32 partitions to the optimizer only while it steps
        masters += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
        for p in masters:
            add(p)
        for st in getattr(inner, "state", {}).values():
            for v in st.values():
                add(v)
    return total


def expected_bytes(engine, ckpt_dir: Path, rank: int) -> int:
    """The size the next checkpoint will have: the newest previous checkpoint's, else the sum over
    ranks of ``_tensor_bytes`` (collective; 95-96% of the first checkpoint of a 66k-parameter model
    under ZeRO 0-3, fp32 or bf16: the rest is the serialization's overhead)."""
    predicted = sum(_gather(_tensor_bytes(engine, rank)))
    for tag_dir in step_dirs(ckpt_dir)[::-1]:
        with contextlib.suppress(CheckpointError, KeyError, TypeError, OSError):
            files = read_manifest(tag_dir)["files"]
            listed = sum(e if isinstance(e, int) else e["size"] for e in files.values())
            return listed + (tag_dir / MANIFEST).stat().st_size
    return predicted


def _reason(exc: BaseException, directory: Path, needed: int) -> str:
    """One phrase for a failed write. torch.save reports a full disk as an opaque RuntimeError
    ("unexpected pos", "file write failed"), so that one is judged by the free space left."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if free_bytes(directory) < needed:
        return "no space left on device"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _held_write_errors(engine, directory: Path, needed: int):
    """Inside DeepSpeed's ``save_checkpoint``: a failed write is recorded (the yielded list) instead
    of raised, and this rank writes nothing more, so that every rank still reaches DeepSpeed's
    closing barrier and the ranks can fail together."""
    errors: list[str] = []

    def held(write):
        def call(*args, **kwargs):
            if errors:
                return None
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as exc:
                errors.append(_reason(exc, directory, needed))
                return None
        return call

    ce = engine.checkpoint_engine
    patched = [(ce, "save"), (engine, "_copy_recovery_script")]
    for obj, name in patched:
        setattr(obj, name, held(getattr(obj, name)))
    try:
        yield errors
    finally:
        for obj, name in patched:
            delattr(obj, name)  # the class's method again


def save(engine, cfg: Config, state: TrainState, rank: int, world_size: int,
         model_args: dict) -> Path:
    """Write the checkpoint of ``state.step`` (every rank calls this), make it ``latest``, and keep
    the newest ``train.keep_checkpoints``. ``model_args`` (vocab size, pad id) go to the manifest
    so that ``load_model`` can rebuild the model. Raises ``CheckpointError`` on every rank when the
    checkpoint cannot be written (nothing of it is left behind)."""
    ckpt_dir = checkpoint_dir(cfg)
    tag = tag_for(state.step)
    tmp, final = ckpt_dir / (TMP_PREFIX + tag), ckpt_dir / tag
    needed = expected_bytes(engine, ckpt_dir, rank)
    written: list[Path] = [tmp]

    def agree(error: str | None) -> None:
        errors = [e for e in _gather(error) if e]
        if errors:
            if rank == 0:
                for path in written:
                    shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(f"checkpoint {tag} not written to {ckpt_dir}: {errors[0]} "
                                  f"({needed:,} bytes needed, {free_bytes(ckpt_dir):,} bytes free)")

    error = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_dir.glob(TMP_PREFIX + "*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            if free_bytes(ckpt_dir) < needed:
                error = "not enough free space"
        except OSError as exc:
            error = _reason(exc, ckpt_dir, needed)
    agree(error)

    try:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as exc:
        error = _reason(exc, ckpt_dir, needed)
    agree(error)

    client_state = {"loctex": {
        "step": state.step, "epoch": state.epoch, "data_position": state.data_position,
        "samples_seen": state.samples_seen, "world_size": world_size,
        "micro_batch_size": cfg.train.micro_batch_size, "rng": rng_state(),
        "config": to_dict(cfg)}}
    with _held_write_errors(engine, ckpt_dir, needed) as errors:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state,
                               save_latest=False)  # ends with a barrier: every rank's files are written
    agree(errors[0] if errors else None)

    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    files: dict = {}
    for share in _gather({n: file_entry(tmp / n) for n in names[rank::world_size]}):
        files.update(share)
    if rank == 0:
        try:
            _publish(ckpt_dir, tmp, final, written, {
                "tag": tag, "step": state.step, "epoch": state.epoch,
                "data_position": state.data_position, "world_size": world_size,
                "zero_stage": cfg.zero.stage, "precision": cfg.precision, "model_args": model_args,
                "config": to_dict(cfg), "files": dict(sorted(files.items())),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except OSError as exc:
            error = _reason(exc, ckpt_dir, needed)
    agree(error)
    if rank == 0:
        prune(ckpt_dir, cfg.train.keep_checkpoints, intact=final)
    return final


def _publish(ckpt_dir: Path, tmp: Path, final: Path, written: list[Path], manifest: dict) -> None:
    """Manifest, rename to the final tag, ``latest`` (rank 0)."""
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved by an earlier run (train.resume=never)
        shutil.rmtree(final)
    os.rename(tmp, final)
    written.append(final)
    latest_tmp = ckpt_dir / (LATEST + ".tmp")
    try:
        with open(latest_tmp, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, ckpt_dir / LATEST)
    except OSError:
        with contextlib.suppress(OSError):
            latest_tmp.unlink()
        raise
    _fsync_dir(ckpt_dir)


def prune(ckpt_dir: Path, keep: int, intact: Path | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` <= 0: keep all). Never deleted: the
    newest intact checkpoint (``intact``, e.g. the one just written; else verified here) and the
    one ``latest`` names."""
    if keep <= 0:
        return
    ckpt_dir = Path(ckpt_dir)
    if intact is None:
        with contextlib.suppress(CheckpointError):
            intact = find_latest(ckpt_dir)
    named = latest_named(ckpt_dir)
    protected = {p.name for p in (intact, named) if p is not None}
    for old in step_dirs(ckpt_dir)[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


# ---- resuming ------------------------------------------------------------------------------------
def load(engine, tag_dir: Path, rank: int, world_size: int, cfg: Config) -> TrainState:
    """Load a checkpoint (as ``resume_target`` returns it) into the DeepSpeed engine (every rank)
    and restore this rank's RNG. A file holding anything but tensors, plain values and DeepSpeed's
    bookkeeping types raises ``CheckpointError`` before it is unpickled."""
    with weights_only_loads():
        load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    info = client["loctex"]
    state = TrainState(step=info["step"], epoch=info["epoch"], data_position=info["data_position"],
                       samples_seen=info["samples_seen"])
    same_layout = (info["world_size"] == world_size
                   and info["micro_batch_size"] == cfg.train.micro_batch_size)
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(safe_load(rng_file))
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
