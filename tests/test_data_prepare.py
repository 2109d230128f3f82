"""`loctex prepare` end to end on the quirks fixture: report, rejects, threshold exit, the packed
format, the data set, collate (DESIGN §2.4) and the sharded, resumable loader."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loctex.cli import main as cli
from loctex.config import Config, replace
from loctex.data import align as A
from loctex.data.collate import BATCH_KEYS, collate_batch
from loctex.data.dataset import NarrativeDataset
from loctex.data.loader import build_loader
from loctex.data.samplers import RankBatchSampler
from loctex.data.packed import PackedNarratives

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ln_quirks.jsonl"
IMAGE_IDS = (1, 2, 3, 4, 5, 8)


def make_images(root: Path, ids=IMAGE_IDS) -> Path:
    d = root / "images" / "train2017"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        arr = rng.integers(0, 255, (40 + 2 * i, 56 + 3 * i, 3), np.uint8)
        Image.fromarray(arr).save(d / f"{i:012d}.jpg", quality=90)
    return root / "images"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    images = make_images(root)
    rc = cli(["prepare", "--narratives", str(FIXTURE), "--images", str(images),
              "--out", str(root / "out"), "--max-reject-fraction", "0.5"])
    assert rc == 0
    return root / "out"


def test_report_and_rejects(prepared):
    report = json.loads((prepared / "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"]) == (9, 7, 2)
    assert report["no_localization"] == 2 and report["missing_images"] == 0
    assert report["repaired"] == {"empty_traces": 1, "missing_traces": 1,
                                  "nonfinite_points_dropped": 1, "unsorted_t_sorted": 1}
    assert report["points_dropped"] == 1
    assert report["files"][str(FIXTURE)]["rejected"] == 2
    rejects = [json.loads(s) for s in (prepared / "rejects.jsonl").read_text().splitlines()]
    lines = FIXTURE.read_text().splitlines()
    assert [r["line"] for r in rejects] == [6, 7]
    assert rejects[0]["reason"].startswith("bad_json") and rejects[1]["reason"] == "missing_caption"
    assert all(r["file"] == str(FIXTURE) and r["raw"] == lines[r["line"] - 1] for r in rejects)


def test_packed_format_reopens(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["num_narratives"] == 7
    assert manifest["num_images"] == 6  # image 000001 has two narratives
    p = PackedNarratives(prepared)
    assert len(p) == 7
    assert isinstance(p.arrays["points_xy"], np.memmap)
    assert p.caption(0) == "In this image there is a dog on the grass."
    assert p.image_id(p.image_index(0)) == "000001" == p.image_id(p.image_index(6))
    assert p.image_size(p.image_index(0)) == (59, 42)
    assert p.image_path(p.image_index(1)).is_file()
    for i in range(len(p)):
        xy, t, seg, dt = p.points(i)
        assert (np.diff(t) >= 0).all() and len(xy) == len(t) == len(seg) == len(dt)
    assert len(p.points(2)[0]) == 0 and len(p.points(3)[0]) == 0


def test_threshold_exit_names_the_file(tmp_path, capsys):
    images = make_images(tmp_path)
    out = tmp_path / "out"
    rc = cli(["prepare", "--narratives", str(FIXTURE), "--images", str(images), "--out", str(out)])
    assert rc != 0
    assert str(FIXTURE) in capsys.readouterr().err
    assert (out / "report.json").is_file() and (out / "rejects.jsonl").is_file()
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2
    assert not (out / "manifest.json").exists()


def test_missing_images_are_counted_and_shards_combine(tmp_path):
    images = make_images(tmp_path, ids=(1, 2, 3))
    # a second shard: the same narratives in another data set id (other bytes, not duplicates)
    second = tmp_path / "second.jsonl"
    second.write_text(FIXTURE.read_text().replace('"mscoco_train2017"', '"mscoco_train2017_b"'))
    from loctex.data.prepare import prepare
    report = prepare([FIXTURE, second], images, tmp_path / "out", max_reject_fraction=0.5,
                     max_missing_fraction=0.5, log=lambda *a: None)
    assert report["read"] == 18 and report["rejected"] == 4 and report["duplicates"] == 0
    assert report["missing_images"] == 2 * 3   # narratives of images 4, 5, 8
    assert report["kept"] == 2 * 4
    assert report["files"][str(second)]["missing_fraction"] == round(3 / 7, 6)
    assert len(PackedNarratives(tmp_path / "out")) == 8


def test_tokenizer_cli(tmp_path):
    out = tmp_path / "tok.json"
    assert cli(["tokenizer", "train", "--narratives", str(FIXTURE), "--vocab-size", "300",
                "--out", str(out)]) == 0
    from loctex.data.tokenizer import load_tokenizer
    tok = load_tokenizer(out)
    assert [tok.token_to_id(s) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == \
        [0, 1, 2, 3, 4]
    enc = tok.encode("A DOG on the Grass")
    assert enc.ids[0] == 2 and enc.ids[-1] == 3 and enc.tokens[1:-1] == ["a", "dog", "on", "the",
                                                                          "grass"]


def test_collate_batch_contract(prepared):
    cfg = replace(Config(), {"data.image_size": 64, "data.window_pad_s": 0.1}).data
    ds = NarrativeDataset(prepared, cfg, train=False)
    batch = collate_batch([ds[i] for i in range(len(ds))])
    assert tuple(batch) == BATCH_KEYS
    B, L = batch["tokens"].shape
    P = len(batch["points_xy"])
    expect = {"images": (torch.float32, (B, 3, 64, 64)), "tokens": (torch.int64, (B, L)),
              "attention_mask": (torch.bool, (B, L)), "points_xy": (torch.float32, (P, 2)),
              "point_weights": (torch.float32, (P,)), "token_ranges": (torch.int32, (B, L, 2)),
              "loc_mask": (torch.bool, (B, L))}
    for k, (dtype, shape) in expect.items():
        assert batch[k].dtype == dtype and tuple(batch[k].shape) == shape, k
    assert (batch["point_weights"] > 0).all() and (batch["point_weights"] <= cfg.point_weight_cap_s).all()
    # token_ranges index the batch's points inside each token's padded window
    p = ds.packed
    offset = 0
    for b in range(B):
        xy, t, _, _ = p.points(b)
        ids, chars, windows = p.tokens(b)
        win = A.apply_window(windows, cfg.window_pad_s, cfg.lag_s)
        assert batch["tokens"][b, 0] == 2 and batch["tokens"][b, len(ids) + 1] == 3
        np.testing.assert_allclose(batch["points_xy"][offset:offset + len(xy)].numpy(), xy)
        for j in range(len(ids)):
            s, e = batch["token_ranges"][b, j + 1].tolist()
            assert offset <= s <= e <= offset + len(xy)
            inside = np.flatnonzero((t >= win[j, 0]) & (t <= win[j, 1])) + offset
            if np.isfinite(win[j, 0]) and len(inside):
                assert (s, e) == (inside[0], inside[-1] + 1)
                assert batch["loc_mask"][b, j + 1]
            else:
                assert not batch["loc_mask"][b, j + 1] and s == e
        assert not batch["loc_mask"][b, 0]
        offset += len(xy)
    assert offset == P
    assert batch["loc_mask"][0].sum() > 0 and not batch["loc_mask"][2].any()


def test_training_samples_follow_the_decision(prepared):
    cfg = replace(Config(), {"data.image_size": 64}).data
    ds = NarrativeDataset(prepared, cfg, train=True, seed=3)
    for i in range(len(ds)):
        s = ds[(i, 5)]
        d = ds.decision(i, 5)
        xy = ds.packed.points(i)[0]
        expect = (xy - [d.x0, d.y0]) / [d.w, d.h]
        if d.flip:
            expect[:, 0] = 1 - expect[:, 0]
        np.testing.assert_allclose(s["points_xy"], expect, atol=1e-5)
        assert torch.equal(s["image"], ds[(i, 5)]["image"])  # deterministic


def test_loader_sharding_and_resume(prepared):
    n, B, W = 7, 2, 2
    full = [b for b in RankBatchSampler(n, B * W, 0, 1, seed=4, epochs=3)]
    ranks = [list(RankBatchSampler(n, B, r, W, seed=4, epochs=3)) for r in range(W)]
    assert len(ranks[0]) == len(ranks[1]) == 3 * (n // (B * W))
    for step, global_batch in enumerate(full):
        assert ranks[0][step] + ranks[1][step] == global_batch
    resumed = list(RankBatchSampler(n, B, 1, W, seed=4, epochs=3, start_step=2))
    assert resumed == ranks[1][2:]
    cfg = replace(Config(), {"data.prepared": str(prepared), "data.image_size": 32,
                             "train.micro_batch_size": 2, "data.num_workers": 0})
    b0 = [next(iter(build_loader(cfg, rank=r, world_size=2))) for r in range(2)]
    cfg = replace(cfg, {"data.num_workers": 2})
    b1 = [next(iter(build_loader(cfg, rank=r, world_size=2))) for r in range(2)]
    for x, y in zip(b0, b1):  # same batches whatever the number of workers
        for k in BATCH_KEYS:
            assert torch.equal(x[k], y[k]), k
