"""Pre-training units: contrastive-only and LocTex through the real engine (a subprocess:
``python -m loctex.engine.launch``, one rank), the supervised baseline in-process
(``supervised.py``). An engine run resumes from its newest checkpoint (``train.resume=auto``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from .data import prepare_subset
from .plan import Unit
from .workspace import Workspace


def _free_port() -> int:
    """A free local port for the run's process group (two studies may run at once, e.g. tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(ws: Workspace, unit: Unit) -> dict:
    prepare_subset(ws.data, unit.seed, unit.data)
    run_dir = ws.run_dir(unit)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loctex.engine.launch",
           "--config", str(ws.engine_config_file(unit.backbone)), *ws.engine_overrides(unit)]
    log = run_dir / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port())}
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()), "")
        raise SystemExit(f"{log}: pre-training {unit.name} failed (exit {rc}); its last line: "
                         f"{last.strip()}")
    return {"run_dir": str(run_dir), "command": cmd, "seconds": time.perf_counter() - t0}


def run(ws: Workspace, unit: Unit) -> dict:
    if unit.backbone == "supervised":
        from .supervised import train_supervised
        return train_supervised(ws.engine_config(unit), ws.data.instances("train"),
                                ws.supervised_weights(unit), device=ws.study.device)
    return run_engine(ws, unit)
