"""The engine under the faults operators meet (issue 12): signals as schedulers send them, a run
stopped through the supervisor, NaN steps, a locked run directory, two one-process runs at once,
periodic work switched off, data that cannot be read, a flat attention map, a replaced image.

The end-to-end runs use test_engine.py's tiny model and data set, and its uninterrupted 8-step run
as the reference for the resumed losses.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_engine import (ROOT, STEPS, _assert_same_losses, _free_port, _launch, _metrics, _run,  # noqa: F401
                         _steps_logged, _wait_for, _wait_group, _write_config, prepared,
                         reference_run)

WORKERS = "data.num_workers=2"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _deepspeed() -> list[str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed)] if deepspeed.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _stop_after_step_3(proc: subprocess.Popen, run: Path, send) -> float:
    """Once step 3 is logged, ``send()`` the signal; wait until every process of the run's group
    is gone. Returns the seconds from the signal to the last exit."""
    try:
        _wait_for(lambda: _steps_logged(run) >= 3, proc, 240)
        t0 = time.time()
        send()
        _wait_group(proc, 60)
        return time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _assert_stopped_and_resumes(run: Path, log: str, signame: str, config: Path, reference: dict,
                                tmp_path: Path) -> None:
    assert log.count(f"exit 0 after {signame}") == 2, log[-3000:]  # one line per rank
    assert "killed by signal" not in log, log[-3000:]
    # the only traceback allowed is DeepSpeed's runner's own KeyboardInterrupt (it has no handler)
    ours = [f for f in re.findall(r'File "([^"]+)"', log) if "deepspeed" not in f
            and not f.endswith("subprocess.py")]
    assert not ours, log[-3000:]
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= saved < STEPS and _steps_logged(run) == saved
    text = _run(config, WORKERS, log=tmp_path / "resume.txt")
    assert f"resumed from {run / 'checkpoints' / f'step_{saved:08d}'}" in text
    resumed = _metrics(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _assert_same_losses(resumed, reference, range(saved + 1, STEPS + 1))


# ---- signals -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_group_sigint_with_loader_workers_saves_and_resumes(reference_run, prepared, tmp_path):
    """Ctrl-C / SIGINT to the whole process group of ``deepspeed --num_gpus 2`` with two loader
    workers per rank: each rank finishes its step, saves and exits 0 in well under DeepSpeed's
    30 s grace, and the resumed run repeats the uninterrupted one's losses."""
    run = tmp_path / "run"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared)
    proc = _launch(config, WORKERS, log=tmp_path / "log.txt")
    seconds = _stop_after_step_3(proc, run, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert seconds < 30
    _assert_stopped_and_resumes(run, (tmp_path / "log.txt").read_text(), "SIGINT", config,
                                _metrics(reference_run), tmp_path)


@pytest.mark.slow
def test_supervisor_forwards_sigterm_sent_to_its_pid_only(reference_run, prepared, tmp_path):
    """``python -m loctex.engine.supervise -- deepspeed ...``: SIGTERM to the wrapper's pid alone
    (DeepSpeed's launcher would not forward it) stops the ranks cleanly; the wrapper exits 0."""
    run = tmp_path / "run"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared)
    cmd = [sys.executable, "-m", "loctex.engine.supervise", "--", *_deepspeed(), "--num_gpus", "2",
           "--master_port", str(_free_port()), "engine/launch.py", "--config", str(config), WORKERS]
    with open(tmp_path / "log.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    seconds = _stop_after_step_3(proc, run, lambda: os.kill(proc.pid, signal.SIGTERM))
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert seconds < 30 and "[supervise] SIGTERM: sent SIGTERM to the ranks" in log
    _assert_stopped_and_resumes(run, log, "SIGTERM", config, _metrics(reference_run), tmp_path)


# ---- non-finite steps ----------------------------------------------------------------------------
NAN_INJECTION = '''
import sys
import torch
from loctex.engine import trainer as T
from loctex.engine.launch import main

feed = T.Trainer._micro_batches


def poisoned(self):
    """NaN images into step 3 on rank 1 only, and into every step from 6 on, on every rank."""
    for batch in feed(self):
        step = self.state.step + 1  # the step this micro-batch belongs to (no accumulation)
        if (step == 3 and self.rank == 1) or step >= 6:
            batch["images"] = torch.full_like(batch["images"], float("nan"))
        yield batch


T.Trainer._micro_batches = poisoned
sys.exit(main())
'''


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_stop_the_run(prepared, tmp_path):
    """fp32 without ZeRO, where DeepSpeed checks nothing itself. A NaN step on one rank is skipped
    on both and counted; more than train.max_skipped_steps=2 in a row stop the run (exit 1) without
    saving, ``latest`` on a checkpoint whose parameters and BatchNorm statistics are finite."""
    run = tmp_path / "run"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared, precision="fp32",
                           zero={"stage": 0}, train={"checkpoint_every": 1, "keep_checkpoints": 10})
    script = tmp_path / "inject_nan.py"
    script.write_text(NAN_INJECTION)
    cmd = [*_deepspeed(), "--num_gpus", "2", "--master_port", str(_free_port()), str(script),
           "--config", str(config), "train.max_skipped_steps=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "stopping: 3 steps in a row had a non-finite loss or gradient" in log, log[-3000:]

    m = _metrics(run)
    assert sorted(m) == list(range(1, 9))
    assert [m[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert m[3]["loss"] is None and m[6]["loss"] is None  # every step of the window skipped
    assert all(math.isfinite(m[s]["loss"]) for s in (1, 2, 4, 5))

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000007"  # the run stopped before saving 8
    assert not (ckpts / "step_00000008").exists()

    def state(step):
        return torch.load(ckpts / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=True)["module"]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)
    states = {s: state(s) for s in range(1, 8)}
    for s, sd in states.items():
        bad = [k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()]
        assert not bad, (s, bad[:5])
    # a skipped step changes nothing, BatchNorm statistics included; an applied one does
    assert same(states[2], states[3]) and same(states[5], states[6]) and same(states[5], states[7])
    assert not same(states[3], states[4]) and not same(states[4], states[5])


def test_step_guard_skips_the_update_and_buffer_snapshot_restores(tmp_path):
    """In one process: the guarded optimizer leaves every parameter alone after a NaN loss or a
    NaN gradient, and steps normally otherwise; BatchNorm statistics come back after a NaN
    forward."""
    from loctex.engine.nonfinite import BufferSnapshot, StepGuard, model_is_finite
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(opt, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps the guarded step, as in the engine
    snapshot = BufferSnapshot(model)
    before = [p.detach().clone() for p in model.parameters()]

    for poison in ("loss", "grad"):
        guard.begin()
        snapshot.take()
        x = torch.randn(8, 3)
        if poison == "grad":
            x[0, 0] = float("nan")
        loss = model(x).square().mean()
        guard.observe_loss(loss if poison == "grad" else loss * float("nan"))
        loss.backward()
        opt.step()
        sched.step()
        assert guard.skipped
        snapshot.restore()
        opt.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert model_is_finite(model, torch.device("cpu"))

    guard.begin()
    model(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    assert not guard.skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        model[1].running_mean.fill_(float("inf"))
    assert not model_is_finite(model, torch.device("cpu"))


# ---- the run directory and the rendezvous port ---------------------------------------------------
def _one_process(config: Path, *overrides: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "engine/launch.py", "--config", str(config), *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_run_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    from loctex.engine.run_lock import RunDirLocked, RunLock
    (tmp_path / ".lock").write_text('{"host": "elsewhere", "pid": 1, "since": "then"}\n')
    with RunLock(tmp_path):  # nobody holds the stale file's flock: taken over, file rewritten
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunDirLocked) as info:
            RunLock(tmp_path).acquire()
        assert f"host {socket.gethostname()} pid {os.getpid()}" in str(info.value)
    RunLock(tmp_path).acquire().release()  # released with its holder


@pytest.mark.slow
def test_second_run_on_a_locked_run_dir_refuses_naming_the_owner(prepared, tmp_path):
    from loctex.engine.run_lock import RunLock
    run = tmp_path / "run"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared)
    with RunLock(run):
        proc = _one_process(config, log=tmp_path / "log.txt")
        proc.wait(timeout=120)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 2, log[-3000:]
    assert f"error: run_dir {run} is in use by host {socket.gethostname()} pid {os.getpid()}" in log
    assert "Traceback" not in log and not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_one_process_runs_at_once_with_periodic_work_off(prepared, tmp_path):
    """Two ``python engine/launch.py`` runs side by side (no MASTER_PORT: each picks a free port),
    one with checkpoint_every=0, the other with log_every=0 (0: never, but the last step still
    logs and saves); the first takes over a stale lock file left by a dead run."""
    configs = [_write_config(tmp_path / f"cfg{i}.yaml", tmp_path / f"run{i}", prepared,
                             data={"val_prepared": ""}, train={"max_steps": 3})
               for i in (0, 1)]
    (tmp_path / "run0").mkdir()
    (tmp_path / "run0" / ".lock").write_text('{"host": "gone", "pid": 999999999, "since": "x"}\n')
    procs = [_one_process(configs[0], "train.checkpoint_every=0", log=tmp_path / "log0.txt"),
             _one_process(configs[1], "train.log_every=0", log=tmp_path / "log1.txt")]
    for i, proc in enumerate(procs):
        proc.wait(timeout=240)
        log = (tmp_path / f"log{i}.txt").read_text()
        assert proc.returncode == 0, log[-3000:]
    assert sorted(_metrics(tmp_path / "run0")) == [1, 2, 3]
    assert sorted(_metrics(tmp_path / "run1")) == [3]
    assert [p.name for p in (tmp_path / "run0" / "checkpoints").glob("step_*")] == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / "run1" / "checkpoints").glob("step_*")) == \
        ["step_00000002", "step_00000003"]


@pytest.mark.slow
def test_data_that_cannot_be_read_is_one_clean_line(prepared, tmp_path):
    config = _write_config(tmp_path / "cfg.yaml", tmp_path / "run", prepared)
    missing = tmp_path / "no_such_prepared"
    done = subprocess.run([sys.executable, "engine/launch.py", "--config", str(config),
                           f"data.prepared={missing}"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


# ---- validation ----------------------------------------------------------------------------------
def test_flat_attention_is_drawn_flat(tmp_path):
    """Attention uniform to within 5% beside a peaked trace: the attention panel's pixels span a
    few levels of the colour map, not all of it, and its title gives the peak against uniform."""
    from PIL import Image

    from loctex.engine.validate import attention_grid
    H = W = 7
    g = torch.Generator().manual_seed(0)
    attn = (1 + 0.05 * (2 * torch.rand(1, 2, H, W, generator=g) - 1))
    attn = attn / attn.sum(dim=(-2, -1), keepdim=True)
    heat = torch.zeros(1, 2, 32, 32)
    heat[..., 10:14, 10:14] = 1.0 / 16
    sample = {"images": torch.zeros(1, 3, 64, 64), "tokens": torch.tensor([[5, 6]]),
              "attention": attn, "heat": heat, "target": torch.tensor([[True, False]]),
              "points_xy": torch.tensor([[0.35, 0.35]]), "token_ranges": torch.tensor([[[0, 1], [0, 0]]])}
    png = attention_grid(sample, tmp_path / "grid.png", decode=lambda i: "word", words_per_image=1)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    # the middle of the attention panel (column 2 of 3), away from its title and the borders
    panel = pixels[int(h * 0.45):int(h * 0.8), int(w * 0.42):int(w * 0.58)]
    spread = panel.max(axis=(0, 1)) - panel.min(axis=(0, 1))
    assert spread.max() <= 12, spread  # out of 255; an auto-scaled panel spans ~120 (0.5 alpha)
    trace = pixels[int(h * 0.45):int(h * 0.8), int(w * 0.72):int(w * 0.95)]
    assert (trace.max(axis=(0, 1)) - trace.min(axis=(0, 1))).max() > 60  # the trace is not flat


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not an image")


def test_retrieval_positives_follow_a_replaced_image(prepared, tmp_path):
    """Validation whose image of narrative i is unreadable: the data set puts narrative i+1 in its
    row, and the positives come from the batch's ``index``, so retrieval stays perfect for a model
    whose embeddings name each row's true image (with the sampler's order instead, the replaced
    row would be scored against the wrong image: t2i R@1 < 1)."""
    import shutil

    from loctex.config import load_config
    from loctex.data.packed import PackedNarratives
    from loctex.engine.trainer import Data
    from loctex.engine.validate import validate

    val = Path(prepared["val"])
    packed = PackedNarratives(str(val))
    images = [packed.image_index(i) for i in range(len(packed))]
    # a narrative whose successor shows another image; corrupt a copy of its image
    i = next(k for k in range(len(images) - 1) if images[k] != images[k + 1])
    image_dir = tmp_path / "images"
    shutil.copytree(packed.image_root, image_dir)
    bad = image_dir / Path(packed.image_path(images[i])).relative_to(packed.image_root)
    _corrupt(bad)

    cfg = load_config(None, [f"data.prepared={prepared['train']}", f"data.val_prepared={val}",
                             "data.image_size=64", "data.num_workers=0", "train.micro_batch_size=4"])
    data = Data(cfg, rank=0, world_size=1)
    loader = data.val_loader()
    loader.dataset.packed.image_root = image_dir  # the copy with the corrupted file
    batches, image_of = data.val_batches()
    batches = list(batches)
    index = torch.cat([b["index"] for b in batches])
    assert int(index[i]) == i + 1  # replaced by the next narrative

    class TrueImageModel(torch.nn.Module):
        """Embeds each row as its true image: the image of the narrative actually loaded."""
        def forward(self, batch, return_attention=False):
            truth = torch.tensor([images[int(k)] for k in batch["index"]])
            emb = torch.nn.functional.one_hot(truth, max(images) + 1).float()
            B, L = batch["tokens"].shape
            return {"image_emb": emb, "text_emb": emb, "attention": torch.full((B, L, 2, 2), 0.25)}

    class NoLoss:
        def __call__(self, out, batch):
            zero = torch.zeros(())
            return {"loss": zero, "loss_contrastive": zero, "loss_localization": zero}

    import loctex.engine.validate as V
    original = V.build_loss
    V.build_loss = lambda cfg: NoLoss()
    try:
        metrics, _ = validate(TrueImageModel(), batches, cfg, torch.device("cpu"), image_of=image_of)
        # the sampler's order instead (evaluation reads narratives 0, 1, 2, ... in order): the
        # narratives asked for, not the ones loaded
        asked = iter(torch.arange(len(index)).split(4))
        wrong, _ = validate(TrueImageModel(), batches, cfg, torch.device("cpu"),
                            image_of=lambda idx: torch.tensor([images[int(k)] for k in next(asked)]))
    finally:
        V.build_loss = original
    assert metrics["i2t_r1"] == 1.0 and metrics["t2i_r1"] == 1.0, metrics
    assert wrong["t2i_r1"] < 1.0 or wrong["i2t_r1"] < 1.0, wrong


# ---- GPU defaults (what can be checked without a GPU) --------------------------------------------
def test_cuda_defaults_and_fused_adamw():
    from loctex.config import load_config
    from loctex.engine.devices import peak_memory_mb, use_fast_cuda_defaults
    from loctex.engine.optim import build_optimizer
    from loctex.models import build_model
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    try:
        use_fast_cuda_defaults()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert torch.backends.cudnn.benchmark
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = saved
    assert peak_memory_mb(torch.device("cpu")) is None
    cfg = load_config(None, ["model.text.layers=1", "model.text.width=32", "model.text.heads=2"])
    model = build_model(cfg, 50)
    assert build_optimizer(model, cfg, on_cuda=True).defaults["fused"] is True
    assert not build_optimizer(model, cfg, on_cuda=False).defaults["fused"]
