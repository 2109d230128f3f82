"""Downstream evaluation: the VOC07 SVM protocol, the localization metrics, the dense probe's and
the dense fine-tuning's mIoU, ``loctex eval dense``
(``loctex reproduce`` has its own tests/test_reproduce.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loctex.eval import linear_probe, metrics, voc07

CLASSES = ["bird", "cat", "dog"]


def make_vocdevkit(root, n_trainval=24, n_test=24, seed=0):
    """A miniature VOCdevkit/VOC2007 with tiny JPEGs; returns the labels written per split."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    written = {}
    for split, n, start in (("trainval", n_trainval, 0), ("test", n_test, 1000)):
        ids = [f"{start + i:06d}" for i in range(n)]
        labels = rng.choice([1, -1, -1, 0], size=(n, len(CLASSES)))
        labels[:2] = 1  # every class has positives
        for i in ids:
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(
                voc / "JPEGImages" / f"{i}.jpg")
        for c, name in enumerate(CLASSES):
            lines = [f"{i} {labels[k, c]:2d}" for k, i in enumerate(ids)]
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        written[split] = labels
    return root / "VOCdevkit", written


def test_voc_reader_keeps_the_real_layout(tmp_path):
    root, written = make_vocdevkit(tmp_path)
    paths, labels, classes = voc07.read_split(root, "trainval")
    assert classes == CLASSES  # the plain trainval.txt is not a class
    assert len(paths) == 24 and paths[0].endswith("VOC2007/JPEGImages/000000.jpg")
    np.testing.assert_array_equal(labels, written["trainval"])


def separable_features(labels, dim=32, noise=0.05, seed=0):
    """Each class owns a direction; an image's features are the sum of its classes' directions."""
    rng = np.random.default_rng(seed)
    dirs = np.eye(dim)[: labels.shape[1]]
    x = (labels == 1).astype(np.float64) @ dirs + noise * rng.standard_normal((len(labels), dim))
    return linear_probe.l2_normalize(x + 0.1)


def test_svm_protocol_separable_reaches_map_one():
    rng = np.random.default_rng(1)
    train_y = rng.choice([1, -1, -1, 0], size=(60, 4))
    test_y = rng.choice([1, -1, -1, 0], size=(60, 4))
    res = linear_probe.svm_map(separable_features(train_y), train_y, separable_features(test_y, seed=1),
                               test_y, ["a", "b", "c", "d"], n_jobs=1)
    assert res["mAP"] > 0.99
    assert all(r["cost"] in linear_probe.SVM_COSTS for r in res["per_class"].values())


def test_svm_protocol_random_is_near_chance():
    rng = np.random.default_rng(2)
    train_y = np.where(rng.random((150, 5)) < 0.3, 1, -1)
    test_y = np.where(rng.random((400, 5)) < 0.3, 1, -1)
    x_tr, x_te = rng.standard_normal((150, 64)), rng.standard_normal((400, 64))
    res = linear_probe.svm_map(linear_probe.l2_normalize(x_tr), train_y, linear_probe.l2_normalize(x_te),
                               test_y, list("abcde"), n_jobs=1)
    chance = (test_y == 1).mean()
    assert abs(res["mAP"] - chance) < 0.1


def test_difficult_images_are_left_out_of_the_test_ap():
    # the SVM ranks difficult images first: they must not count as false positives
    train_y = np.array([1] * 10 + [-1] * 10)[:, None]
    x_tr = np.array([[1.0, 0.0]] * 10 + [[0.0, 1.0]] * 10)
    test_y = np.array([1, 1, -1, -1, 0, 0])[:, None]
    x_te = np.array([[1, 0], [0.9, 0.1], [0.1, 0.9], [0, 1], [1, 0], [1, 0]], dtype=float)
    res = linear_probe.svm_map(x_tr, train_y, x_te, test_y, ["a"], n_jobs=1)
    assert res["mAP"] == pytest.approx(1.0)
    # as negatives they would cost AP
    res_neg = linear_probe.svm_map(x_tr, train_y, x_te, np.where(test_y == 0, -1, test_y), ["a"], n_jobs=1)
    assert res_neg["mAP"] < 0.9


def test_voc07_end_to_end_on_a_miniature_vocdevkit(tmp_path):
    root, _ = make_vocdevkit(tmp_path)
    res = voc07.evaluate("random", str(root), arch="resnet18", image_size=32, batch_size=16,
                         workers=0, n_jobs=1)
    assert set(res["per_class"]) == set(CLASSES)
    assert 0.0 <= res["mAP"] <= 1.0 and res["num_test"] == 24


# ---- backbones -----------------------------------------------------------------------------

def test_load_backbone_reads_wrapped_and_prefixed_weights(tmp_path):
    from safetensors.torch import save_file

    from loctex.eval.backbone import load_backbone
    from loctex.models.resnet import build_resnet

    ref = build_resnet("resnet18").eval()
    state = {f"module.visual.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state["module.text.embed.weight"] = torch.zeros(3, 4)  # the rest of a model is ignored
    torch.save({"state_dict": state, "step": 3}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "tv.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    for f in ("ckpt.pth", "tv.safetensors"):
        model = load_backbone(str(tmp_path / f))  # arch read from the weights
        assert len(model.layer3) == 2 and not hasattr(model.layer1[0], "conv3")
        torch.testing.assert_close(model(x)[1], ref(x)[1])
    with pytest.raises(ValueError, match="does not match"):
        load_backbone(str(tmp_path / "tv.safetensors"), arch="resnet34")
    assert load_backbone("random", "resnet18").out_channels == 512


# ---- localization metrics -------------------------------------------------------------------

def test_half_mass_set_and_pointing_on_hand_made_maps():
    heat = torch.zeros(3, 3, 3)
    heat[0, 0, 0], heat[0, 0, 1], heat[0, 2, 2] = 0.4, 0.3, 0.3   # set: (0,0),(0,1)
    heat[1, 1, 1] = 1.0                                            # set: (1,1)
    heat[2] = 1.0 / 9                                              # uniform: 5 cells (ties in cell order)
    sets = metrics.half_mass_cells(heat)
    assert sets[0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert sets[1].nonzero().tolist() == [[1, 1]]
    assert int(sets[2].sum()) == 5
    attn = torch.full((3, 3, 3), 0.01)
    attn[0, 0, 1] = 0.9   # inside the set
    attn[1, 0, 0] = 0.9   # outside
    attn[2, 0, 0] = 0.9   # inside (first cells)
    assert metrics.pointing_hits(attn, heat).tolist() == [True, False, True]


def test_box_pointing_and_kl():
    attn = torch.zeros(2, 4, 4)
    attn[0, 1, 2] = 1.0   # cell center (0.625, 0.375)
    attn[1, 3, 0] = 1.0   # cell center (0.125, 0.875)
    boxes = torch.tensor([[0.5, 0.25, 0.75, 0.5], [0.5, 0.5, 1.0, 1.0]])
    assert metrics.box_pointing_hits(attn, boxes).tolist() == [True, False]
    P = torch.tensor([[[0.5, 0.5]]])
    A = torch.tensor([[[0.25, 0.75]]])
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert metrics.kl_divergence(P, A).item() == pytest.approx(expected)
    assert metrics.kl_divergence(P, P).item() == pytest.approx(0.0)


# ---- dense probe ----------------------------------------------------------------------------

def test_miou_against_a_hand_computed_confusion_matrix():
    gt = np.array([[0, 0, 1, 1], [2, 2, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 1, 2]])
    conf = metrics.confusion_matrix(pred, gt, num_classes=4)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1] = 1, 1
    expected[1, 1] = 3
    expected[2, 2], expected[2, 0] = 1, 1
    np.testing.assert_array_equal(conf, expected)
    # IoU: class 0: 1/(2+2-1)=1/3; class 1: 3/(3+4-3)=3/4; class 2: 1/(2+1-1)=1/2; class 3 absent
    iou = metrics.iou_per_class(conf)
    np.testing.assert_allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3])
    assert metrics.mean_iou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_dense_probe_confusion_of_a_known_predictor():
    from loctex.eval import dense_probe

    class Fixed(torch.nn.Module):  # predicts class 1 on the left half, 0 on the right half
        def forward(self, feats, out_size):
            logits = torch.zeros(len(feats[0]), 3, *out_size)
            logits[:, 1, :, : out_size[1] // 2] = 1.0
            logits[:, 0, :, out_size[1] // 2:] = 1.0
            return logits

    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, :, :1] = 1        # 4 pixels of class 1, all on the left
    masks[1, :2, :] = 2        # 8 pixels of class 2, half left, half right
    masks[1, 3, 3] = 255       # ignored
    feats = [torch.zeros(2, 1, 1, 1)]
    conf = dense_probe.predict_confusion(Fixed(), feats, masks, 3, batch_size=1)
    # gt 0: image 0 has 12 (4 left -> 1, 8 right -> 0); image 1 has 7 (4 left -> 1, 3 right -> 0)
    np.testing.assert_array_equal(conf, [[11, 8, 0], [0, 4, 0], [4, 4, 0]])


def test_dense_probe_learns_separable_labels():
    from loctex.eval import dense_probe

    # features that say which class each stride-8 cell holds: the head must learn to read them
    rng = np.random.default_rng(0)
    cells = torch.from_numpy(rng.integers(0, 3, (24, 4, 4)))
    feats = [torch.nn.functional.one_hot(cells, 3).permute(0, 3, 1, 2).float()]
    masks = cells.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8)
    head = dense_probe.train_head(feats, masks, 3, steps=60, lr=1e-2)
    conf = dense_probe.predict_confusion(head, feats, masks, 3)
    assert metrics.mean_iou(conf) > 0.9


def test_recall_at_one():
    q = torch.eye(3)
    g = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert metrics.recall_at_k(q, g, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(q, g, 3) == pytest.approx(1.0)


# ---- dense fine-tuning, `loctex eval dense` --------------------------------------------------

def test_dense_finetune_is_seeded_and_leaves_the_callers_backbone_alone(tmp_path):
    from loctex.eval.coco_sets import load_segmentation_set, synth_split
    from loctex.eval.dense_finetune import finetune_segmentation
    from loctex.models.resnet import build_resnet
    from loctex.synth import generate

    generate(tmp_path, num_images=16, seed=0, image_size=32, val_fraction=0.25)
    train, val = (load_segmentation_set(*synth_split(tmp_path, s), size=32) for s in ("train", "val"))
    backbone = build_resnet("resnet18").eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    def run(seed, fraction=0.5):
        r = finetune_segmentation(backbone, train, val, fraction, steps=3, seed=seed, batch_size=4)
        r.pop("seconds")
        return r

    first = run(0)
    assert first["images"] == 6 and first["steps"] == 3 and 0.0 <= first["mIoU"] <= 1.0
    assert set(first["per_class_iou"]) == set(train.class_names)
    assert run(0) == first                      # same seed, same subset, same numbers
    assert run(1) != first                      # another subset, init and order
    for k, v in backbone.state_dict().items():  # fine-tuning worked on a copy
        assert torch.equal(v, before[k]), k


def test_eval_dense_is_its_own_command(tmp_path):
    import json

    from loctex.cli import main
    from loctex.synth import generate

    data = tmp_path / "synth"
    generate(data, num_images=16, seed=0, image_size=32, val_fraction=0.25)
    for protocol in ("probe", "finetune"):
        out = tmp_path / f"{protocol}.json"
        assert main(["eval", "dense", "--weights", "random", "--arch", "resnet18", "--data",
                     str(data), "--image-size", "32", "--fractions", "0.5,1.0", "--steps", "2",
                     "--workers", "0", "--protocol", protocol, "--batch-size", "4",
                     "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["task"] == "dense" and result["protocol"] == protocol
        assert list(result["fractions"]) == ["50%", "100%"]
        assert [r["images"] for r in result["fractions"].values()] == [6, 12]
        assert all(0.0 <= r["mIoU"] <= 1.0 for r in result["fractions"].values())
