"""Two "nodes" on this machine: ``torchrun --nnodes 2 --nproc_per_node 1`` twice, one CPU rank each,
rendezvous (c10d) on localhost, training with engine/launch.py as a two-machine job would.

What spans both nodes, and how it shows:
- the global batch: ``global_batch`` in metrics.jsonl is 2 x the micro-batch;
- the contrastive negatives: every logged loss equals that of test_engine's reference run (the same
  config on two ranks of one node, where the loss takes both ranks' captions and images as negatives:
  with each rank's own four only, ``loss_contrastive`` would differ from the first step on);
- the checkpoint and the resume: the run checkpoints with world size 2; taken back to step 6, a
  second two-node launch resumes there and repeats the uninterrupted run's steps 7-8.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from loctex.checkpoints import find_latest, read_manifest

from test_engine import (ROOT, STEPS, _assert_same_losses, _free_port, _metrics, _write_config,
                         prepared, reference_run)

__all__ = ["prepared", "reference_run"]  # fixtures shared with test_engine


def _node(config: Path, port: int, log: Path, *overrides: str) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    runner = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*runner, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "loctex-test",
           "engine/launch.py", "--config", str(config), *overrides]
    # one thread per rank, as the reference run's launcher sets it: the same arithmetic, bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _two_nodes(config: Path, logs: Path, *overrides: str, timeout: float = 240) -> list[str]:
    """Start both nodes, wait for both; the text of each node's log."""
    port = _free_port()
    nodes = [_node(config, port, logs / f"node{i}.txt", *overrides) for i in range(2)]
    deadline = time.time() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    texts = [(logs / f"node{i}.txt").read_text() for i in range(2)]
    for node, text in zip(nodes, texts):
        assert node.returncode == 0, f"a node failed (rc {node.returncode}):\n{text[-4000:]}"
    return texts


def test_two_nodes_share_the_batch_the_negatives_the_checkpoint_and_the_resume(
        prepared, reference_run, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    config = _write_config(tmp_path / "cfg.yaml", run, prepared)
    (tmp_path / "first").mkdir()
    logs = _two_nodes(config, tmp_path / "first")
    assert sum("training: world 2" in text for text in logs) == 1, logs[0][-2000:]  # rank 0 says it

    uninterrupted = _metrics(run)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert all(r["global_batch"] == 2 * 4 for r in uninterrupted.values())
    _assert_same_losses(uninterrupted, _metrics(reference_run), range(1, STEPS + 1))

    last = find_latest(ckpts)
    assert last == ckpts / f"step_{STEPS:08d}" and read_manifest(last)["world_size"] == 2
    assert {f"rng_rank{r}.pt" for r in range(2)} <= set(read_manifest(last)["files"])

    # back to step 6, as if both nodes had been preempted after saving it
    shutil.rmtree(last)
    (ckpts / "latest").write_text("step_00000006")
    (tmp_path / "resumed").mkdir()
    logs = _two_nodes(config, tmp_path / "resumed")
    text = "".join(logs)
    assert f"resumed from {ckpts / 'step_00000006'} at step 6" in text, text[-3000:]
    resumed = _metrics(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(resumed[s]["global_batch"] == 8 for s in (7, 8))
    _assert_same_losses(resumed, uninterrupted, range(7, STEPS + 1))
    assert json.loads((run / "eval_summary.json").read_text())["step"] == STEPS
