"""Pre-training entry point (DESIGN §5).

    deepspeed engine/launch.py --config configs/X.yaml [key=value ...]        # any number of ranks
    deepspeed --num_gpus 2 engine/launch.py --config configs/embedded.yaml   # 2 CPU ranks (gloo)
    python engine/launch.py --config configs/X.yaml [key=value ...]          # one process
    ... --deepspeed_config ds.json     # use this DeepSpeed JSON ("auto" values filled from ours)

On a machine without CUDA, DeepSpeed's accelerator is the CPU and the ranks talk over gloo; the
launcher starts ``--num_gpus`` CPU ranks. The work is in ``engine/trainer.py``. A one-process run
rendezvous on a free local port unless ``MASTER_PORT`` is set, so several can run side by side.

To stop a job cleanly with a signal to one pid (DeepSpeed's launcher does not forward it), start it
under ``python -m loctex.engine.supervise -- deepspeed ...`` (``engine/supervise.py``).

Exit codes: 0 done or stopped by SIGTERM/SIGINT after saving; 1 the run stopped (non-finite
steps, a model that cannot be saved); 2 the configuration, the data or the run directory do not
allow a run (one line on stderr says why).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LocTex pre-training (DeepSpeed)")
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--deepspeed_config", default=None,
                   help="a DeepSpeed JSON to use instead of the one generated from the config")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value (dotted keys)")
    return p.parse_args(argv)


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_defaults() -> None:
    """What a launcher would set, for ``python engine/launch.py`` (one rank)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    single_process_defaults()
    # CPU ranks share the cores: without a limit each rank would start one thread per core
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if local_ranks > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_ranks)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from loctex.config import ConfigError, load_config
    from loctex.engine.trainer import EngineError, train
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from loctex.checkpoints import CheckpointError
    try:
        return train(cfg, args.deepspeed_config)
    except (ConfigError, EngineError, CheckpointError) as exc:
        # CheckpointError is raised by every rank alike (engine/checkpoint.py)
        every_rank = isinstance(exc, CheckpointError) or getattr(exc, "every_rank", False)
        if not every_rank or os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
