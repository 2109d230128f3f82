"""Evaluation sets read from a COCO instances file (the embedded set's, or COCO's own): where a
split's files lie, image-level multi-label targets for the linear probe, semantic masks for the
dense evaluations, and the seeded label-fraction subsets every transfer protocol trains on."""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = 255


def synth_split(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(instances json, images folder) of a split of a ``loctex synth`` directory."""
    data_dir = Path(data_dir)
    instances = data_dir / f"instances_{split}.json"
    if not instances.is_file():
        raise FileNotFoundError(f"{instances}: not found ({data_dir} is not a `loctex synth` output?)")
    return instances, data_dir / "images"


def coco_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(instances json, images folder) of a split of a COCO-format directory: a ``loctex synth``
    output (``instances_{split}.json`` + ``images/``) or COCO's layout
    (``annotations/instances_{split}2017.json`` + ``{split}2017/``; any ``instances_{split}*.json``
    whose suffix names the image folder, or ``images/``)."""
    root = Path(root)
    if (root / f"instances_{split}.json").is_file():
        return synth_split(root, split)
    candidates = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not candidates:
        raise FileNotFoundError(f"{root}: neither instances_{split}.json (a `loctex synth` output) "
                                f"nor annotations/instances_{split}*.json (COCO's layout)")
    instances = candidates[0]
    named = root / instances.stem[len("instances_"):]  # instances_train2017.json -> train2017/
    images = next((d for d in (named, root / split, root / "images") if d.is_dir()), None)
    if images is None:
        raise FileNotFoundError(f"{root}: no image folder for {instances.name} "
                                f"(looked for {named.name}/, {split}/, images/)")
    return instances, images


def label_subsets(n: int, fractions, seed: int = 0) -> dict[float, np.ndarray]:
    """Sorted indices of a seeded random subset of n items per fraction (at least one item). The
    subsets are nested: for one seed the 10% items are among the 50%, which are among the 100%."""
    order = np.random.default_rng(seed).permutation(n)
    return {f: np.sort(order[: max(1, round(f * n))]) for f in fractions}


def read_coco(instances_json: str | Path):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        return COCO(str(instances_json))


@dataclass
class LabelSet:
    paths: list[str]
    labels: np.ndarray      # int8 [N, K]: 1 present, -1 absent (VOC's convention, no difficult)
    class_names: list[str]


@dataclass
class SegmentationSet:
    paths: list[str]
    masks: np.ndarray       # uint8 [N, S, S]: 0 background, 1..K categories, 255 ignored
    class_names: list[str]  # index 0 is "background"


def _images(coco, images_dir, max_images):
    ids = sorted(coco.getImgIds())[:max_images]
    infos = coco.loadImgs(ids)
    return infos, [str(Path(images_dir) / i["file_name"]) for i in infos]


def load_label_set(instances_json: str | Path, images_dir: str | Path,
                   max_images: int | None = None) -> LabelSet:
    """Which categories each image holds (crowd annotations count as present)."""
    coco = read_coco(instances_json)
    cat_ids = sorted(coco.getCatIds())
    col = {c: i for i, c in enumerate(cat_ids)}
    infos, paths = _images(coco, images_dir, max_images)
    labels = -np.ones((len(infos), len(cat_ids)), np.int8)
    for r, info in enumerate(infos):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            labels[r, col[ann["category_id"]]] = 1
    return LabelSet(paths, labels, [coco.loadCats(c)[0]["name"] for c in cat_ids])


def load_segmentation_set(instances_json: str | Path, images_dir: str | Path, size: int,
                          max_images: int | None = None) -> SegmentationSet:
    """Semantic masks at size x size (nearest): objects painted largest first, so that a small
    object lying on a large one stays visible; crowd regions are ignored (255)."""
    from PIL import Image

    coco = read_coco(instances_json)
    cat_ids = sorted(coco.getCatIds())
    label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
    infos, paths = _images(coco, images_dir, max_images)
    masks = np.zeros((len(infos), size, size), np.uint8)
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        for r, info in enumerate(infos):
            sem = np.zeros((info["height"], info["width"]), np.uint8)
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=info["id"])), key=lambda a: -a["area"])
            for ann in anns:
                sem[coco.annToMask(ann).astype(bool)] = (IGNORE if ann.get("iscrowd", 0)
                                                         else label_of[ann["category_id"]])
            masks[r] = np.asarray(Image.fromarray(sem).resize((size, size), Image.NEAREST))
    return SegmentationSet(paths, masks, ["background"] + [coco.loadCats(c)[0]["name"] for c in cat_ids])
