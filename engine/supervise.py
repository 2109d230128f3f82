"""Run a training job so that a signal to one pid stops it cleanly.

    python -m loctex.engine.supervise -- deepspeed --num_gpus 2 engine/launch.py --config X.yaml ...

DeepSpeed's launcher does not forward SIGTERM: when only its pid is signalled (a container's PID 1,
``kill PID``, a scheduler that signals the main process) it exits 143 and the ranks train on,
orphaned. This wrapper starts the job in its own process group and stays its parent:

* SIGTERM, SIGINT or SIGHUP to the wrapper goes on to the job's ranks (they registered their pids
  through ``LOCTEX_SUPERVISOR_DIR``, see :func:`register_rank`): each finishes its step, saves and
  exits 0, then DeepSpeed's launchers exit 0 on their own. SIGHUP goes on as SIGTERM (a closed
  terminal means stop, and the ranks save on SIGTERM). Before any rank has registered (start-up),
  the signal goes to the job's whole process group.
* A second signal goes to the whole process group (DeepSpeed's launcher then terminates the ranks
  with its 30 s grace); a third kills the group.
* The wrapper waits until every process of the job has exited (it is their subreaper on Linux, so
  orphaned ranks are still waited for) and exits with the job's code (128 + N for a signal N).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = "LOCTEX_SUPERVISOR_DIR"
_PR_SET_CHILD_SUBREAPER = 36


def register_rank(rank: int) -> None:
    """Called by a rank once its SIGTERM/SIGINT handlers are installed: from then on the wrapper
    signals this pid alone, not the launchers. A no-op when not under the wrapper."""
    directory = os.environ.get(ENV)
    if directory:
        Path(directory, f"rank{rank}.pid").write_text(f"{os.getpid()}\n")


def _registered_pids(directory: Path) -> list[int]:
    pids = []
    for f in directory.glob("rank*.pid"):
        try:
            pids.append(int(f.read_text()))
        except (OSError, ValueError):
            continue  # being written
    return pids


def _become_subreaper() -> bool:
    """Orphaned descendants (ranks whose launcher died) are re-parented to us, so we can wait for
    them. Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Supervisor:
    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.signals_seen = 0
        self.proc: subprocess.Popen | None = None
        self.pending = 0
        self.dir = Path(tempfile.mkdtemp(prefix="loctex-supervise-"))

    def _forward(self, signum, frame) -> None:
        if self.proc is None:  # not started yet: forwarded once it is
            self.pending = signum
            return
        self.signals_seen += 1
        name = signal.Signals(signum).name
        sig = signal.SIGTERM if signum == signal.SIGHUP else signum
        pids = _registered_pids(self.dir)
        if self.signals_seen == 1 and pids:
            target = f"the ranks {sorted(pids)}"
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        else:
            if self.signals_seen >= 3:
                sig = signal.SIGKILL
            target = f"process group {self.proc.pid}"
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        print(f"[supervise] {name}: sent {signal.Signals(sig).name} to {target}", file=sys.stderr,
              flush=True)

    def run(self) -> int:
        subreaper = _become_subreaper()
        env = {**os.environ, ENV: str(self.dir)}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        self.proc = subprocess.Popen(self.cmd, env=env, process_group=0)
        if self.pending:
            self._forward(self.pending, None)
        try:
            status = self._wait(subreaper)
        finally:
            for f in self.dir.glob("*"):
                f.unlink(missing_ok=True)
            self.dir.rmdir()
        return 128 - status if status < 0 else status

    def _wait(self, subreaper: bool) -> int:
        """The job's exit status (``Popen.returncode`` convention), once every process is gone."""
        if not subreaper:
            status = self.proc.wait()
            while True:  # ranks orphaned by a launcher that died are not our children
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return status
                time.sleep(0.2)
        status = None
        while True:
            try:
                pid, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                return status if status is not None else self.proc.returncode
            if pid == self.proc.pid:
                status = os.waitstatus_to_exitcode(raw)
                self.proc.returncode = status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        return Supervisor(argv).run()
    except FileNotFoundError as exc:
        print(f"supervise: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
