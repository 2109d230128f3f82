"""Reading the checkpoints of a training run: find one, verify it, load it safely, rebuild the model.

Layout of ``RUN/checkpoints/`` (written by the engine, ``engine/checkpoint.py``)::

    latest                 the tag of the newest complete checkpoint (replaced atomically)
    step_00000100/         DeepSpeed's files, rng_rank{R}.pt per rank, and loctex_checkpoint.json
    tmp-step_00000200/     a checkpoint being written (never read; removed by the next save)

The manifest ``loctex_checkpoint.json`` lists every file of the checkpoint with its size and a content
checksum (xxh3-128; crc32 where the ``xxhash`` package is missing: it reads 12 GB/s here against
crc32's 2.4), the step, the config and what the model needs to be rebuilt. A checkpoint is *intact*
when the manifest is readable and every file it lists has its recorded size and checksum; only intact
checkpoints are ever resumed from or loaded. ``find_latest`` takes the one ``latest`` names if intact,
else the newest intact one, naming each damaged one it skips in a warning.

Every ``.pt`` is read with ``torch.load(weights_only=True)``: tensors, containers and plain values,
plus the four classes DeepSpeed pickles into its optimizer-state files (``DEEPSPEED_TYPES``, found by
saving ZeRO stages 0-3 in fp32, bf16 and fp16 and listing what the weights-only unpickler rejects).
Anything else is refused with one line naming the file and the type, before it can run (DESIGN §2.2).
DeepSpeed's own readers (``engine.load_checkpoint``, ``zero_to_fp32``) ask for ``weights_only=False``;
``weights_only_loads()`` overrides that while they run.

``load_model(path)`` rebuilds the model on CPU in float32 from a run directory, its ``checkpoints/``
directory or one tag directory; ZeRO shards are consolidated with ``deepspeed.utils.zero_to_fp32``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import pickletools
import re
import zlib
from pathlib import Path

import torch

from loctex.config import from_dict

log = logging.getLogger(__name__)

MANIFEST = "loctex_checkpoint.json"
LATEST = "latest"
TMP_PREFIX = "tmp-"
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, hostile, missing, unwritable); the message is one
    line that names the file or directory."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag_dir: Path) -> int:
    return int(_TAG_RE.match(Path(tag_dir).name).group(1))


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The checkpoint directories (complete or not) under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name)), key=step_of)


# ---- content checksums ---------------------------------------------------------------------------
try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; crc32 keeps a bare install working
    xxhash = None

_CHUNK = 16 << 20


class _Crc32:
    """zlib's crc32 behind hashlib's update/hexdigest."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


HASHES = {"crc32": _Crc32}
if xxhash is not None:
    HASHES["xxh3_128"] = xxhash.xxh3_128
HASH = "xxh3_128" if xxhash is not None else "crc32"  # the one new manifests record


def file_checksum(path: Path, algorithm: str = HASH) -> str:
    h = HASHES[algorithm]()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """What the manifest records of one file."""
    return {"size": Path(path).stat().st_size, HASH: file_checksum(path)}


def _file_problem(tag_dir: Path, name: str, entry) -> str | None:
    f = tag_dir / name
    if not f.is_file():
        return f"{name} is missing"
    size = entry if isinstance(entry, int) else entry["size"]  # an int: a manifest that records sizes only
    if f.stat().st_size != size:
        return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    if isinstance(entry, dict):
        algorithm = next((a for a in entry if a != "size"), None)
        if algorithm is None:
            return None
        if algorithm not in HASHES:
            return f"{name}: cannot verify its {algorithm} checksum (pip install xxhash)"
        if file_checksum(f, algorithm) != entry[algorithm]:
            return f"{name}: its content differs from the manifest's {algorithm} checksum"
    return None


def damage(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be trusted, or None when it is intact (the manifest
    is readable and every file it lists has its size and checksum)."""
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest ({exc})"
    for name, entry in files.items():
        problem = _file_problem(tag_dir, name, entry)
        if problem:
            return problem
    return None


def read_manifest(tag_dir: Path) -> dict:
    """The manifest of a checkpoint (not verified: ``resolve``/``find_latest`` do that)."""
    try:
        return json.loads((Path(tag_dir) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{tag_dir}: no readable checkpoint manifest ({exc})") from None


# ---- finding a checkpoint ------------------------------------------------------------------------
def latest_named(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, unverified (for messages; ``find_latest`` to resume)."""
    latest = Path(ckpt_dir) / LATEST
    with contextlib.suppress(OSError):
        tag = latest.read_text().strip()
        if tag:
            return Path(ckpt_dir) / tag
    return None


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest intact checkpoint under ``ckpt_dir``: the one ``latest`` names if it is intact,
    else the highest step that is. None when there is no checkpoint at all; ``CheckpointError`` when
    there are some and none is intact (starting over would silently throw the run away)."""
    candidates = step_dirs(ckpt_dir)[::-1]
    named = latest_named(ckpt_dir)
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    damaged = []
    for tag_dir in candidates:
        problem = damage(tag_dir)
        if problem is None:
            return tag_dir
        log.warning("checkpoint %s is damaged (%s): skipped for an older one", tag_dir, problem)
        damaged.append(tag_dir.name)
    if damaged:
        raise CheckpointError(f"{ckpt_dir}: no intact checkpoint ({', '.join(damaged)} damaged; see "
                              "the warnings); train.resume=never starts over, train.resume=PATH "
                              "takes a checkpoint you choose")
    return None


def resolve(path: str | Path) -> Path:
    """A run directory, a ``checkpoints/`` directory or a tag directory -> the intact tag directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if (path / MANIFEST).is_file() or _TAG_RE.match(path.name):
        problem = damage(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if (ckpt_dir / LATEST).is_file() or step_dirs(ckpt_dir):
            found = find_latest(ckpt_dir)
            if found is not None:
                return found
    raise CheckpointError(f"{path}: not a run directory, a checkpoints directory or a checkpoint")


# ---- loading safely ------------------------------------------------------------------------------
def deepspeed_types() -> list:
    """The classes DeepSpeed pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16), the only
    non-tensor, non-container types a checkpoint may hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_torch_load = torch.load  # the real one, also while weights_only_loads() replaces torch.load


def _short(path) -> str:
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def _globals_in(path) -> list[str]:
    """``module.name`` of the globals a checkpoint file references beyond torch's weights-only
    defaults, read without unpickling it (for the refusal message)."""
    with contextlib.suppress(Exception):  # torch's own scan reads only torch.save's zip format
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        default = set(_get_allowed_globals())
    except ImportError:
        default = set()
    found, strings = [], []
    with open(path, "rb") as f, contextlib.suppress(Exception):
        while f.peek(1):  # a file may hold several pickles (torch.save's legacy format)
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    return [g for g in found if g not in default]


def _foreign_types(path) -> list[str]:
    """The types a checkpoint file references beyond torch's weights-only defaults and
    ``deepspeed_types()``; foreign ones first (torch's own are refused only for a plain pickle's
    format)."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_types()}
    unsafe = [g for g in _globals_in(path) if g not in allowed]
    return sorted(set(unsafe), key=lambda g: (g.startswith("torch."), unsafe.index(g)))


def _refusal(path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {_short(path)}: refusing to load {what} (not a tensor or a "
                           "DeepSpeed bookkeeping type)")


def _types(names: list[str]) -> str:
    return f"type{'s' if len(names) > 1 else ''} {', '.join(names)}"


def refuse_foreign_types(tag_dir: Path) -> None:
    """``CheckpointError`` when a file of the checkpoint references a type that ``safe_load`` would
    refuse. Reads the pickles without unpickling them (not the tensor data), so that one process can
    check before any process loads."""
    for f in sorted(Path(tag_dir).glob("*.pt")):
        foreign = _foreign_types(f)
        if foreign:
            raise _refusal(f, _types(foreign))


def safe_load(path, map_location="cpu", **kwargs):
    """``torch.load`` of one checkpoint file, weights only (tensors, containers, plain values and
    ``deepspeed_types()``); anything else raises ``CheckpointError`` naming the file and the type."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        foreign = _foreign_types(path)
        if foreign:
            raise _refusal(path, _types(foreign)) from None
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip() or str(exc).strip()
        raise _refusal(path, f"its content ({detail.splitlines()[0] if detail else 'unreadable'})") \
            from None


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside (DeepSpeed's loaders ask for ``weights_only=False``) becomes
    ``safe_load``."""
    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _torch_load


# ---- loading a trained model (eval, export) ------------------------------------------------------
def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full float32 state dict of the model of a checkpoint (ZeRO shards merged); ``tag_dir`` as
    ``resolve`` returns it."""
    tag_dir = Path(tag_dir)
    manifest = read_manifest(tag_dir)
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt file")
    with weights_only_loads():
        module = safe_load(model_states[0])["module"]  # rank 0's (stage 3: one per rank)
        if manifest["zero_stage"] == 0:
            sd = dict(module)
        else:
            # the fp32 master weights, merged from every rank's optimizer shard
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            # frozen parameters have no optimizer state: take the module's own copy (stages 1-2
            # store it whole; a stage-3 partitioned placeholder is empty and is left out)
            for k, v in module.items():
                if k not in sd and v.numel() > 0:
                    sd[k] = v
    return {k: (v.float() if v.is_floating_point() else v).detach() for k, v in sd.items()}


def load_model(path: str | Path, strict: bool = True):
    """The trained model of a run / checkpoint, on CPU, float32, in eval mode."""
    from loctex.models import build_model

    tag_dir = resolve(path)
    manifest = read_manifest(tag_dir)
    cfg = from_dict(manifest["config"])
    sd = consolidated_state_dict(tag_dir)
    model = build_model(cfg, **manifest["model_args"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{tag_dir}: state dict does not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    model.loaded_from = str(tag_dir)
    model.train_config = cfg
    return model


__all__ = ["CheckpointError", "HASH", "LATEST", "MANIFEST", "TMP_PREFIX", "consolidated_state_dict",
           "damage", "deepspeed_types", "file_checksum", "file_entry", "find_latest", "latest_named", "load_model",
           "read_manifest", "refuse_foreign_types", "resolve", "safe_load", "step_dirs", "step_of", "tag_for",
           "weights_only_loads"]
