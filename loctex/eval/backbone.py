"""One way to get a visual backbone for every evaluation: ``load_backbone(weights, arch)``.

``weights`` is one of
* ``random``: a freshly initialized ResNet (torchvision's init), the baseline;
* a file of torchvision-keyed weights: ``loctex export --format torchvision`` output, a torchvision
  model zoo file, or any torchvision-format ResNet checkpoint (``.pth``/``.pt`` read with
  ``torch.load(weights_only=True)``, ``.safetensors`` with safetensors). Wrappers (``state_dict``,
  ``model``) and key prefixes (``module.``, ``visual.``, ``backbone.``, ...) are found and removed;
* a run directory or a checkpoint directory of the engine: the whole model is loaded with
  ``loctex.checkpoints.load_model`` and its visual backbone kept.
``arch`` is ``auto`` (read from the weights; resnet50 for ``random``) or a ResNet name.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from loctex.models.resnet import ARCHS, ResNet, build_resnet

# Which arch a torchvision state dict is: (bottleneck?, blocks in layer3) -> name
_BY_SHAPE = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
             (True, 23): "resnet101"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, never unpickling arbitrary objects (DESIGN §2.2)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the message names the file and why
        raise ValueError(f"{path}: not a weights-only torch file ({exc})") from None
    # unwrap the usual containers ({"state_dict": ...}, {"model": ...}) until tensors appear
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [v for k, v in obj.items() if k in ("state_dict", "model", "module", "visual")
                 and isinstance(v, dict)]
        if not inner:
            raise ValueError(f"{path}: no tensors found (keys: {sorted(obj)[:10]})")
        obj = inner[0]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def resnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefix under which a torchvision ResNet sits (``module.visual.`` etc.)."""
    prefixes = {k[: -len("layer4.0.conv1.weight")] for k in state if k.endswith("layer4.0.conv1.weight")}
    if not prefixes:
        raise ValueError("these weights hold no torchvision-style ResNet (no 'layer4.0.conv1.weight'); "
                         "detectron2-format files are for detectron2, export --format torchvision")
    # several candidates (e.g. a teacher and a student): prefer the one that looks like the visual tower
    prefix = sorted(prefixes, key=lambda p: (not re.search(r"(visual|backbone|encoder)", p), len(p)))[0]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", k))}
    key = (bottleneck, max(blocks) + 1 if blocks else 0)
    if key not in _BY_SHAPE:
        raise ValueError(f"cannot tell the ResNet depth (bottleneck={key[0]}, layer3 blocks={key[1]})")
    return _BY_SHAPE[key]


def load_backbone(weights: str, arch: str = "auto") -> ResNet:
    """-> a ResNet in eval mode on the CPU (see the module docstring for ``weights``)."""
    if arch != "auto" and arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of auto, {', '.join(sorted(ARCHS))}")
    if weights == "random":
        return build_resnet("resnet50" if arch == "auto" else arch).eval()
    path = Path(weights)
    if path.is_dir():
        from loctex.checkpoints import load_model
        visual = load_model(path).visual.float().cpu()
        if arch != "auto" and ARCHS[arch][1] != tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5)):
            raise ValueError(f"{weights} holds a different backbone than --arch {arch}")
        return visual.eval()
    if not path.exists():
        raise FileNotFoundError(f"--weights {weights}: no such file or directory (or 'random')")
    state = resnet_keys(read_state_dict(path))
    model = build_resnet(infer_arch(state) if arch == "auto" else arch)
    # fc is never used (and exports may drop it or carry another class count)
    state = {k: v.float() for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit: say which file, in one line
        raise ValueError(f"{weights}: does not fit a {arch if arch != 'auto' else infer_arch(state)}: "
                         f"{' '.join(str(exc).partition(':')[2].split())[:400]}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def batchnorm_never_saw_data(model: torch.nn.Module) -> bool:
    """Every BatchNorm still holds its initial statistics (no batch counted, mean 0, variance 1):
    a randomly initialized backbone, whose frozen BatchNorm would normalize nothing."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return bool(bns) and all(int(m.num_batches_tracked) == 0 and not m.running_mean.any()
                             and bool((m.running_var == 1).all()) for m in bns)


@torch.no_grad()
def estimate_batchnorm_statistics(model: torch.nn.Module, images: torch.Tensor,
                                  batch_size: int = 16) -> torch.nn.Module:
    """Replace the BatchNorm running statistics of ``model`` (in place) by their average over
    ``images`` [N, 3, H, W] (moved in batches to the model's device); the weights are left alone.
    -> ``model`` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    device = next(model.parameters()).device
    for s in range(0, len(images), batch_size):
        model(images[s: s + batch_size].to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()
