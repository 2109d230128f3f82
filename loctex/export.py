"""``loctex export``: the pre-trained visual backbone as weights for downstream frameworks.

    loctex export --checkpoint RUN_OR_CHECKPOINT_DIR --format torchvision --out r50.pth
    loctex export --checkpoint RUN_OR_CHECKPOINT_DIR --format detectron2  --out r50_d2.pkl

``--checkpoint`` is a run directory, its ``checkpoints/`` directory or one checkpoint (tag)
directory; ZeRO shards are consolidated to float32 (``loctex.checkpoints``).

* ``torchvision``: torchvision's ResNet keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so
  ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` misses only ``fc.*`` (the
  pre-training never trains ``fc``; ``--keep-fc`` keeps its untrained weights).
* ``detectron2``: the names VirTex maps them to: ``layer1-4`` -> ``res2-5``, ``bnN`` -> ``convN.norm``,
  ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``, and the stem under
  ``stem.`` (``stem.conv1``, ``stem.conv1.norm``); ``num_batches_tracked`` dropped.
  Use with ``MODEL.RESNETS.STRIDE_IN_1X1 False``, ``INPUT.FORMAT RGB`` and ImageNet mean/std in
  0-255 units (``PIXEL_MEAN [123.675, 116.28, 103.53]``, ``PIXEL_STD [58.395, 57.12, 57.375]``).

The file format follows the extension of ``--out``: ``.pth``/``.pt`` (``torch.save``; a plain state
dict for torchvision, ``{"model": sd, "__author__": "loctex", "matching_heuristics": True}`` for
detectron2), ``.pkl`` (detectron2's model-zoo pickle: the same dict with numpy arrays) or
``.safetensors`` (the flat state dict; format and author in the metadata).
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import torch

AUTHOR = "loctex"
FORMATS = ("torchvision", "detectron2")


def visual_state_dict(checkpoint: str | Path, keep_fc: bool = False) -> dict[str, torch.Tensor]:
    """torchvision-keyed float32 weights of the visual backbone of a checkpoint."""
    from loctex.checkpoints import consolidated_state_dict, resolve
    sd = consolidated_state_dict(resolve(checkpoint))
    out = {k[len("visual."):]: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}
    if not out:
        raise ValueError(f"{checkpoint}: no 'visual.*' weights in the checkpoint")
    if not keep_fc:
        out = {k: v for k, v in out.items() if not k.startswith("fc.")}
    return out


_STAGE = {f"layer{i}": f"res{i + 1}" for i in range(1, 5)}


def to_detectron2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys -> detectron2 ResNet keys (VirTex's mapping)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        new = re.sub(r"^layer([1-4])", lambda m: _STAGE[m.group(0)], key)
        new = re.sub(r"(^|\.)bn([1-3])\.", r"\1conv\2.norm.", new)
        new = new.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        if not new.startswith("res"):
            new = "stem." + new  # conv1.weight -> stem.conv1.weight, bn1 -> stem.conv1.norm
        out[new] = value
    return out


def write(sd: dict[str, torch.Tensor], out: str | Path, fmt: str, meta: dict | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    meta = {"format": fmt, "author": AUTHOR, **(meta or {})}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(out), metadata={k: str(v) for k, v in meta.items()})
    elif suffix in (".pth", ".pt"):
        if fmt == "detectron2":
            torch.save({"model": sd, "__author__": AUTHOR, "matching_heuristics": True}, out)
        else:
            torch.save(sd, out)
    elif suffix == ".pkl":
        if fmt != "detectron2":
            raise ValueError(".pkl is detectron2's format; use .pth or .safetensors for torchvision")
        with open(out, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": AUTHOR,
                         "matching_heuristics": True}, f)
    else:
        raise ValueError(f"{out}: unknown extension (use .pth, .pt, .pkl or .safetensors)")
    return out


def export(checkpoint: str | Path, fmt: str, out: str | Path, keep_fc: bool = False) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    sd = visual_state_dict(checkpoint, keep_fc=keep_fc)
    if fmt == "detectron2":
        sd = to_detectron2(sd)
    return write(sd, out, fmt, {"source": str(checkpoint)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ directory or one checkpoint directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help=".pth/.pt, .pkl (detectron2) or .safetensors")
    p.add_argument("--keep-fc", action="store_true",
                   help="torchvision: keep the (untrained) fc layer so that strict loading works")


def main(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.format, args.out, keep_fc=args.keep_fc)
    sd_size = out.stat().st_size / 2 ** 20
    print(json.dumps({"out": str(out), "format": args.format, "MiB": round(sd_size, 1)}))
    return 0
