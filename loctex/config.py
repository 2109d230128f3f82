"""Experiment configuration: dataclass defaults <- YAML file <- dotted ``key=value`` overrides.

Every experiment is a config file (DESIGN §7 lists the keys scripts rely on). Unknown keys are
errors that name the key, values are type-checked against the defaults, and the merged config is
saved as ``RUN_DIR/config.yaml`` with every run so that a run can be reproduced from its directory.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    prepared: str = ""            # a directory written by `loctex prepare`
    val_prepared: str = ""        # optional held-out prepared directory (validation, eval)
    backend: str = "auto"         # auto | dali | torch
    image_size: int = 128
    num_workers: int = 2
    crop_scale_min: float = 0.5   # random resized crop: smallest area fraction kept
    flip_prob: float = 0.5
    color_jitter: float = 0.2
    max_tokens: int = 48          # captions are truncated to this many tokens (specials included)
    window_pad_s: float = 0.2     # DESIGN §2.3: added on both sides of each token's time window
    lag_s: float = 0.0            # DESIGN §2.3: shifts every window (trace lags speech if > 0)
    point_weight_cap_s: float = 0.2


@dataclass
class TextConfig:
    layers: int = 2
    width: int = 256
    heads: int = 4
    ffn_mult: int = 4
    max_positions: int = 64
    dropout: float = 0.1


@dataclass
class ModelConfig:
    visual: str = "resnet18"      # resnet18 | resnet34 | resnet50 | resnet101
    embed_dim: int = 512          # shared image/caption embedding
    attention_dim: int = 256      # cross-modal attention projections
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: str = ""           # tokenizer.json; default: the one inside data.prepared
    zero_init_residual: bool = True
    channels_last: bool = False
    logit_scale_init: float = 2.6592  # log(1/0.07), CLIP's init


@dataclass
class LossConfig:
    localization_weight: float = 1.0   # 0 = contrastive-only baseline
    localization_type: str = "kl"      # kl | ce | l1 | mse
    sigma: float = 0.08                # rendering bandwidth, normalized image units
    attention_scale: float = 0.0       # 0: 1/sqrt(attention_dim)


@dataclass
class OptimConfig:
    name: str = "adamw"           # adamw | lamb
    lr: float = 1e-3              # visual backbone + heads
    text_lr: float = 5e-4         # textual backbone
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = 300
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"          # auto | never | PATH
    log_every: int = 10
    val_every: int = 0            # 0: only at the end
    vis_every: int = 0            # attention-map PNG grid; 0: only at the end


@dataclass
class ZeroConfig:
    stage: int = 0                # 0-3


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    precision: str = "fp32"       # fp32 | bf16 | fp16
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)


CHOICES = {
    "data.backend": {"auto", "dali", "torch"},
    "model.visual": {"resnet18", "resnet34", "resnet50", "resnet101"},
    "loss.localization_type": {"kl", "ce", "l1", "mse"},
    "optim.name": {"adamw", "lamb"},
    "precision": {"fp32", "bf16", "fp16"},
    "zero.stage": {0, 1, 2, 3},
}


class ConfigError(ValueError):
    pass


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; accept what float() accepts
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. train.resume=12 from the command line
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected int, got {value!r}")
    return value


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known under '{prefix or '.'}': "
                              f"{', '.join(sorted(names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; got {v!r}")
            _merge(current, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=10", "loss.sigma=0.1"]`` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        _set_dotted(tree, k.strip(), yaml.safe_load(v) if v != "" else "")
    return tree


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        value = cfg
        for p in dotted.split("."):
            value = getattr(value, p)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}': {value!r} is not one of {sorted(allowed)}")
    if cfg.loss.localization_weight < 0:
        raise ConfigError("config key 'loss.localization_weight' must be >= 0")
    text = cfg.model.text
    if text.width % text.heads:
        raise ConfigError(f"config key 'model.text.width': {text.width} is not divisible by "
                          f"model.text.heads={text.heads}")
    if cfg.data.max_tokens > text.max_positions:
        raise ConfigError(f"config key 'data.max_tokens': {cfg.data.max_tokens} exceeds "
                          f"model.text.max_positions={text.max_positions}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        _merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
