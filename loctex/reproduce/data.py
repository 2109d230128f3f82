"""The study's data: the embedded set (``loctex synth``), one tokenizer trained on all the training
captions (so that every run has the same architecture), the prepared train and val splits, and for
each seed and pre-training data fraction a prepared subset of the training images (nested: the 25%
images are among the 50%; all the narratives of a chosen image are kept)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .plan import pct

SUBSET_SEED = 1000  # offset: the pre-training subsets are drawn apart from the target label subsets


def _loctex(*argv: str) -> None:
    from loctex.cli import main
    rc = main(list(argv))
    if rc:
        raise SystemExit(f"loctex {argv[0]} failed (exit {rc})")


@dataclass(frozen=True)
class StudyData:
    synth: Path        # the `loctex synth` directory (images, narratives, instances, groundings)
    work: Path         # OUT/prepared

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer.json"

    def prepared(self, split: str) -> Path:
        return self.work / split

    def subset(self, seed: int, fraction: float) -> Path:
        """The prepared training narratives of a pre-training data fraction for a seed."""
        if fraction == 1.0:
            return self.prepared("train")
        return self.work / f"train-d{pct(fraction)}-s{seed}"

    def instances(self, split: str) -> Path:
        return self.synth / f"instances_{split}.json"

    @property
    def images(self) -> Path:
        return self.synth / "images"

    def groundings(self, split: str) -> Path:
        return self.synth / f"groundings_{split}.jsonl"


def prepare(out: Path, synth_dir: str | None, images: int, val_fraction: float) -> StudyData:
    """Synthesize (unless ``synth_dir`` is given or ``OUT/data`` holds it), train the tokenizer and
    prepare both splits; each step is skipped when its output is there."""
    synth = Path(synth_dir) if synth_dir else out / "data"
    if not (synth / "synth.json").is_file():
        if synth_dir:
            raise SystemExit(f"--data {synth_dir}: no synth.json (not a `loctex synth` directory)")
        _loctex("synth", "--out", str(synth), "--num-images", str(images), "--seed", "0",
                "--val-fraction", str(val_fraction))
    data = StudyData(synth.resolve(), (out / "prepared").resolve())
    if not data.tokenizer.is_file():
        _loctex("tokenizer", "train", "--narratives", str(synth / "narratives_train.jsonl"),
                "--vocab-size", "2000", "--out", str(data.tokenizer))
    for split in ("train", "val"):
        _prepare(data, synth / f"narratives_{split}.jsonl", data.prepared(split))
    return data


def _prepare(data: StudyData, narratives: Path, dest: Path) -> None:
    if not (dest / "manifest.json").is_file():
        _loctex("prepare", "--narratives", str(narratives), "--images", str(data.images),
                "--out", str(dest), "--tokenizer", str(data.tokenizer))


def prepare_subset(data: StudyData, seed: int, fraction: float) -> Path:
    """The prepared subset (see the module doc); a no-op for 1.0 and when it exists."""
    from loctex.eval.coco_sets import label_subsets

    dest = data.subset(seed, fraction)
    if fraction == 1.0 or (dest / "manifest.json").is_file():
        return dest
    lines = (data.synth / "narratives_train.jsonl").read_text().splitlines()
    image_ids = sorted({str(json.loads(line)["image_id"]) for line in lines if line.strip()})
    keep = {image_ids[i] for i in label_subsets(len(image_ids), [fraction],
                                                SUBSET_SEED + seed)[fraction]}
    chosen = [line for line in lines if line.strip() and str(json.loads(line)["image_id"]) in keep]
    narratives = data.work / f"narratives_train-d{pct(fraction)}-s{seed}.jsonl"
    narratives.write_text("\n".join(chosen) + "\n")
    _prepare(data, narratives, dest)
    return dest
