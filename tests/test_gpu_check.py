"""The rehearsal of ``make gpu-check`` (benchmarks/gpu_check.py --dry-run): every stage of the GPU
check — venv + install command, roofline, kernel tests, kernel bench, training throughput, JPEG
decoding, summary — runs end to end on the CPU with tiny shapes, and a stage that fails or hangs
is recorded while the others still run."""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "VENV", str(tmp_path / "venv"))
    report = gc.check(str(tmp_path / "out"), dry_run=True, budget_s=300, log=lambda *_: None)
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["install", "roofline", "kernel_tests", "kernel_bench", "train_throughput",
                            "jpeg_decode"]
    assert all(s["status"] == "ok" for s in stages.values()), {n: s["tail"][-500:] for n, s in stages.items()
                                                                  if s["status"] != "ok"}
    tp = report["measured"]["train_throughput"]
    for label in ("loctex", "contrastive_only"):
        assert tp[label]["images_per_s"] > 0 and tp[label]["loss"] > 0
    assert report["measured"]["jpeg_decode"]["images_per_s"] > 0
    md = (tmp_path / "out" / f"gpu-check_cpu-dry-run_{report['date']}.md").read_text()
    assert "## Training throughput" in md and "## JPEG decoding to 224 px" in md
    assert md.count("[met] issue 14 (paper)") == 2             # the roofline's verdicts reach the summary
    saved = json.loads((tmp_path / "out" / f"gpu-check_cpu-dry-run_{report['date']}.json").read_text())
    assert saved["dry_run"] and saved["total_seconds"] > 0
    assert stages["kernel_tests"]["note"].startswith("2 passed")
    assert list((tmp_path / "out").glob("roofline_h100-sxm_*.md"))
    assert list((tmp_path / "out").glob("cpu-*_quick.csv"))


def test_a_failing_or_hanging_stage_is_recorded_and_the_check_goes_on():
    gc = _gpu_check()
    failed = gc.run_stage("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 20,
                          log=lambda *_: None)
    assert failed["status"] == "failed" and failed["returncode"] == 3 and "boom" in failed["tail"]
    # a stage that starts a child and hangs: the whole process group goes at the timeout
    hung = gc.run_stage("hangs", [sys.executable, "-c",
                                  "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                                  "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"],
                        3, log=lambda *_: None)
    assert hung["status"] == "timeout" and hung["seconds"] < 20 and "started" in hung["tail"]


def test_venv_sees_the_launchers_packages(tmp_path):
    import subprocess
    gc = _gpu_check()
    python = gc.make_venv(str(tmp_path / "venv"))
    out = subprocess.run([python, "-c", "import sys, torch, loctex.kernels; print(sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(tmp_path / "venv")
    cmds = gc.install_commands(python, dry_run=False)
    assert cmds[0][-2:] == ["-e", gc.ROOT] and "--no-deps" in cmds[0] and "--python" in cmds[0]
