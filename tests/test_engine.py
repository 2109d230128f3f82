"""The DeepSpeed training engine (issue 4), on CPU: two gloo ranks started by the deepspeed launcher.

Every run uses a tiny model (ResNet-18 at 64 px -> a 2x2 grid, a 1-layer text encoder of width 32),
micro-batch 4 per rank, on one small data set made once per session by ``loctex synth`` +
``loctex tokenizer train`` + ``loctex prepare`` (48 training images -> 6 steps per epoch, so an
8-step run crosses an epoch boundary).

Resume tolerance: the losses of the steps after a resume must equal those of the uninterrupted
run to 1e-5 (relative). On CPU the runs are in fact bit-identical: the model, optimizer, scheduler
and every RNG state come back from the checkpoint, and the data order and augmentation are
functions of (seed, position).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from loctex.cli import main as loctex_main
from loctex.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
RESUME_RTOL = 1e-5
STEPS = 8

TINY = {
    "seed": 0,
    "precision": "bf16",
    "data": {"image_size": 64, "num_workers": 0, "max_tokens": 48},
    "model": {"visual": "resnet18", "embed_dim": 32, "attention_dim": 32,
              "text": {"layers": 1, "width": 32, "heads": 2, "max_positions": 64}},
    "optim": {"warmup_steps": 2},
    "train": {"micro_batch_size": 4, "max_steps": STEPS, "checkpoint_every": 2,
              "keep_checkpoints": 2, "log_every": 1},
    "zero": {"stage": 1},
}


# ---- shared data and helpers ---------------------------------------------------------------------
def _shared_dir(tmp_path_factory, name: str, make) -> Path:
    """A directory made once per session by ``make(dir)``, whichever xdist worker asks first (the
    others wait on a lock in the base directory the workers share)."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's base lies inside the session's; without it, the parent would be
    # shared by every session (a stale reference run from older code)
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with FileLock(str(root) + ".lock"):
        done = root / "done"
        if not done.exists():
            make(root)
            done.write_text("ok")
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """One tiny prepared data set for the whole session."""
    root = _shared_dir(tmp_path_factory, "engine_data", _make_data)
    return {"train": str(root / "prep_train"), "val": str(root / "prep_val")}


def _make_data(root: Path) -> None:
    syn = root / "synth"
    assert loctex_main(["synth", "--out", str(syn), "--num-images", "64", "--seed", "0",
                        "--image-size", "64", "--val-fraction", "0.25"]) == 0
    tok = root / "tok.json"
    assert loctex_main(["tokenizer", "train", "--narratives", str(syn / "narratives_train.jsonl"),
                        "--vocab-size", "500", "--out", str(tok)]) == 0
    for split in ("train", "val"):
        assert loctex_main(["prepare", "--narratives", str(syn / f"narratives_{split}.jsonl"),
                            "--images", str(syn / "images"), "--out", str(root / f"prep_{split}"),
                            "--tokenizer", str(tok)]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, run_dir: Path, prepared: dict, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    cfg["run_dir"] = str(run_dir)
    cfg["data"].update(prepared=prepared["train"], val_prepared=prepared["val"])
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 engine/launch.py --config ...`` in its own process group."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    runner = [str(deepspeed)] if deepspeed.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*runner, "--num_gpus", "2", "--master_port", str(_free_port()),
           "engine/launch.py", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_group(proc: subprocess.Popen, timeout: float) -> None:
    """Wait until every process of the run's group has exited (the ranks may outlive the launcher
    after a signal)."""
    deadline = time.time() + timeout
    proc.wait(timeout=timeout)
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("the ranks did not exit")


def _run(config: Path, *overrides: str, log: Path, timeout: float = 300) -> str:
    proc = _launch(config, *overrides, log=log)
    try:
        _wait_group(proc, timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, f"the run failed (rc {proc.returncode}):\n{text[-4000:]}"
    return text


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _steps_logged(run_dir: Path) -> int:
    try:
        return max(_metrics(run_dir), default=0)
    except (OSError, ValueError):
        return 0


def _assert_same_losses(resumed: dict, reference: dict, steps) -> None:
    assert len(steps) > 0
    for s in steps:
        for key in ("loss", "loss_contrastive", "loss_localization", "lr"):
            a, b = resumed[s][key], reference[s][key]
            assert math.isclose(a, b, rel_tol=RESUME_RTOL, abs_tol=1e-7), \
                f"step {s} {key}: resumed {a!r} vs uninterrupted {b!r}"


@pytest.fixture(scope="session")
def reference_run(prepared, tmp_path_factory):
    """ZeRO-1 bf16, 8 uninterrupted steps: the ZeRO-1 case and the reference for the resume tests."""
    def make(d):
        _run(_write_config(d / "cfg.yaml", d / "run", prepared), log=d / "log.txt")
    return _shared_dir(tmp_path_factory, "engine_reference", make) / "run"


# ---- ZeRO stages, metrics, global batch ----------------------------------------------------------
def test_zero1_bf16_metrics_and_summary(reference_run):
    run = reference_run
    m = _metrics(run)
    assert sorted(m) == list(range(1, STEPS + 1))
    for row in m.values():
        for key in ("step", "loss", "loss_contrastive", "loss_localization", "lr", "images_per_s",
                    "global_batch", "skipped_images", "skipped_steps", "peak_gpu_mem_mb"):
            assert key in row, key
        assert row["skipped_images"] == 0  # prepare kept only readable images
        assert row["skipped_steps"] == 0 and row["peak_gpu_mem_mb"] is None  # CPU
        assert math.isfinite(row["loss"]) and row["loss_localization"] > 0
        assert row["loss"] == pytest.approx(row["loss_contrastive"] + row["loss_localization"],
                                            rel=1e-5)
        assert row["global_batch"] == 2 * 4 and row["images_per_step"] == 8
        assert row["images_per_s"] > 0
    # warmup (2 steps) then cosine down to lr * min_lr_ratio at the last step
    assert m[1]["lr"] == pytest.approx(0.5e-3) and m[2]["lr"] == pytest.approx(1e-3)
    assert m[STEPS]["lr"] < m[3]["lr"] and m[1]["lr_text"] == pytest.approx(0.25e-3)

    summary = json.loads((run / "eval_summary.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "loc_acc"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["i2t_r5"] >= summary["i2t_r1"] and summary["val_images"] >= 8
    assert (run / f"attention/step_{STEPS:08d}.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and (run / "ds_config.json").is_file()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"]
    # keep_checkpoints=2: the last two remain, and latest names the last
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert (ckpts / "latest").read_text() == "step_00000008"


def test_zero2_bf16_with_gradient_accumulation(prepared, tmp_path):
    """global_batch stays world x micro-batch (the contrastive batch); images_per_step counts the
    accumulation too."""
    config = _write_config(tmp_path / "cfg.yaml", tmp_path / "run", prepared, zero={"stage": 2},
                           train={"max_steps": 3, "gradient_accumulation_steps": 2,
                                  "checkpoint_every": 3})
    _run(config, log=tmp_path / "log.txt")
    m = _metrics(tmp_path / "run")
    assert sorted(m) == [1, 2, 3]
    assert all(r["global_batch"] == 8 and r["images_per_step"] == 16 for r in m.values())
    assert all(math.isfinite(r["loss"]) for r in m.values())


@pytest.fixture(scope="session")
def zero3_run(prepared, tmp_path_factory):
    def make(d):
        config = _write_config(d / "cfg.yaml", d / "run", prepared, zero={"stage": 3},
                               train={"max_steps": 3, "checkpoint_every": 3})
        _run(config, log=d / "log.txt")
    return _shared_dir(tmp_path_factory, "engine_zero3", make) / "run"


def test_zero3_bf16_runs_and_consolidates(zero3_run):
    m = _metrics(zero3_run)
    assert sorted(m) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in m.values())
    from loctex.checkpoints import load_model
    model = load_model(zero3_run)  # ZeRO-3 shards merged to float32, every key present
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.train_config.zero.stage == 3


# ---- export ----------------------------------------------------------------------------------------
def test_export_torchvision_and_detectron2_from_zero3(zero3_run, tmp_path):
    from loctex.models.resnet import build_resnet
    tv = tmp_path / "r18.pth"
    assert loctex_main(["export", "--checkpoint", str(zero3_run), "--format", "torchvision",
                        "--out", str(tv)]) == 0
    sd = torch.load(tv, weights_only=True)
    missing, unexpected = build_resnet("resnet18").load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected

    d2 = tmp_path / "r18_d2.pkl"
    assert loctex_main(["export", "--checkpoint", str(zero3_run), "--format", "detectron2",
                        "--out", str(d2)]) == 0
    with open(d2, "rb") as f:
        blob = pickle.load(f)
    assert blob["__author__"] == "loctex"
    keys = set(blob["model"])
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.norm.weight",
            "res3.0.shortcut.weight", "res3.0.shortcut.norm.bias", "res5.1.conv2.weight"} <= keys
    assert not any(k.startswith(("layer", "fc.", "bn")) or "num_batches_tracked" in k for k in keys)


def _fake_checkpoint(tmp_path: Path, visual: torch.nn.Module) -> Path:
    """A stage-0 checkpoint directory as the engine writes it, without training."""
    from loctex.config import Config
    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    module = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    torch.save({"module": module}, tag / "mp_rank_00_model_states.pt")
    manifest = {"tag": tag.name, "step": 1, "zero_stage": 0, "config": to_dict(Config()),
                "model_args": {"vocab_size": 10, "pad_token_id": 0},
                "files": {"mp_rank_00_model_states.pt": (tag / "mp_rank_00_model_states.pt").stat().st_size}}
    (tag / "loctex_checkpoint.json").write_text(json.dumps(manifest))
    (tmp_path / "checkpoints" / "latest").write_text(tag.name)
    return tmp_path


def test_export_resnet50_keys_and_formats(tmp_path):
    """torchvision keys load into a ResNet-50; detectron2 names follow VirTex's mapping for every
    key; .pth / .pkl / .safetensors by extension."""
    from safetensors.torch import load_file

    from loctex.export import export, to_detectron2
    from loctex.models.resnet import build_resnet
    torch.manual_seed(0)
    source = build_resnet("resnet50")
    run = _fake_checkpoint(tmp_path, source)

    out = export(run, "torchvision", tmp_path / "r50.safetensors")
    target = build_resnet("resnet50")
    missing, unexpected = target.load_state_dict(load_file(str(out)), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    assert torch.equal(target.layer3[5].bn3.running_var, source.layer3[5].bn3.running_var)

    d2 = to_detectron2(source.state_dict())
    expected = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.bias": "bn1.bias",
                "res2.0.conv3.norm.running_mean": "layer1.0.bn3.running_mean",
                "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
                "res2.0.shortcut.norm.weight": "layer1.0.downsample.1.weight",
                "res5.2.conv2.weight": "layer4.2.conv2.weight"}
    for d2_key, tv_key in expected.items():
        assert torch.equal(d2[d2_key], source.state_dict()[tv_key]), d2_key
    n_tv = sum(1 for k in source.state_dict() if not k.startswith("fc.")
               and not k.endswith("num_batches_tracked"))
    assert len(d2) == n_tv
    assert all(k.split(".")[0] in ("stem", "res2", "res3", "res4", "res5") for k in d2)

    pth = export(run, "detectron2", tmp_path / "r50_d2.pth")
    blob = torch.load(pth, weights_only=True)
    assert blob["__author__"] == "loctex" and set(blob["model"]) == set(d2)


# ---- checkpoints: validation and preemption -------------------------------------------------------
def test_half_written_checkpoint_is_never_latest(tmp_path):
    from loctex.checkpoints import MANIFEST, find_latest
    ckpts = tmp_path / "checkpoints"

    def complete(step, truncate=False):
        tag = ckpts / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "model.pt").write_bytes(b"x" * 100)
        (tag / MANIFEST).write_text(json.dumps({"files": {"model.pt": 100 if not truncate else 200}}))
        return tag

    complete(2)
    complete(4, truncate=True)                            # a file shorter than its manifest says
    (ckpts / "step_00000006").mkdir()                     # no manifest
    (ckpts / "tmp-step_00000008").mkdir()                 # being written when the run died
    (ckpts / "latest").write_text("step_00000006")
    assert find_latest(ckpts).name == "step_00000002"
    (ckpts / "latest").write_text("step_00000002")
    assert find_latest(ckpts).name == "step_00000002"


def test_preemption_sigterm_then_sigkill_then_resume(reference_run, prepared, tmp_path):
    """One run, preempted twice, against the uninterrupted reference (same config):

    1. SIGTERM to every process (what a scheduler does) after step 3, with two loader workers per
       rank (which ignore it): the step in flight finishes, a checkpoint is saved, every rank
       exits 0.
    2. resume=auto continues from it: its steps equal the reference's. SIGKILL of every process,
       aimed at the moment the step-6 checkpoint is being written (tmp-step_00000006 exists).
    3. The half-written checkpoint is not taken: resume=auto starts from the last complete one, and
       the steps after it equal the reference's.
    """
    from loctex.checkpoints import find_latest
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared)
    reference = _metrics(reference_run)

    # 1. SIGTERM
    proc = _launch(config, "data.num_workers=2", log=tmp_path / "log1.txt")
    _signal_when(proc, lambda: _steps_logged(run) >= 3, signal.SIGTERM, timeout_after=120)
    log1 = (tmp_path / "log1.txt").read_text()
    assert log1.count("exit 0 after SIGTERM") == 2, log1[-3000:]  # one line per rank
    assert "killed by signal" not in log1, log1[-3000:]
    saved = int((ckpts / "latest").read_text().split("_")[1])
    assert 3 <= saved < 6 and _steps_logged(run) == saved

    # 2. resume after SIGTERM, then SIGKILL while step 6 is being saved
    proc = _launch(config, log=tmp_path / "log2.txt")
    hit = {}

    def saving_step_6():
        hit["tmp"] = (ckpts / "tmp-step_00000006").exists()
        return hit["tmp"] or _steps_logged(run) >= 7
    _signal_when(proc, saving_step_6, signal.SIGKILL, timeout_after=60, poll=0.01)
    log2 = (tmp_path / "log2.txt").read_text()
    assert f"resumed from {ckpts / f'step_{saved:08d}'}" in log2, log2[-3000:]
    after_sigterm = _metrics(run)
    assert max(after_sigterm) >= 6
    _assert_same_losses(after_sigterm, reference, range(saved + 1, max(after_sigterm) + 1))
    good = find_latest(ckpts)
    if (ckpts / "tmp-step_00000006").exists():
        # killed mid-save (the usual case): the half-written step 6 is not latest, step 4 is
        assert (ckpts / "latest").read_text() == "step_00000004" == good.name
    else:
        # the save finished in the instant between the poll and the kill, or the poll missed it
        assert good.name == "step_00000006", hit
    start = int(good.name.split("_")[1])

    # 3. resume after SIGKILL
    log3 = _run(config, log=tmp_path / "log3.txt")
    assert f"resumed from {good}" in log3
    assert not list(ckpts.glob("tmp-*"))  # the next save cleared the half-written one
    resumed = _metrics(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _assert_same_losses(resumed, reference, range(start + 1, STEPS + 1))


def _signal_when(proc: subprocess.Popen, condition, sig: int, timeout_after: float,
                 poll: float = 0.2) -> None:
    """Send ``sig`` to the run's process group once ``condition()`` holds; wait for every process."""
    try:
        _wait_for(condition, proc, 240, poll)
        os.killpg(proc.pid, sig)
        _wait_group(proc, timeout_after)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(condition, proc: subprocess.Popen, timeout: float, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the condition")
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(poll)


# ---- small parts -------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    from loctex.schedule import lr_multiplier
    f = [lr_multiplier(s, 10, 100, 0.05) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(0.05 + 0.95 * 0.5, rel=1e-6)
    assert lr_multiplier(100, 10, 100, 0.05) == pytest.approx(0.05)


def test_optimizer_groups_and_lamb():
    from loctex.engine.optim import Lamb, build_optimizer
    from loctex.models import build_model
    cfg = load_config(None, ["model.text.layers=1", "model.text.width=32", "model.text.heads=2",
                             "optim.name=lamb"])
    model = build_model(cfg, 50)
    opt = build_optimizer(model, cfg, on_cuda=False)
    assert isinstance(opt, Lamb)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["textual"]["lr"] == cfg.optim.text_lr and groups["visual"]["lr"] == cfg.optim.lr
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.contrastive.logit_scale) in no_decay
    assert id(model.visual.bn1.weight) in no_decay and id(model.visual.conv1.weight) not in no_decay
    # one LAMB step on a tensor: the update's norm is lr * ||w|| (trust ratio), Adam's direction
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([1.0, -2.0])
    Lamb([w], lr=0.1, weight_decay=0.0).step()
    delta = w.detach() - torch.tensor([3.0, 4.0])
    assert delta.norm() == pytest.approx(0.1 * 5.0, rel=1e-4)
    assert delta[0] < 0 < delta[1]


def test_deepspeed_config_generation_and_passthrough(tmp_path):
    from loctex.engine import ds_config
    cfg = load_config(None, ["precision=fp16", "zero.stage=2", "train.micro_batch_size=8",
                             "train.gradient_accumulation_steps=4", "optim.grad_clip=0.5"])
    ds = ds_config.generate(cfg, world_size=16, on_cuda=True)
    assert ds["train_batch_size"] == 8 * 4 * 16 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic
    assert not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["data_types"]["buffer_dtype"] == "fp16"

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    loaded = ds_config.load(user, cfg, world_size=2, on_cuda=False)
    assert loaded["gradient_accumulation_steps"] == 4  # "auto" filled from our config
    synced = ds_config.sync_config(cfg, loaded, world_size=2)
    assert (synced.train.micro_batch_size, synced.precision, synced.zero.stage) == (2, "bf16", 3)
    assert synced.train.gradient_accumulation_steps == 4 and synced.optim.grad_clip == 0.5
    # the config it was given is left as it was
    assert (cfg.train.micro_batch_size, cfg.precision, cfg.zero.stage) == (8, "fp16", 2)


def test_rng_state_round_trip_is_weights_only(tmp_path):
    import random

    import numpy as np

    from loctex.engine.checkpoint import rng_state, set_rng_state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_contrastive_baseline_config_differs_only_in_the_localization_weight():
    base = to_dict(load_config(ROOT / "configs/embedded.yaml"))
    contrastive = to_dict(load_config(ROOT / "configs/embedded_contrastive.yaml"))
    assert contrastive["loss"].pop("localization_weight") == 0.0
    base["loss"].pop("localization_weight")
    assert contrastive.pop("run_dir") != base.pop("run_dir")
    assert contrastive == base


@pytest.mark.parametrize("fails", [False, True])
def test_a_failing_rank_skips_the_closing_barrier(monkeypatch, fails):
    """A rank whose training raises must exit without the closing barrier, which the other ranks
    may never reach (it would hang there until the collective timeout instead of letting the
    launcher stop the job); a rank that finished meets the others there."""
    from loctex.engine import trainer as T
    closed = []

    class FakeTrainer:
        def __init__(self, cfg, deepspeed_config=None):
            self.lock = None

        def fit(self):
            if fails:
                raise RuntimeError("rank failed")
            return 0

    FakeTrainer.close = T.Trainer.close  # the real one
    monkeypatch.setattr(T, "Trainer", FakeTrainer)
    monkeypatch.setattr(T, "shutdown_process_group", lambda: closed.append(True))
    if fails:
        with pytest.raises(RuntimeError, match="rank failed"):
            T.train(None)
    else:
        assert T.train(None) == 0
    assert closed == ([] if fails else [True])
