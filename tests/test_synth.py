"""`loctex synth`: determinism, the LN record types, COCO instances, groundings, trace behaviour."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loctex.synth import generate

# pycocotools' decode trips a NumPy 2 DeprecationWarning on every mask.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE_NOUNS = {"circle", "disk", "square", "box", "triangle", "diamond", "rhombus", "star", "cross",
               "plus sign", "heart", "crescent", "moon"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    info = generate(out, num_images=300, seed=7)
    def rows(name):
        return [json.loads(line) for s in ("train", "val")
                for line in (out / f"{name}_{s}.jsonl").read_text().splitlines()]
    narr, grounds = rows("narratives"), rows("groundings")
    return out, info, narr, grounds


def _files(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    generate(tmp_path / "a", num_images=30, seed=3)
    generate(tmp_path / "b", num_images=30, seed=3)
    generate(tmp_path / "c", num_images=30, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 30 + 7 and a == b
    assert a["narratives_train.jsonl"] != c["narratives_train.jsonl"]
    assert a["images/000000000001.jpg"] != c["images/000000000001.jpg"]


def test_cli_and_splits(tmp_path):
    from loctex.cli import main
    assert main(["synth", "--out", str(tmp_path), "--num-images", "10", "--seed", "1",
                 "--image-size", "96", "--val-fraction", "0.2"]) == 0
    info = json.loads((tmp_path / "synth.json").read_text())
    assert info["splits"]["train"]["images"] == 8 and info["splits"]["val"]["images"] == 2
    with Image.open(tmp_path / "images" / "000000000010.jpg") as im:
        assert im.format == "JPEG" and im.size == (96, 96)


def test_records_have_ln_field_types(synth):
    _, _, narr, _ = synth
    for r in narr:
        assert list(r) == ["dataset_id", "image_id", "annotator_id", "caption", "timed_caption",
                           "traces", "voice_recording"]
        assert isinstance(r["dataset_id"], str) and isinstance(r["image_id"], str) and r["image_id"].isdigit()
        assert isinstance(r["annotator_id"], int) and isinstance(r["voice_recording"], str)
        assert isinstance(r["caption"], str) and r["caption"]
        last = 0.0
        for u in r["timed_caption"]:
            assert isinstance(u["utterance"], str) and u["utterance"]
            assert isinstance(u["start_time"], float) and isinstance(u["end_time"], float)
            assert last <= u["start_time"] <= u["end_time"]
            last = u["start_time"]
        # The utterances, in order, are the caption's words.
        assert " ".join(u["utterance"] for u in r["timed_caption"]) == r["caption"]
        assert isinstance(r["traces"], list)
        for seg in r["traces"]:
            assert isinstance(seg, list) and seg
            t = [p["t"] for p in seg]
            assert t == sorted(t)
            for p in seg:
                assert set(p) == {"x", "y", "t"} and all(isinstance(p[k], float) for k in "xyt")
                assert -0.1 <= p["x"] <= 1.1 and -0.1 <= p["y"] <= 1.1


def test_real_file_quirks_occur(synth):
    _, info, narr, _ = synth
    s = info["stats"]
    assert sum(not r["traces"] for r in narr) >= 2                            # empty traces
    ids = [r["image_id"] for r in narr]
    assert len(set(ids)) < len(ids)                                            # two annotators
    assert sum(len(r["traces"]) >= 2 for r in narr) > 0.2 * len(narr)         # re-entries
    pts = np.array([(p["x"], p["y"]) for r in narr for seg in r["traces"] for p in seg])
    assert ((pts < 0) | (pts > 1)).any(1).mean() > 0.005                      # excursions
    utts = [u for r in narr for u in r["timed_caption"]]
    assert sum(u["start_time"] == u["end_time"] for u in utts) > 0.01 * len(utts)
    assert sum(" " in u["utterance"] for u in utts) > 0.1 * len(utts)
    words = set(re.findall(r"[a-z]+", " ".join(r["caption"] for r in narr).lower()))
    assert {"left", "right", "top", "bottom"} <= words
    assert 2.0 < s["words_per_second"] < 3.0
    dt = np.concatenate([np.diff([p["t"] for p in seg]) for r in narr for seg in r["traces"]])
    assert abs(np.median(dt) - 0.05) < 0.005                                   # ~20 Hz


def test_coco_instances_load_and_masks_match_boxes(synth):
    from pycocotools.coco import COCO
    out, info, _, _ = synth
    coco = COCO(str(out / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in info["categories"]]
    assert len(coco.getImgIds()) == info["splits"]["train"]["images"]
    for ann in coco.loadAnns(coco.getAnnIds())[:300]:
        m = coco.annToMask(ann)
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == m.sum() and ann["iscrowd"] == 0
    # The object's pixels are its mask: saturated color inside, the image's texture around it.
    img_id = coco.getImgIds()[0]
    img = np.asarray(Image.open(out / "images" / coco.loadImgs(img_id)[0]["file_name"]).convert("RGB"), float)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
        m = coco.annToMask(ann).astype(bool)
        for _ in range(2):  # away from the outline and JPEG ringing
            m[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        if m.sum() > 10:
            assert img[m].std(0).max() < 25  # one (shaded) color
    COCO(str(out / "instances_val.json"))


def test_groundings_name_the_annotated_objects(synth):
    from pycocotools.coco import COCO
    out, _, narr, grounds = synth
    anns = {}
    for s in ("train", "val"):
        anns.update(COCO(str(out / f"instances_{s}.json")).anns)
    positions = 0
    for r, g in zip(narr, grounds):
        assert (g["image_id"], g["annotator_id"]) == (r["image_id"], r["annotator_id"])
        assert {x["ann_id"] for x in g["groundings"]} == {
            a["id"] for a in anns.values() if a["image_id"] == int(r["image_id"])}
        for x in g["groundings"]:
            ann = anns[x["ann_id"]]
            assert x["category_id"] == ann["category_id"] and x["bbox"] == ann["bbox"]
            c0, c1 = x["noun_span"]
            assert r["caption"][c0:c1] == x["noun"] and x["noun"] in SHAPE_NOUNS
            p0, p1 = x["phrase_span"]
            assert r["caption"][p0:p1] == x["phrase"] and p0 <= c0 < c1 == p1
            assert x["color"] in x["phrase"].split()
            # An absolute corner named right after the noun is true of the box.
            m = re.match(r" (?:at|in|on) the (top|bottom) (left|right)\b", r["caption"][c1:])
            if m:
                positions += 1
                cx, cy = (x["box"][0] + x["box"][2]) / 2, (x["box"][1] + x["box"][3]) / 2
                assert (cy < 1 / 3) == (m.group(1) == "top") and (cy > 2 / 3) == (m.group(1) == "bottom")
                assert (cx < 1 / 3) == (m.group(2) == "left") and (cx > 2 / 3) == (m.group(2) == "right")
    assert positions > 20


def test_pointer_dwells_on_the_object_while_it_is_named(synth):
    _, _, narr, grounds = synth
    hits = total = 0
    for r, g in zip(narr, grounds):
        if not r["traces"]:
            continue
        pts = np.array([(p["x"], p["y"], p["t"]) for seg in r["traces"] for p in seg])
        for x in g["groundings"]:
            t0, t1 = x["noun_time"]
            sel = (pts[:, 2] >= t0 - 0.1) & (pts[:, 2] <= t1 + 0.1)
            total += 1
            if sel.any():
                mx, my = np.median(pts[sel, :2], 0)
                x0, y0, x1, y1 = x["box"]
                hits += x0 - 0.03 <= mx <= x1 + 0.03 and y0 - 0.03 <= my <= y1 + 0.03
    assert total > 300 and hits / total > 0.85
