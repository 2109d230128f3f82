"""The DeepSpeed JSON config, generated from our config or passed through (``--deepspeed_config``).

Generated: ZeRO stage (``zero.stage``), bf16 or fp16 with a dynamic loss scale (``precision``),
micro-batch and gradient accumulation (``train.*``), gradient clipping (``optim.grad_clip``).
Passed through: the user's JSON is used as it is, except that values written as ``"auto"`` (the
Hugging Face convention) are filled from our config; the batch keys it sets win over ours, and
``sync_config`` returns our config with them, so that the loader, the logs and the checkpoints agree
with what DeepSpeed runs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from loctex import config
from loctex.config import Config

log = logging.getLogger(__name__)

# fp16 dynamic loss scale (loss_scale 0 = dynamic): DeepSpeed's defaults, written out so that a
# run's config.yaml / ds_config.json say what ran.
FP16_DYNAMIC = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def generate(cfg: Config, world_size: int, on_cuda: bool) -> dict:
    """A DeepSpeed config for ``cfg`` on ``world_size`` ranks."""
    t = cfg.train
    stage = cfg.zero.stage
    zero: dict = {"stage": stage}
    if stage >= 1:
        # overlapping the reduction with the backward needs a side stream: CUDA only
        zero.update(contiguous_gradients=True, overlap_comm=on_cuda,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if stage == 3:
        # export and eval consolidate the shards offline (deepspeed.utils.zero_to_fp32); gathering
        # 16-bit weights at every save would only cost time
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e5))
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": dict(FP16_DYNAMIC) if cfg.precision == "fp16" else {"enabled": False},
        "zero_optimization": zero,
        # LAMB and the CPU LAMB are not on DeepSpeed's list of ZeRO-tested optimizers
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # the engine logs (engine/run_log.py); DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.precision in ("bf16", "fp16"):
        # DeepSpeed casts only the parameters; BatchNorm needs its running statistics in the same
        # dtype as its weight (the ResNet's BN layers would fail on fp32 buffers)
        out["data_types"] = {"buffer_dtype": cfg.precision}
    return out


def _fill_auto(user: dict, ours: dict) -> dict:
    out = {}
    for k, v in user.items():
        if v == "auto":
            if k not in ours:
                raise ValueError(f"deepspeed config: no value to fill for '{k}': \"auto\"")
            out[k] = ours[k]
        elif isinstance(v, dict) and isinstance(ours.get(k), dict):
            out[k] = _fill_auto(v, ours[k])
        else:
            out[k] = v
    return out


def load(path: str | Path, cfg: Config, world_size: int, on_cuda: bool) -> dict:
    """The user's DeepSpeed JSON with ``"auto"`` values filled from our config."""
    with open(path) as f:
        user = json.load(f)
    if not isinstance(user, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object")
    return _fill_auto(user, generate(cfg, world_size, on_cuda))


def sync_config(cfg: Config, ds: dict, world_size: int) -> Config:
    """``cfg`` with the batch, precision, ZeRO and clipping settings of ``ds`` (a new config;
    ``cfg`` is left as it is)."""
    t = cfg.train
    mb = ds.get("train_micro_batch_size_per_gpu", t.micro_batch_size)
    ga = ds.get("gradient_accumulation_steps", t.gradient_accumulation_steps)
    if "train_batch_size" in ds:
        total = int(ds["train_batch_size"])
        if "train_micro_batch_size_per_gpu" not in ds:
            mb = total // (ga * world_size)
        elif "gradient_accumulation_steps" not in ds:
            ga = total // (mb * world_size)
        if mb * ga * world_size != total:
            raise ValueError(f"deepspeed config: train_batch_size {total} != micro-batch {mb} x "
                             f"accumulation {ga} x world size {world_size}")
    for key, new, old in (("train.micro_batch_size", mb, t.micro_batch_size),
                          ("train.gradient_accumulation_steps", ga, t.gradient_accumulation_steps)):
        if int(new) != old:
            log.warning("deepspeed config sets %s=%s (our config said %s)", key, new, old)
    if ds.get("bf16", {}).get("enabled"):
        precision = "bf16"
    elif ds.get("fp16", {}).get("enabled"):
        precision = "fp16"
    else:
        precision = "fp32"
    changes = {"train.micro_batch_size": int(mb), "train.gradient_accumulation_steps": int(ga),
               "precision": precision,
               "zero.stage": int(ds.get("zero_optimization", {}).get("stage", 0))}
    if "gradient_clipping" in ds:
        changes["optim.grad_clip"] = float(ds["gradient_clipping"])
    return config.replace(cfg, changes)
