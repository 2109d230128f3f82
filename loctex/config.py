"""Experiment configuration: dataclass defaults <- YAML file <- dotted ``key=value`` overrides.

Every experiment is a config file (DESIGN §7 lists the keys scripts rely on). Unknown keys are
errors that name the key, values are type-checked against the defaults, every numeric value is
range-checked (``RANGES``; the message names the key and the allowed range) and each choice is
checked against its one source (``CHOICES``), and the merged config is saved as
``RUN_DIR/config.yaml`` with every run so that a run can be reproduced from its directory.

A config is frozen once loaded: code that needs other values asks for a validated copy,
``replace(cfg, {"train.micro_batch_size": 8})``, so no part of a run sees a config another part
changed under it.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loctex.kernels.reference import LOSS_TYPES
from loctex.models.resnet import ARCHS


@dataclass(frozen=True)
class DataConfig:
    prepared: str = ""            # a directory written by `loctex prepare`
    val_prepared: str = ""        # optional held-out prepared directory (validation, eval)
    backend: str = "auto"         # auto | dali | torch
    image_size: int = 128         # a positive multiple of 32, the backbone's stride
    num_workers: int = 2
    crop_scale_min: float = 0.5   # random resized crop: smallest area fraction kept
    flip_prob: float = 0.5
    color_jitter: float = 0.2
    max_tokens: int = 48          # captions are truncated to this many tokens (specials included)
    window_pad_s: float = 0.2     # DESIGN §2.3: added on both sides of each token's time window
    lag_s: float = 0.0            # DESIGN §2.3: shifts every window (trace lags speech if > 0)
    point_weight_cap_s: float = 0.2


@dataclass(frozen=True)
class TextConfig:
    layers: int = 2
    width: int = 256
    heads: int = 4
    ffn_mult: int = 4
    max_positions: int = 64
    dropout: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    visual: str = "resnet18"      # a name of loctex.models.resnet.ARCHS: resnet18|34|50|101
    embed_dim: int = 512          # shared image/caption embedding
    attention_dim: int = 256      # cross-modal attention projections
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: str = ""           # tokenizer.json; default: the one inside data.prepared
    zero_init_residual: bool = True
    channels_last: bool = False   # NHWC visual backbone (the engine turns it on for CUDA)
    logit_scale_init: float = 2.6592  # log(1/0.07), CLIP's init; at most log(100)
    compile: bool = False         # torch.compile the model (the engine does it)


@dataclass(frozen=True)
class LossConfig:
    localization_weight: float = 1.0   # 0 = contrastive-only baseline
    localization_type: str = "kl"      # one of loctex.kernels.reference.LOSS_TYPES: kl|ce|l1|mse
    sigma: float = 0.08                # rendering bandwidth, normalized image units
    attention_scale: float = 0.0       # 0: 1/sqrt(attention_dim)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"           # adamw | lamb
    lr: float = 1e-3              # visual backbone + heads
    text_lr: float = 5e-4         # textual backbone
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0        # max global gradient norm; 0: no clipping


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = 300
    checkpoint_every: int = 100   # 0: never; a checkpoint is also written at the end and on a signal
    keep_checkpoints: int = 2     # 0: keep all
    resume: str = "auto"          # auto | never | PATH
    log_every: int = 10           # 0: only the last step
    val_every: int = 0            # 0: only at the end
    vis_every: int = 0            # attention-map PNG grid; 0: only at the end
    max_skipped_steps: int = 20   # non-finite steps (skipped) tolerated in a row before the run stops


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0                # 0-3


@dataclass(frozen=True)
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
    "model.visual": set(ARCHS),
    "loss.localization_type": set(LOSS_TYPES),
    "optim.name": {"adamw", "lamb"},
    "precision": {"fp32", "bf16", "fp16"},
    "zero.stage": {0, 1, 2, 3},
}

INF = math.inf


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: ``lo`` to ``hi``, each end included unless ``open_*``;
    ``multiple_of`` further restricts ints. Infinite values are never allowed (nor NaN)."""
    lo: float = -INF
    hi: float = INF
    open_lo: bool = False
    open_hi: bool = False
    multiple_of: int = 1

    def contains(self, v: float) -> bool:
        if not math.isfinite(v) or (self.multiple_of > 1 and v % self.multiple_of):
            return False
        above = v > self.lo if self.open_lo else v >= self.lo
        below = v < self.hi if self.open_hi else v <= self.hi
        return above and below

    def __str__(self) -> str:
        def end(x):
            return "inf" if x == INF else "-inf" if x == -INF else f"{x:g}"
        text = (f"{'(' if self.open_lo or self.lo == -INF else '['}{end(self.lo)}, "
                f"{end(self.hi)}{')' if self.open_hi or self.hi == INF else ']'}")
        return text + (f", multiples of {self.multiple_of}" if self.multiple_of > 1 else "")

    def violation(self, v: float) -> str | None:
        """Why ``v`` is not allowed (None when it is)."""
        if self.contains(v):
            return None
        if math.isfinite(v) and self.multiple_of > 1 and v % self.multiple_of:
            return f"{v!r} is not a multiple of {self.multiple_of} (allowed: {self})"
        return f"{v!r} is outside {self}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, open_lo=True)
FRACTION, FINITE = Range(0, 1), Range()

# every numeric key that CHOICES does not list; test_config checks that none is missing
RANGES: dict[str, Range] = {
    "seed": AT_LEAST_0,
    "data.image_size": Range(32, multiple_of=32),  # the backbone's stride: a whole feature grid
    "data.num_workers": AT_LEAST_0,
    "data.crop_scale_min": Range(0, 1, open_lo=True),
    "data.flip_prob": FRACTION,
    "data.color_jitter": FRACTION,
    "data.max_tokens": Range(3),  # [CLS], [SEP] and at least one word
    "data.window_pad_s": AT_LEAST_0,
    "data.lag_s": FINITE,
    "data.point_weight_cap_s": POSITIVE,
    "model.embed_dim": AT_LEAST_1,
    "model.attention_dim": AT_LEAST_1,
    "model.logit_scale_init": Range(hi=math.log(100.0)),  # the loss clamps exp(scale) at 100
    "model.text.layers": AT_LEAST_1,
    "model.text.width": AT_LEAST_1,
    "model.text.heads": AT_LEAST_1,
    "model.text.ffn_mult": AT_LEAST_1,
    "model.text.max_positions": AT_LEAST_1,
    "model.text.dropout": Range(0, 1, open_hi=True),
    "loss.localization_weight": AT_LEAST_0,
    "loss.sigma": POSITIVE,
    "loss.attention_scale": AT_LEAST_0,
    "optim.lr": POSITIVE,
    "optim.text_lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": Range(0, 1, open_hi=True),
    "optim.warmup_steps": AT_LEAST_0,
    "optim.min_lr_ratio": FRACTION,
    "optim.grad_clip": AT_LEAST_0,
    "train.micro_batch_size": AT_LEAST_1,
    "train.gradient_accumulation_steps": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1,
    "train.checkpoint_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_0,
    "train.log_every": AT_LEAST_0,
    "train.val_every": AT_LEAST_0,
    "train.vis_every": AT_LEAST_0,
    "train.max_skipped_steps": AT_LEAST_0,
}


class ConfigError(ValueError):
    """A bad config; ``key`` is the dotted key at fault when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


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


def _merged(obj: Any, updates: dict, prefix: str = "") -> Any:
    """A copy of the (frozen) dataclass ``obj`` with the nested ``updates`` applied, type-checked."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known under '{prefix or '.'}': "
                              f"{', '.join(sorted(names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; got {v!r}")
            changes[k] = _merged(current, v, key + ".")
        else:
            changes[k] = _coerce(v, hints[k], key)
    return dataclasses.replace(obj, **changes)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    tree[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=10", "loss.sigma=0.1"]`` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': not a YAML value ({_yaml_problem(e)})") from None
        _set_dotted(tree, k.strip(), value)
    return tree


def _lookup(cfg: Config, dotted: str) -> Any:
    value = cfg
    for p in dotted.split("."):
        value = getattr(value, p)
    return value


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the key and what it allows for the first invalid value."""
    for dotted, allowed in CHOICES.items():
        value = _lookup(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}': {value!r} is not one of {sorted(allowed)}",
                              dotted)
    for dotted, allowed in RANGES.items():
        value = _lookup(cfg, dotted)
        for v in (value if isinstance(value, tuple) else (value,)):
            why = allowed.violation(v)
            if why:
                raise ConfigError(f"config key '{dotted}': {why}", dotted)
    text = cfg.model.text
    if text.width % text.heads:
        raise ConfigError(f"config key 'model.text.width': {text.width} is not divisible by "
                          f"model.text.heads={text.heads}", "model.text.width")
    if cfg.data.max_tokens > text.max_positions:
        raise ConfigError(f"config key 'data.max_tokens': {cfg.data.max_tokens} exceeds "
                          f"model.text.max_positions={text.max_positions}", "data.max_tokens")


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None))
                    if x) or str(e).splitlines()[0]


def config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; else, for a bare name (``embedded``, ``embedded.yaml``) or
    ``configs/NAME.yaml``, the config shipped in the package (``loctex.configs``), so that commands
    written against a checkout also work from an installed package in any directory."""
    p = Path(path)
    if p.is_file() or p.parent not in (Path("."), Path("configs")):
        return p
    from loctex import configs
    try:
        return configs.path(p.name)
    except FileNotFoundError:
        return p


def _read_yaml(path: str | Path) -> dict:
    path = config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the YAML file at ``path`` <- ``key=value`` overrides; validated and frozen.
    An error in a value that came from the file names the file."""
    cfg = Config()
    if path:
        try:
            cfg = _merged(cfg, _read_yaml(path))
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}", e.key) from None
    tree = parse_overrides(overrides or [])
    cfg = _merged(cfg, tree)
    try:
        validate(cfg)
    except ConfigError as e:
        if path and not _holds(tree, e.key):
            raise ConfigError(f"{path}: {e}", e.key) from None
        raise
    return cfg


def _holds(tree: dict, dotted: str | None) -> bool:
    """Whether the nested ``tree`` sets the dotted key."""
    for part in (dotted or "").split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return dotted is not None


def replace(cfg: Config, changes: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted-key ``changes`` (``{"train.micro_batch_size": 8}``);
    ``cfg`` itself is frozen and stays as it is."""
    tree: dict = {}
    for dotted, value in changes.items():
        _set_dotted(tree, dotted, value)
    new = _merged(cfg, tree)
    validate(new)
    return new


def to_dict(cfg: Config) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    cfg = _merged(Config(), data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
