"""Where a study's pieces live (``OUT/``) and how each backbone is built: the engine config of a
pre-training (configs/embedded.yaml or embedded_contrastive.yaml plus the study's overrides), the run
directories, the backbone weights a measurement loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import StudyData
from .plan import Unit, pct
from .study import Study, config_file, flat_overrides

ENGINE_CONFIGS = {"contrastive": "embedded_contrastive.yaml", "loctex": "embedded.yaml",
                  # the supervised baseline reads LocTex's config: same model, data, order, budget
                  "supervised": "embedded.yaml"}


@dataclass
class Workspace:
    out: Path
    study: Study
    data: StudyData
    workers: int = 2
    _cache: dict = field(default_factory=dict, repr=False)

    def run_dir(self, unit: Unit) -> Path:
        """The directory of the pre-training that ``unit`` measures (or is)."""
        return self.out / "runs" / f"{unit.backbone}-d{pct(unit.data)}-s{unit.seed}"

    def engine_config_file(self, backbone: str) -> Path:
        return config_file(ENGINE_CONFIGS[backbone])

    def engine_overrides(self, unit: Unit) -> list[str]:
        """The command-line overrides of a pre-training: only the run directory, the seed and the
        data subset differ between the runs of a study."""
        p = self.study.pretrain
        return [*flat_overrides(p.engine), f"data.image_size={self.study.image_size}",
                f"run_dir={self.run_dir(unit)}", f"seed={unit.seed}",
                f"data.prepared={self.data.subset(unit.seed, unit.data)}",
                f"train.max_steps={p.steps}", f"train.checkpoint_every={p.checkpoint_every}",
                "train.resume=auto"]

    def engine_config(self, unit: Unit):
        from loctex.config import load_config
        return load_config(self.engine_config_file(unit.backbone), self.engine_overrides(unit))

    @property
    def arch(self) -> str:
        return self.engine_config(Unit("pretrain", "loctex", 0)).model.visual

    def supervised_weights(self, unit: Unit) -> Path:
        return self.run_dir(unit) / "backbone.pth"

    def head_weights(self, unit: Unit) -> Path:
        return self.run_dir(unit) / "attention_head.pt"

    def backbone(self, unit: Unit):
        """The visual backbone ``unit`` measures, float32 on the CPU, eval mode. The random one is
        seeded by the unit's seed, so that seeds are paired across backbones as elsewhere."""
        import torch

        from loctex.eval.backbone import load_backbone
        if unit.backbone == "random":
            torch.manual_seed(unit.seed)
            return load_backbone("random", self.arch)
        if unit.backbone == "supervised":
            return load_backbone(str(self.supervised_weights(unit)), self.arch)
        return load_backbone(str(self.run_dir(unit)), self.arch)

    def segmentation_sets(self):
        """(train, val) ``SegmentationSet`` at the study's image size, read once per process."""
        if "seg" not in self._cache:
            from loctex.eval.coco_sets import load_segmentation_set
            self._cache["seg"] = tuple(
                load_segmentation_set(self.data.instances(s), self.data.images, self.study.image_size)
                for s in ("train", "val"))
        return self._cache["seg"]

    def label_sets(self):
        """(train, val) ``LabelSet``: which categories each image holds."""
        if "labels" not in self._cache:
            from loctex.eval.coco_sets import load_label_set
            self._cache["labels"] = tuple(load_label_set(self.data.instances(s), self.data.images)
                                          for s in ("train", "val"))
        return self._cache["labels"]
