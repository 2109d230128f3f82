"""Checkpoints that survive hostile files, damaged files and full or read-only disks.

The engine side runs in this process: one gloo rank and a DeepSpeed engine over a two-layer model,
saved and resumed with ``loctex.engine.checkpoint`` exactly as the trainer calls it. The reading side
(``load_model``, export) reads fake checkpoints made consistent with their manifests, so that only the
check under test can stop them.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch

import loctex.checkpoints
from loctex.checkpoints import (MANIFEST, CheckpointError, damage, deepspeed_types, file_entry,
                                find_latest, load_model, refuse_foreign_types, resolve,
                                safe_load)
from loctex.config import Config, load_config, to_dict
from loctex.engine import checkpoint as ckpt

from test_engine import _free_port


# ---- one gloo rank and small DeepSpeed engines ---------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    import deepspeed
    import torch.distributed as dist

    from loctex.engine.trainer import _skip_deepspeed_shm_op
    if dist.is_initialized():
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Small(torch.nn.Module):
    """Parameter groups named like LocTex's (visual / textual), a BatchNorm buffer."""

    def __init__(self, width: int):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width))
        self.textual = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.textual(self.visual(x)).float().pow(2).mean()


def _config(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [f"run_dir={run_dir}", "train.micro_batch_size=4",
                              "train.keep_checkpoints=0", *overrides])


def _engine(cfg: Config, width: int = 8):
    import deepspeed

    from loctex.engine import ds_config
    from loctex.engine.optim import build_optimizer, build_scheduler
    torch.manual_seed(0)
    model = Small(width)
    opt = build_optimizer(model, cfg, on_cuda=False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config.generate(cfg, 1, False),
                                      optimizer=opt, lr_scheduler=build_scheduler(opt, cfg))
    return engine


_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _step(engine, cfg: Config) -> None:
    width = engine.module.textual.in_features
    loss = engine(torch.randn(4, width, dtype=_DTYPE[cfg.precision]))
    engine.backward(loss)
    engine.step()


def _train_and_save(engine, cfg: Config, steps) -> None:
    for s in steps:
        _step(engine, cfg)
        ckpt.save(engine, cfg, ckpt.TrainState(step=s, data_position=s, samples_seen=4 * s), 0, 1,
                  model_args={})


def _damage_middle(path: Path) -> None:
    """Same size, bytes changed in the middle (what a bad disk or a bad copy does)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


# ---- item 2: safe loading ------------------------------------------------------------------------
def test_the_allowlist_is_exactly_what_deepspeed_writes(one_rank, tmp_path):
    """Save with ZeRO 0-3 in fp32, bf16 and fp16 (fp16 runs on CPU too): the weights-only unpickler
    rejects exactly the allow-listed DeepSpeed types, and with them every file loads."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_types()}
    rejected = set()
    for stage, precision in itertools.product([0, 1, 2, 3], ["fp32", "bf16", "fp16"]):
        cfg = _config(tmp_path, f"zero.stage={stage}", f"precision={precision}")
        engine = _engine(cfg)
        _step(engine, cfg)
        out = tmp_path / f"zero{stage}_{precision}"
        engine.save_checkpoint(str(out), tag="t")
        files = sorted((out / "t").glob("*.pt"))
        assert files, (stage, precision)
        for f in files:
            rejected |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
            assert isinstance(safe_load(f), dict)
        refuse_foreign_types(out / "t")  # passes
    assert rejected == allowed


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, payload: Payload, legacy: bool = False) -> None:
    """Replace ``path`` with a file holding its own content plus the payload, and make the
    manifest agree, so that only the type check stands in the way."""
    blob = {"module": {"weight": torch.zeros(2)}, "payload": payload}
    if path.exists():
        blob = {**safe_load(path), "payload": payload}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(blob, f)
    else:
        torch.save(blob, path)
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = file_entry(path)
    manifest_path.write_text(json.dumps(manifest))
    assert damage(path.parent) is None


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.pt"])
def test_resume_refuses_a_checkpoint_that_would_run_code(one_rank, tmp_path, victim):
    cfg = _config(tmp_path / "run", "zero.stage=1", "precision=fp32")
    engine = _engine(cfg)
    _train_and_save(engine, cfg, [1])
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000001"
    marker = tmp_path / "pwned"
    _plant(tag_dir / victim, Payload(marker))

    expected = (f"checkpoint step_00000001/{victim}: refusing to load type posix.system "
                "(not a tensor or a DeepSpeed bookkeeping type)")
    # the trainer's path: rank 0 checks the chosen checkpoint's types for every rank ...
    with pytest.raises(CheckpointError) as info:
        ckpt.resume_target(cfg)
    assert str(info.value) == expected
    # ... and every load is weights-only, whatever DeepSpeed asks for
    with pytest.raises(CheckpointError) as info:
        ckpt.load(engine, tag_dir, rank=0, world_size=1, cfg=cfg)
    assert str(info.value) == expected
    assert not marker.exists()
    assert torch.load is loctex.checkpoints._torch_load  # the override ends with the load


def _fake_run(tmp_path: Path, payload: Payload, legacy: bool) -> Path:
    """A stage-0 run directory as the engine writes it, its model file holding the payload."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / MANIFEST).write_text(json.dumps({
        "tag": tag.name, "step": 1, "zero_stage": 0, "config": to_dict(Config()),
        "model_args": {"vocab_size": 10, "pad_token_id": 0}, "files": {}}))
    (tag.parent / "latest").write_text(tag.name)
    _plant(tag / "mp_rank_00_model_states.pt", payload, legacy=legacy)
    return tmp_path / "run"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "plain-pickle"])
def test_load_model_and_export_refuse_a_checkpoint_that_would_run_code(tmp_path, legacy):
    from loctex.export import export
    marker = tmp_path / "pwned"
    run = _fake_run(tmp_path, Payload(marker), legacy)
    expected = ("checkpoint step_00000001/mp_rank_00_model_states.pt: refusing to load type "
                "posix.system (not a tensor or a DeepSpeed bookkeeping type)")
    if legacy:  # a plain pickle's tensors need torch's byte loader, also refused
        expected = expected.replace("type posix.system",
                                    "types posix.system, torch.storage._load_from_bytes")
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    assert str(info.value) == expected
    with pytest.raises(CheckpointError) as info:
        export(run, "torchvision", tmp_path / "out.pth")
    assert str(info.value) == expected
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


# ---- item 3: integrity ---------------------------------------------------------------------------
def test_the_manifest_records_a_checksum_of_every_file(one_rank, tmp_path):
    cfg = _config(tmp_path / "run", "zero.stage=2", "precision=bf16")
    _train_and_save(_engine(cfg), cfg, [1])
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000001"
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    on_disk = {p.name for p in tag_dir.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk and len(on_disk) >= 3
    for name, entry in manifest["files"].items():
        assert entry == file_entry(tag_dir / name)
        assert set(entry) == {"size", "xxh3_128"}


def test_a_damaged_checkpoint_is_skipped_for_the_newest_intact_one(one_rank, tmp_path, caplog):
    cfg = _config(tmp_path / "run", "zero.stage=1", "precision=bf16")
    engine = _engine(cfg)
    _train_and_save(engine, cfg, [2, 4])
    ckpts = tmp_path / "run" / "checkpoints"
    _damage_middle(ckpts / "step_00000004" / "mp_rank_00_model_states.pt")

    with caplog.at_level(logging.WARNING, logger="loctex.checkpoints"):
        target = ckpt.resume_target(cfg)
    assert target == ckpts / "step_00000002"
    warning = caplog.text
    assert "step_00000004" in warning and "mp_rank_00_model_states.pt" in warning
    assert "checksum" in warning
    state = ckpt.load(engine, target, rank=0, world_size=1, cfg=cfg)
    assert state.step == 2 and state.samples_seen == 8
    # eval and export take the same intact checkpoint; a damaged one named explicitly is refused
    assert resolve(tmp_path / "run") == ckpts / "step_00000002"
    with pytest.raises(CheckpointError, match="step_00000004 is damaged: mp_rank_00_model_states.pt"):
        resolve(ckpts / "step_00000004")


def test_no_intact_checkpoint_fails_auto_instead_of_starting_over(one_rank, tmp_path):
    cfg = _config(tmp_path / "run", "zero.stage=1", "precision=fp32")
    _train_and_save(_engine(cfg), cfg, [2, 4])
    ckpts = tmp_path / "run" / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        _damage_middle(ckpts / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError) as info:
        ckpt.resume_target(cfg)
    message = str(info.value)
    assert "\n" not in message and str(ckpts) in message and "no intact checkpoint" in message
    assert "step_00000002" in message and "step_00000004" in message
    assert "train.resume=never" in message
    never = _config(tmp_path / "run", "train.resume=never")
    assert ckpt.resume_target(never) is None  # starting over, on purpose
    # nothing at all: a fresh run starts from scratch
    assert ckpt.resume_target(_config(tmp_path / "fresh")) is None


def test_pruning_never_deletes_the_newest_intact_checkpoint(one_rank, tmp_path):
    cfg = _config(tmp_path / "run", "zero.stage=1", "precision=fp32")
    engine = _engine(cfg)
    _train_and_save(engine, cfg, [2, 4, 6])
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    _damage_middle(ckpts / "step_00000006" / "mp_rank_00_model_states.pt")
    ckpt.prune(ckpts, keep=1)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert find_latest(ckpts) == ckpts / "step_00000004"
    # saving with keep_checkpoints=1 keeps what it just wrote, whatever the older ones hold
    kept = _config(tmp_path / "run", "zero.stage=1", "precision=fp32", "train.keep_checkpoints=1")
    _train_and_save(engine, kept, [5])
    assert find_latest(ckpts) == ckpts / "step_00000005"
    assert (ckpts / "latest").read_text() == "step_00000005"


# ---- item 8: a checkpoint that cannot be written -------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A small tmpfs at ``path``; None where mounting is not allowed (not root, a container)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


WIDTH = 256  # Linear(256, 256) in fp32 with AdamW under ZeRO-1: ~1.1 MB per checkpoint


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_the_size_of_a_checkpoint_is_known_before_it_is_written(one_rank, tmp_path, stage):
    """From the tensors before the first checkpoint (the serialization adds a few percent), from
    the previous checkpoint after it."""
    cfg = _config(tmp_path / "run", f"zero.stage={stage}", "precision=bf16")
    engine = _engine(cfg, width=WIDTH)
    ckpts = tmp_path / "run" / "checkpoints"
    _step(engine, cfg)
    predicted = ckpt.expected_bytes(engine, ckpts, rank=0)
    ckpt.save(engine, cfg, ckpt.TrainState(step=1), 0, 1, model_args={})
    actual = sum(f.stat().st_size for f in (ckpts / "step_00000001").iterdir())
    assert 0.9 * actual <= predicted <= actual
    assert ckpt.expected_bytes(engine, ckpts, rank=0) == actual


def _assert_failed_cleanly(info, ckpts: Path, reason: str, last: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step_00000002 not written to {ckpts}: {reason} (")
    needed, free = [int(x.replace(",", "")) for x in
                    re.findall(r"([\d,]+) bytes (?:needed|free)", message)]
    assert needed > 1_000_000 and 0 <= free < 2_000_000, message
    assert not list(ckpts.glob("tmp-*")) and not (ckpts / "step_00000002").exists()
    assert (ckpts / "latest").read_text() == last and find_latest(ckpts) == ckpts / last


def test_a_full_disk_is_refused_before_writing_and_during_the_write(one_rank, tmp_path, monkeypatch):
    """A 2 MB tmpfs takes the first checkpoint, not the second: the free-space check refuses it
    before writing; with that check fooled, the write itself fails (ENOSPC inside torch.save), with
    the same outcome. Where mounting is not allowed, the 2 MB file system is simulated."""
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        root = disk or tmp_path / "disk"
        cfg = _config(root / "run", "zero.stage=1", "precision=fp32")
        engine = _engine(cfg, width=WIDTH)
        ckpts = root / "run" / "checkpoints"
        if disk is None:
            monkeypatch.setattr(ckpt, "free_bytes", lambda p: max(0, 2_000_000 - sum(
                f.stat().st_size for f in root.rglob("*") if f.is_file())))
        _train_and_save(engine, cfg, [1])
        with pytest.raises(CheckpointError) as info:
            _train_and_save(engine, cfg, [2])
        _assert_failed_cleanly(info, ckpts, "not enough free space", "step_00000001")

        free, looks = ckpt.free_bytes, []

        def plenty_at_first_look(path):
            looks.append(path)
            return 10 ** 12 if len(looks) == 1 else free(path)
        monkeypatch.setattr(ckpt, "free_bytes", plenty_at_first_look)
        if disk is None:
            def full(*args, **kwargs):  # what torch.save raises on a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            monkeypatch.setattr(engine.checkpoint_engine.__class__, "save", full)
        with pytest.raises(CheckpointError) as info:
            _train_and_save(engine, cfg, [2])
        _assert_failed_cleanly(info, ckpts, "no space left on device", "step_00000001")


def test_a_read_only_directory_is_refused_with_one_line(one_rank, tmp_path, monkeypatch):
    with _tmpfs(tmp_path / "disk", "16m") as disk:
        root = disk or tmp_path / "disk"
        cfg = _config(root / "run", "zero.stage=1", "precision=fp32")
        engine = _engine(cfg, width=WIDTH)
        ckpts = root / "run" / "checkpoints"
        _train_and_save(engine, cfg, [1])
        if disk is not None:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        elif os.geteuid() != 0:
            ckpts.chmod(0o555)
        else:  # root without the right to mount: permission bits do not stop root
            def read_only(self, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            monkeypatch.setattr(Path, "mkdir", read_only)
        try:
            with pytest.raises(CheckpointError) as info:
                _train_and_save(engine, cfg, [2])
        finally:
            monkeypatch.undo()
            if disk is not None:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
            ckpts.chmod(0o755)
        reason = "read-only file system" if (disk is not None or os.geteuid() == 0) \
            else "permission denied"
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"checkpoint step_00000002 not written to {ckpts}: {reason} (")
        assert "bytes needed" in message and "bytes free" in message
        assert not list(ckpts.glob("tmp-*")) and not (ckpts / "step_00000002").exists()
        assert (ckpts / "latest").read_text() == "step_00000001"
