"""Config system: defaults <- YAML <- dotted overrides, validation, save/load (DESIGN §7)."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from loctex.config import (CHOICES, RANGES, Config, ConfigError, from_dict, load_config, replace,
                           save_config, to_dict)
from loctex.kernels.reference import LOSS_TYPES
from loctex.models.resnet import ARCHS

# training configs; reproduce_*.yaml describe studies (loctex/reproduce/study.py reads them)
CONFIGS = sorted(p for p in Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml")
                 if not p.name.startswith("reproduce_"))


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config() == Config()


def test_yaml_merges_over_defaults(tmp_path):
    path = write(tmp_path, "seed: 3\nmodel:\n  visual: resnet50\n  text:\n    layers: 4\n"
                           "optim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n")
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.model.visual == "resnet50" and cfg.model.text.layers == 4
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.text.width == Config().model.text.width  # untouched keys keep their defaults
    assert cfg.model.embed_dim == Config().model.embed_dim


def test_overrides_beat_the_file_and_parse_types(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 100\nloss:\n  sigma: 0.05\n")
    cfg = load_config(path, ["train.max_steps=7", "loss.localization_weight=0", "model.channels_last=true",
                             "optim.text_lr=2e-4", "train.resume=never", "data.prepared=/tmp/x",
                             "optim.betas=[0.9,0.95]"])
    assert cfg.train.max_steps == 7
    assert cfg.loss.sigma == 0.05
    assert cfg.loss.localization_weight == 0.0 and isinstance(cfg.loss.localization_weight, float)
    assert cfg.model.channels_last is True
    assert cfg.optim.text_lr == 2e-4
    assert cfg.train.resume == "never" and cfg.data.prepared == "/tmp/x"
    assert cfg.optim.betas == (0.9, 0.95)
    assert load_config(None, ["train.resume=12"]).train.resume == "12"


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_key_error_names_the_key(tmp_path, where):
    if where == "file":
        path = write(tmp_path, "model:\n  text:\n    layerz: 3\n")
        with pytest.raises(ConfigError, match=r"model\.text\.layerz"):
            load_config(path)
    else:
        with pytest.raises(ConfigError, match=r"train\.max_stepz"):
            load_config(None, ["train.max_stepz=3"])


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("model.visual=resnet99", "model.visual"),
    ("loss.localization_type=kld", "loss.localization_type"),
    ("zero.stage=4", "zero.stage"),
    ("model=resnet50", "model"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("loss.localization_weight=-1", "loss.localization_weight"),
    ("model.text.heads=3", "model.text.width"),
    ("data.max_tokens=500", "data.max_tokens"),
])
def test_invalid_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.visual=resnet34", "optim.betas=[0.5,0.6]", "loss.sigma=0.123",
                             "run_dir=runs/x", "zero.stage=2", "precision=bf16"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_repository_configs_load(path):
    load_config(path)


def _leaves(cls, prefix=""):
    """(dotted key, type) of every leaf field of the config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def test_every_numeric_key_is_range_checked():
    numeric = {key for key, typ in _leaves(Config)
               if typ in (int, float) or typing.get_origin(typ) is tuple}
    assert numeric - set(RANGES) - set(CHOICES) == set()
    assert set(RANGES) <= {key for key, _ in _leaves(Config)}  # no stale entry


def test_choices_come_from_their_one_source():
    assert CHOICES["model.visual"] == set(ARCHS)
    assert CHOICES["loss.localization_type"] == set(LOSS_TYPES)


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=-1", "config key 'train.checkpoint_every': -1 is outside [0, inf)"),
    ("train.log_every=-5", "config key 'train.log_every': -5 is outside [0, inf)"),
    ("train.micro_batch_size=0", "config key 'train.micro_batch_size': 0 is outside [1, inf)"),
    ("train.gradient_accumulation_steps=0", "'train.gradient_accumulation_steps': 0 is outside [1, inf)"),
    ("train.max_steps=0", "'train.max_steps': 0 is outside [1, inf)"),
    ("train.max_skipped_steps=-1", "'train.max_skipped_steps': -1 is outside [0, inf)"),
    ("data.image_size=0", "'data.image_size': 0 is outside [32, inf), multiples of 32"),
    ("data.image_size=100", "'data.image_size': 100 is not a multiple of 32"),
    ("data.image_size=-64", "'data.image_size': -64 is outside [32, inf)"),
    ("data.num_workers=-1", "'data.num_workers': -1 is outside [0, inf)"),
    ("data.crop_scale_min=0", "'data.crop_scale_min': 0.0 is outside (0, 1]"),
    ("data.flip_prob=1.5", "'data.flip_prob': 1.5 is outside [0, 1]"),
    ("data.color_jitter=-0.1", "'data.color_jitter': -0.1 is outside [0, 1]"),
    ("data.max_tokens=2", "'data.max_tokens': 2 is outside [3, inf)"),
    ("data.window_pad_s=-0.2", "'data.window_pad_s': -0.2 is outside [0, inf)"),
    ("data.lag_s=.inf", "'data.lag_s': inf is outside (-inf, inf)"),
    ("data.point_weight_cap_s=0", "'data.point_weight_cap_s': 0.0 is outside (0, inf)"),
    ("loss.sigma=0", "'loss.sigma': 0.0 is outside (0, inf)"),
    ("loss.sigma=.nan", "'loss.sigma': nan is outside (0, inf)"),
    ("loss.localization_weight=-1", "'loss.localization_weight': -1.0 is outside [0, inf)"),
    ("loss.attention_scale=-1", "'loss.attention_scale': -1.0 is outside [0, inf)"),
    ("optim.lr=0", "'optim.lr': 0.0 is outside (0, inf)"),
    ("optim.text_lr=-1e-4", "'optim.text_lr': -0.0001 is outside (0, inf)"),
    ("optim.weight_decay=-0.01", "'optim.weight_decay': -0.01 is outside [0, inf)"),
    ("optim.betas=[0.9,1.0]", "'optim.betas': 1.0 is outside [0, 1)"),
    ("optim.warmup_steps=-1", "'optim.warmup_steps': -1 is outside [0, inf)"),
    ("optim.min_lr_ratio=2", "'optim.min_lr_ratio': 2.0 is outside [0, 1]"),
    ("optim.grad_clip=-1", "'optim.grad_clip': -1.0 is outside [0, inf)"),
    ("model.embed_dim=0", "'model.embed_dim': 0 is outside [1, inf)"),
    ("model.attention_dim=0", "'model.attention_dim': 0 is outside [1, inf)"),
    ("model.logit_scale_init=5", "'model.logit_scale_init': 5.0 is outside (-inf, 4.60517]"),
    ("model.text.layers=0", "'model.text.layers': 0 is outside [1, inf)"),
    ("model.text.dropout=1", "'model.text.dropout': 1.0 is outside [0, 1)"),
    ("model.text.heads=0", "'model.text.heads': 0 is outside [1, inf)"),
    ("seed=-1", "'seed': -1 is outside [0, inf)"),
    ("zero.stage=4", "'zero.stage': 4 is not one of [0, 1, 2, 3]"),
])
def test_each_range_error_names_the_key_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_range_errors_in_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "train:\n  log_every: -1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config key 'train.log_every': -1 is "
                                                    "outside [0, inf)")):
        load_config(path)


@pytest.mark.parametrize("text, line", [
    ("seed: 1\ntrain:\n  max_steps: [1, 2\n", 4),          # unclosed flow sequence
    ("seed: 1\ndata:\n  prepared: x\n   backend: torch\n", 4),  # bad indentation
    ("seed: 1\nmodel: {visual: resnet18\n", 3),
])
def test_yaml_syntax_errors_name_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: YAML syntax error: ", str(err.value)), str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.yaml'}: No such file")):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen_and_replace_returns_a_validated_copy():
    cfg = load_config(None, ["train.micro_batch_size=4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.micro_batch_size = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    new = replace(cfg, {"train.micro_batch_size": 8, "loss.sigma": 1, "precision": "bf16"})
    assert new.train.micro_batch_size == 8 and new.loss.sigma == 1.0 and isinstance(new.loss.sigma, float)
    assert new.precision == "bf16" and new.train.max_steps == cfg.train.max_steps
    assert cfg.train.micro_batch_size == 4 and cfg.precision == "fp32"  # the original is untouched
    with pytest.raises(ConfigError, match="'train.micro_batch_size': 0 is outside"):
        replace(cfg, {"train.micro_batch_size": 0})
    with pytest.raises(ConfigError, match="unknown config key 'train.micro_batch'"):
        replace(cfg, {"train.micro_batch": 8})


def test_new_keys_and_their_defaults():
    cfg = Config()
    assert cfg.train.max_skipped_steps == 20 and cfg.model.compile is False
    assert load_config(None, ["model.compile=true"]).model.compile is True


def test_an_error_names_the_file_only_when_the_value_came_from_it(tmp_path):
    path = write(tmp_path, "data:\n  image_size: 100\ntrain:\n  log_every: 5\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config key 'data.image_size': 100")):
        load_config(path, ["train.log_every=2"])
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.log_every=-2", "data.image_size=96"])
    assert str(err.value).startswith("config key 'train.log_every': -2") and err.value.key == "train.log_every"
    assert load_config(path, ["data.image_size=96"]).data.image_size == 96  # the override repairs it
