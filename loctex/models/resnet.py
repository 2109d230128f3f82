"""ResNet-18/34/50/101 visual backbones: ``torchvision.models``' own ResNet.

Taking torchvision's modules (not a copy of them) keeps the state-dict keys, the parameter counts,
the initialization and the stride on the 3x3 conv of a bottleneck ("ResNet v1.5") torchvision's by
construction, so exported weights load into torchvision, detectron2 (via ``loctex.export``) and
Mask R-CNN's FPN body unchanged. Weights are never downloaded (``weights=None`` is implied: the
backbones start from torchvision's random initialization).

``ResNet.forward`` returns the last feature map (stride 32, ``[B, C, S/32, S/32]``) and its global
average (``[B, C]``, taken before ``fc``). ``fc`` exists only so that the keys match torchvision's
fully; the LocTex model freezes it because pre-training never uses it. Channels-last inputs stay
channels-last (torchvision's blocks assume no memory format).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

# name -> (block, blocks per stage), torchvision's definitions of each depth
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (tv.BasicBlock, (2, 2, 2, 2)),
    "resnet34": (tv.BasicBlock, (3, 4, 6, 3)),
    "resnet50": (tv.Bottleneck, (3, 4, 6, 3)),
    "resnet101": (tv.Bottleneck, (3, 4, 23, 3)),
}


class ResNet(tv.ResNet):
    """torchvision's ResNet whose forward stops before ``fc`` and also returns the feature map."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], num_classes: int = 1000,
                 zero_init_residual: bool = False):
        super().__init__(block, list(layers), num_classes=num_classes,
                         zero_init_residual=zero_init_residual)
        self.out_channels = 512 * block.expansion

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """-> the last feature map, stride 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (feature map [B, C, S/32, S/32], pooled [B, C]); ``fc`` is not applied."""
        fmap = self.forward_features(x)
        return fmap, torch.flatten(self.avgpool(fmap), 1)


def build_resnet(name: str, zero_init_residual: bool = False, num_classes: int = 1000) -> ResNet:
    if name not in ARCHS:
        raise ValueError(f"unknown visual backbone {name!r}; one of {sorted(ARCHS)}")
    block, layers = ARCHS[name]
    return ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
