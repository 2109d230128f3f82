"""Loader worker processes (DataLoader workers, DALI's Python feeder workers) and stop signals.

Schedulers stop a job by sending SIGTERM (Ctrl-C: SIGINT) to every process of its process group,
loader workers included. A worker that dies of it makes the DataLoader raise "worker ... is killed
by signal" in the middle of the step the rank finishes before it saves. So a worker takes no stop
signal from anyone but its parent: the main process handles the scheduler's signal (the engine
finishes the step, saves, exits) and shuts its workers down through the loader. The parent's own
SIGTERM still ends a worker at once, as torch's worker handler does: that is how
``multiprocessing`` and DALI stop workers that do not leave on their own (at interpreter exit, for
one), and they wait for them.

Mechanism. Workers are started inside :func:`stop_signals_blocked`, so a forked (or spawned) child
inherits SIGTERM/SIGINT blocked and no signal reaches a handler in it. In the worker,
:func:`filter_stop_signals` starts a thread that takes the blocked signals with ``sigwaitinfo``,
which tells who sent them: the parent's SIGTERM exits the worker, anything else is dropped. A signal
sent while the worker starts stays pending until that thread takes it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_filtering_pid: int | None = None  # the process whose filter thread runs


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM/SIGINT in the calling thread while loader workers start; a signal that
    arrives meanwhile is delivered to this process when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def filter_stop_signals() -> None:
    """In a worker process (once; later calls do nothing): from now on SIGTERM/SIGINT from anyone
    but the parent are dropped, and the parent's SIGTERM exits the worker."""
    global _filtering_pid
    if _filtering_pid == os.getpid():
        return
    _filtering_pid = os.getpid()
    # Threads inherit the mask of the thread that creates them: block here (the worker's main
    # thread) before any thread is started, so no thread of the worker takes the signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True,
                     name="loctex-stop-signals").start()


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader of the data layer."""
    filter_stop_signals()
    torch.set_num_threads(1)  # W workers x 1 thread: no oversubscription of the cores
