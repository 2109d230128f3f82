"""Backend choice (``data.backend: auto|dali|torch``) for :func:`loctex.data.loader.build_loader`.

* ``torch``: DataLoader workers (PIL reduced-size decode), the reference semantics.
* ``dali``: :class:`loctex.data.dali.DaliLoader`; on a machine without a CUDA GPU it runs the
  CPU-only pipeline (what the tests use). Falls back to torch with a warning when DALI is not
  installed.
* ``auto``: DALI when it is importable *and* a CUDA GPU is present, else torch.
"""
from __future__ import annotations

import logging
import sys

import torch

from loctex.data.dali import dali_available

log = logging.getLogger("loctex.data")
_announced: set = set()


def _say(msg: str, warn: bool = False) -> None:
    """Log once per process (loaders are rebuilt every epoch)."""
    if msg in _announced:
        return
    _announced.add(msg)
    if warn:
        log.warning(msg)
    elif log.isEnabledFor(logging.INFO) and logging.getLogger().hasHandlers():
        log.info(msg)
    else:  # logging not configured (scripts, the engine): say it anyway, once per process
        print(f"[loctex] {msg}", file=sys.stderr, flush=True)


def resolve_backend(requested: str) -> str:
    """``auto|dali|torch`` -> ``dali|torch``, logging the choice and why."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "dali", "torch"):
        raise ValueError(f"data.backend must be auto, dali or torch; got {requested!r}")
    gpu = torch.cuda.is_available()
    if requested == "torch":
        _say("data backend: torch (data.backend=torch)")
        return "torch"
    if not dali_available():
        _say(f"data backend: torch (data.backend={requested}; nvidia.dali is not importable - "
             f"pip install nvidia-dali-cuda120)", warn=requested == "dali")
        return "torch"
    if requested == "auto" and not gpu:
        _say("data backend: torch (data.backend=auto; DALI is installed but no CUDA GPU)")
        return "torch"
    _say(f"data backend: dali ({'GPU decode' if gpu else 'CPU-only pipeline, no CUDA GPU'}; "
         f"data.backend={requested})")
    return "dali"
