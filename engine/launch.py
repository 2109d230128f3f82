"""Pre-training entry point (DESIGN §5).

    deepspeed engine/launch.py --config configs/X.yaml [key=value ...]        # any number of ranks
    deepspeed --num_gpus 2 engine/launch.py --config configs/embedded.yaml   # 2 CPU ranks (gloo)
    python engine/launch.py --config configs/X.yaml [key=value ...]          # one process
    ... --deepspeed_config ds.json     # use this DeepSpeed JSON ("auto" values filled from ours)

On a machine without CUDA, DeepSpeed's accelerator is the CPU and the ranks talk over gloo; the
launcher starts ``--num_gpus`` CPU ranks. The work is in ``engine/trainer.py``.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LocTex pre-training (DeepSpeed)")
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--deepspeed_config", default=None,
                   help="a DeepSpeed JSON to use instead of the one generated from the config")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="config overrides: key=value (dotted keys)")
    return p.parse_args(argv)


def single_process_defaults() -> None:
    """What a launcher would set, for ``python engine/launch.py`` (one rank)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("LOCTEX_MASTER_PORT", "29511"))
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
    from loctex.engine.trainer import train
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return train(cfg, args.deepspeed_config)


if __name__ == "__main__":
    sys.exit(main())
