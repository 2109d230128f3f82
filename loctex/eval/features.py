"""Frozen-backbone feature extraction shared by the evaluations: decode, resize, normalize, run the
backbone in batches (a DataLoader decodes in worker processes while the backbone runs)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loctex.data.augment import normalize_
from loctex.models.resnet import ResNet


def load_image(path: str, size: int, center_crop: bool) -> torch.Tensor:
    """-> normalized float [3, size, size]. ``center_crop``: shorter side to ``size`` then the
    central square (VirTex's VOC transform); otherwise the whole image squashed to size x size
    (dense tasks and labels about the whole image keep every object)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if center_crop:
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                           Image.BILINEAR)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            im = im.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return normalize_(x)  # ImageNet statistics, as in pre-training


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Normalized float [N, 3, size, size], each image squashed to size x size (``load_image``)."""
    return torch.stack([load_image(p, size, center_crop=False) for p in paths])


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: int, center_crop: bool):
        self.paths, self.size, self.center_crop = list(paths), size, center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size, self.center_crop)


def image_batches(paths: Sequence[str], size: int, center_crop: bool = False,
                  batch_size: int = 64, num_workers: int = 2):
    ds = ImageFiles(paths, size, center_crop)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                       shuffle=False)


@torch.no_grad()
def pooled_features(backbone: ResNet, paths: Sequence[str], size: int, center_crop: bool = False,
                    batch_size: int = 64, num_workers: int = 2,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Frozen ``layer4``, global average pool, L2-normalize: float32 [N, C] (VirTex's VOC07)."""
    backbone = backbone.to(device).eval()
    out = []
    for x in image_batches(paths, size, center_crop, batch_size, num_workers):
        _, pooled = backbone(x.to(device))
        out.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, backbone.out_channels), np.float32)


def feature_pyramid(backbone: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layer2, layer3, layer4 (strides 8, 16, 32) for the dense evaluations (with
    gradients: the fine-tuned segmentation trains through it; the probe calls it under no_grad)."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    c2 = backbone.layer2(backbone.layer1(x))
    c3 = backbone.layer3(c2)
    return [c2, c3, backbone.layer4(c3)]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
