"""Models: ResNet visual backbones (torchvision keys), the BERT-style textual backbone, the heads,
and ``LocTexModel``, built from a config with ``build_model(cfg, vocab_size)``."""
from .loctex_model import LocTexModel, build_model
from .resnet import ARCHS, ResNet, build_resnet
from .text import TextEncoder

__all__ = ["LocTexModel", "build_model", "ResNet", "build_resnet", "ARCHS", "TextEncoder"]
