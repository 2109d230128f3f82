"""Config system: defaults <- YAML <- dotted overrides, validation, save/load (DESIGN §7)."""
from pathlib import Path

import pytest

from loctex.config import Config, ConfigError, from_dict, load_config, save_config, to_dict

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


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
