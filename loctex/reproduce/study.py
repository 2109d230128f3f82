"""The study's settings: a frozen ``Study`` read from a YAML file (``configs/reproduce_quick.yaml``,
``reproduce_full.yaml``, ``reproduce_cuda.yaml``) with dotted ``key=value`` overrides, like every
other experiment of the project. Every key must be in the file (there are no hidden defaults), so
that the file alone says what a run measured."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class PretrainPlan:
    steps: int                           # optimizer steps of every pre-training, whatever its data
    checkpoint_every: int                # engine checkpoints (an interrupted run resumes from them)
    data_fractions: tuple[float, ...]    # shares of the training images (the data-efficiency curve)
    engine: dict                         # overrides of configs/embedded*.yaml, every method alike


@dataclass(frozen=True)
class TransferPlan:
    task: str                            # segmentation (fine-tuned, mIoU) | maskrcnn (mask AP)
    label_fractions: tuple[float, ...]   # shares of the target training labels
    steps: int                           # fine-tuning steps (iterations), every fraction alike
    batch_size: int
    pretrain_label_fraction: float       # the label fraction of the pre-training-data curve


@dataclass(frozen=True)
class Study:
    name: str
    seeds: int                           # pre-training seeds 0..seeds-1
    images: int                          # synthesized images, train + val
    val_fraction: float
    image_size: int                      # pre-training, transfer and probes alike
    device: str                          # cpu | cuda
    pretrain: PretrainPlan
    transfer: TransferPlan
    covers: str                          # what the budget covers, one paragraph for results.md


TASKS = ("segmentation", "maskrcnn")


def config_file(name: str) -> Path:
    """A shipped config (``loctex.configs``: the package data, in a checkout ``configs/``)."""
    from loctex import configs
    return configs.path(name)


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"study key '{where}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown, missing = set(data) - set(fields), set(fields) - set(data)
    if unknown or missing:
        def dotted(keys):
            return ", ".join(f"{where}.{k}".lstrip(".") for k in sorted(keys)) or "none"
        raise ValueError(f"study config: unknown keys: {dotted(unknown)}; missing keys: "
                         f"{dotted(missing)}")
    values = {}
    for name, value in data.items():
        typ, key = hints[name], f"{where}.{name}".lstrip(".")
        if dataclasses.is_dataclass(typ):
            value = _build(typ, value, key)
        elif typing.get_origin(typ) is tuple:
            value = tuple(float(v) for v in value)
        elif typ is float:
            value = float(value)
        elif typ is dict:
            value = dict(value or {})
        elif not isinstance(value, typ) or isinstance(value, bool) != (typ is bool):
            raise ValueError(f"study key '{key}': expected {typ.__name__}, got {value!r}")
        values[name] = value
    return cls(**values)


def _merge(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    from loctex.config import parse_overrides
    data = yaml.safe_load(Path(path).read_text()) or {}
    data = _merge(data, parse_overrides(list(overrides)))
    study = _build(Study, data, "")
    check(study)
    return study


def check(study: Study) -> None:
    t, p = study.transfer, study.pretrain
    if study.device not in ("cpu", "cuda"):
        raise ValueError(f"study key 'device': cpu or cuda, got {study.device!r}")
    if t.task not in TASKS:
        raise ValueError(f"study key 'transfer.task': one of {TASKS}, got {t.task!r}")
    for key, fractions in (("pretrain.data_fractions", p.data_fractions),
                           ("transfer.label_fractions", t.label_fractions)):
        if list(fractions) != sorted(set(fractions)) or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"study key '{key}': increasing fractions in (0, 1], got {fractions}")
    if 1.0 not in p.data_fractions:
        raise ValueError("study key 'pretrain.data_fractions' must include 1.0 (the full set)")
    if t.pretrain_label_fraction not in t.label_fractions:
        raise ValueError("study key 'transfer.pretrain_label_fraction' must be one of "
                         "transfer.label_fractions (its 100%-data point is that cell)")
    if study.seeds < 1 or p.steps < 1 or t.steps < 1:
        raise ValueError("study keys 'seeds', 'pretrain.steps' and 'transfer.steps' must be >= 1")


def as_dict(study: Study) -> dict:
    return dataclasses.asdict(study)


def flat_overrides(tree: dict, prefix: str = "") -> list[str]:
    """``{"data": {"image_size": 96}}`` -> ``["data.image_size=96"]`` (the engine's command line)."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += flat_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v if isinstance(v, str) else json.dumps(v)}")
    return out
