"""``loctex eval detection``: torchvision's Mask R-CNN fine-tuned on a tiny synthetic COCO set on
the CPU, from a random and from an exported backbone, scored by COCOeval; the seeded label fraction;
the scoring of hand-made results."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loctex.eval import maskrcnn
from loctex.eval.coco_sets import coco_split, read_coco


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    from loctex.synth import generate

    out = tmp_path_factory.mktemp("synth_coco")
    generate(out, num_images=24, seed=0, image_size=64, val_fraction=0.25)
    return out


def strict_json(path):
    """Parse as strict JSON: NaN/Infinity are not JSON."""
    def reject(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(path.read_text(), parse_constant=reject)


def assert_scores(result):
    for iou_type in ("bbox", "segm"):
        assert set(result[iou_type]) == set(maskrcnn.AP_NAMES)
        for name in ("AP", "AP50", "AP75"):  # the val images hold objects: always defined
            v = result[iou_type][name]
            assert math.isfinite(v) and 0.0 <= v <= 1.0, (iou_type, name, v)
        assert all(v is None or 0.0 <= v <= 1.0 for v in result[iou_type].values())


def test_label_fraction_is_a_seeded_nested_subset(coco_dir):
    coco = read_coco(coco_split(coco_dir, "train")[0])
    everything = maskrcnn.training_image_ids(coco, 1.0, seed=0)
    quarter = maskrcnn.training_image_ids(coco, 0.25, seed=0)
    assert len(everything) == 18 and len(quarter) == round(0.25 * 18)
    assert quarter == maskrcnn.training_image_ids(coco, 0.25, seed=0)
    assert quarter != maskrcnn.training_image_ids(coco, 0.25, seed=1)
    assert set(quarter) <= set(maskrcnn.training_image_ids(coco, 0.5, seed=0)) <= set(everything)
    with pytest.raises(ValueError, match="label_fraction"):
        maskrcnn.training_image_ids(coco, 0.0, seed=0)


def test_coco_layout_and_synth_layout_are_both_found(coco_dir, tmp_path):
    import shutil

    (tmp_path / "annotations").mkdir()
    shutil.copy(coco_dir / "instances_val.json", tmp_path / "annotations" / "instances_val2017.json")
    (tmp_path / "val2017").mkdir()
    assert coco_split(tmp_path, "val") == (tmp_path / "annotations" / "instances_val2017.json",
                                           tmp_path / "val2017")
    assert coco_split(coco_dir, "val") == (coco_dir / "instances_val.json", coco_dir / "images")
    with pytest.raises(FileNotFoundError, match="instances_train"):
        coco_split(tmp_path, "train")


def test_coco_scores_of_perfect_empty_and_shifted_results(coco_dir):
    gt = read_coco(coco_split(coco_dir, "val")[0])
    anns = gt.dataset["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "bbox": list(a["bbox"])} for a in anns]
    before = json.dumps(perfect)
    scores = maskrcnn.coco_scores(gt, perfect, "bbox")
    assert scores["AP"] == pytest.approx(1.0) and scores["AP50"] == pytest.approx(1.0)
    assert json.dumps(perfect) == before  # loadRes added its numpy fields to copies only
    empty = maskrcnn.coco_scores(gt, [], "segm")
    assert set(empty) == set(maskrcnn.AP_NAMES) and empty["AP"] == 0.0 and empty["AP50"] == 0.0
    # boxes shifted by half their width: IoU 1/3, below every COCO threshold
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]} for r in perfect]
    assert maskrcnn.coco_scores(gt, shifted, "bbox")["AP50"] == pytest.approx(0.0)


def test_maskrcnn_from_a_random_backbone_on_cpu(coco_dir, tmp_path):
    from loctex.cli import main

    out = tmp_path / "det.json"
    rc = main(["eval", "detection", "--weights", "random", "--arch", "resnet18",
               "--coco-root", str(coco_dir), "--label-fraction", "0.5", "--iters", "2",
               "--batch-size", "2", "--max-val-images", "2", "--workers", "0", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    result = strict_json(out)
    assert result["task"] == "maskrcnn" and result["arch"] == "resnet18"
    assert result["device"] == "cpu" and result["iters"] == 2 and result["val_images"] == 2
    assert result["train_images"] == 9 and result["image_size"] == 64  # not upscaled to 800
    assert result["batchnorm_statistics"] == "estimated on 9 training images"
    assert math.isfinite(result["loss"]["first"]) and math.isfinite(result["loss"]["last"])
    assert_scores(result)


def test_maskrcnn_from_an_exported_backbone_keeps_its_weights(coco_dir, tmp_path):
    from loctex.eval.backbone import load_backbone
    from loctex.export import write
    from loctex.models.resnet import build_resnet

    # an exported backbone (``loctex export --format torchvision``) with non-trivial statistics
    ref = build_resnet("resnet18")
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    exported = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    path = write(exported, tmp_path / "r18.pth", "torchvision")

    backbone = load_backbone(str(path))
    model = maskrcnn.build_maskrcnn(backbone, num_classes=9, image_size=64).eval()
    body = model.backbone.body.state_dict()
    for k, v in exported.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(body[k], v), k  # same weights in
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.body(x)["3"], ref.eval().forward_features(x),
                                   rtol=1e-4, atol=1e-4)  # same features out (FrozenBN == BN eval)
    # the stem and layer1 are frozen, layer2-4 train
    assert not model.backbone.body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.body.layer2.parameters())

    result = maskrcnn.run_detection(str(path), coco_dir, iters=2, batch_size=2, workers=0,
                                    device="cpu", max_val_images=2, progress=False)
    assert result["arch"] == "resnet18" and result["weights"] == str(path)
    assert result["batchnorm_statistics"] == "the backbone's own"
    json.dumps(result, allow_nan=False)
    assert_scores(result)


def test_batchnorm_statistics_of_a_random_backbone_come_from_the_images():
    from loctex.eval.backbone import batchnorm_never_saw_data, estimate_batchnorm_statistics
    from loctex.models.resnet import build_resnet

    backbone = build_resnet("resnet18").eval()
    assert batchnorm_never_saw_data(backbone)
    weights = {k: v.clone() for k, v in backbone.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    images = torch.randn(6, 3, 32, 32) * 2 + 1
    with torch.no_grad():
        stem = backbone.conv1(images)
    estimate_batchnorm_statistics(backbone, images, batch_size=4)  # two batches: 4 + 2 images
    assert not backbone.training and not batchnorm_never_saw_data(backbone)
    # the first BatchNorm sees conv1's output directly: its mean is the per-channel mean of the
    # two batch means (a cumulative average over batches)
    expected = (stem[:4].mean((0, 2, 3)) + stem[4:].mean((0, 2, 3))) / 2
    torch.testing.assert_close(backbone.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    for k, v in weights.items():
        assert torch.equal(backbone.state_dict()[k], v), k  # only statistics changed
