"""`loctex prepare` on hostile and damaged input: image paths that leave the image root, a byte-order
mark, empty files, a missing image root, too many missing images, duplicate lines, lenient-only
JPEGs. Every case has an outcome: kept, repaired, rejected or a failure naming the file."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loctex.cli import main as cli
from loctex.data import prepare as P
from loctex.data.packed import PackedNarratives

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ln_quirks.jsonl"
FIXTURE_IMAGES = (1, 2, 3, 4, 5, 8)


def _jpeg(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _fixture_images(root: Path, ids=FIXTURE_IMAGES) -> Path:
    d = root / "images" / "train2017"
    d.mkdir(parents=True)
    for i in ids:
        (d / f"{i:012d}.jpg").write_bytes(_jpeg(i))
    return root / "images"


def _line(image_id, caption="a dog on the grass", dataset_id="test") -> str:
    return json.dumps({"dataset_id": dataset_id, "image_id": image_id, "annotator_id": 1,
                       "caption": caption,
                       "timed_caption": [{"utterance": caption, "start_time": 0, "end_time": 1}],
                       "traces": [[{"x": 0.5, "y": 0.5, "t": 0.5}]]})


def _prepare(tmp_path, lines_or_file, images, **kw):
    src = lines_or_file
    if not isinstance(src, Path):
        src = tmp_path / "narratives.jsonl"
        src.write_text("".join(line + "\n" for line in lines_or_file))
    kw.setdefault("log", lambda *a: None)
    return src, P.prepare([src], images, tmp_path / "out", **kw)


def _rejects(tmp_path) -> list[dict]:
    text = (tmp_path / "out" / "rejects.jsonl").read_text()
    return [json.loads(s) for s in text.splitlines()]


# ------------------------------------------------------------------------------------------------
# image paths


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """An image root with one good image, a file beside the root, symlinks out of the root (to
    that file, to its directory), and a record of every path prepare opens."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(_jpeg())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(1))
    (images / "link.jpg").symlink_to(secret)
    (images / "linkdir").symlink_to(tmp_path)
    opened = []
    probe = P.probe_image

    def recording(path, check):
        opened.append(Path(path).resolve())
        return probe(path, check)

    monkeypatch.setattr(P, "probe_image", recording)
    return images, secret, opened


@pytest.mark.parametrize("image_id", ["../secret", "ABSOLUTE", "link", "sub/../../secret",
                                      "linkdir/secret"])
def test_image_paths_outside_the_root_are_rejected_unopened(outside, tmp_path, image_id):
    images, secret, opened = outside
    if image_id == "ABSOLUTE":
        image_id = str(secret.with_suffix(""))
    src, report = _prepare(tmp_path, [_line("ok"), _line(image_id, "a secret")], images,
                           max_reject_fraction=1.0)
    assert (report["kept"], report["rejected"]) == (1, 1)
    assert report["reject_reasons"] == {"image_outside_root": 1}
    (rej,) = _rejects(tmp_path)
    assert rej["line"] == 2 and rej["file"] == str(src)
    assert rej["reason"].startswith("image_outside_root:") and repr(image_id) in rej["reason"]
    assert secret.resolve() not in opened and opened  # the good image was opened, the secret not
    assert PackedNarratives(tmp_path / "out").caption(0) == "a dog on the grass"


def test_an_image_template_that_climbs_is_rejected(outside, tmp_path):
    images, secret, opened = outside
    _, report = _prepare(tmp_path, [_line("secret")], images, max_reject_fraction=1.0,
                         image_template="../{image_id}.jpg")
    assert report["reject_reasons"] == {"image_outside_root": 1} and report["kept"] == 0
    assert not opened


def test_a_symlinked_image_root_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "ok.jpg").write_bytes(_jpeg())
    (tmp_path / "link").symlink_to(real)
    _, report = _prepare(tmp_path, [_line("ok")], tmp_path / "link")
    assert (report["kept"], report["rejected"]) == (1, 0)


# ------------------------------------------------------------------------------------------------
# files


def test_a_byte_order_mark_keeps_the_first_record(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + FIXTURE.read_bytes())
    _, report = _prepare(tmp_path, src, _fixture_images(tmp_path), max_reject_fraction=0.5)
    assert (report["read"], report["kept"], report["rejected"]) == (9, 7, 2)
    assert [r["line"] for r in _rejects(tmp_path)] == [6, 7]
    assert PackedNarratives(tmp_path / "out").caption(0) == \
        "In this image there is a dog on the grass."


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_empty_file_fails_naming_it(tmp_path, capsys, content):
    images = _fixture_images(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    rc = cli(["prepare", "--narratives", str(FIXTURE), str(empty), "--images", str(images),
              "--out", str(tmp_path / "out"), "--max-reject-fraction", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{empty}: " in err and "no narratives" in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_missing_image_root_fails_naming_it(tmp_path, capsys):
    rc = cli(["prepare", "--narratives", str(FIXTURE), "--images", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'nowhere'}: " in err and "does not exist" in err, err


def test_too_many_missing_images_fail_naming_the_file(tmp_path, capsys):
    images = _fixture_images(tmp_path, ids=(1, 2, 3))  # 3 of the 7 valid narratives miss theirs
    args = ["prepare", "--narratives", str(FIXTURE), "--images", str(images),
            "--out", str(tmp_path / "out"), "--max-reject-fraction", "0.5"]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert f"{FIXTURE}: 3 of 7 narratives" in err and "--max-missing-fraction" in err, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failed"] == [str(FIXTURE)] and report["missing_images"] == 3
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert cli(args + ["--max-missing-fraction", "0.5"]) == 0


def test_exact_duplicate_lines_are_dropped_and_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        (images / f"{name}.jpg").write_bytes(_jpeg())
    a, b, c = _line("a"), _line("b", "a cat"), _line("c", "a cow")
    first = tmp_path / "first.jsonl"
    first.write_bytes(f"{a}\n{b}\n{a}\n{b}\r\n{c}\n{c} \n".encode())  # the last differs: a space
    second = tmp_path / "second.jsonl"
    second.write_text(f"{c}\n")
    report = P.prepare([first, second], images, tmp_path / "out", log=lambda *a: None)
    assert (report["read"], report["kept"], report["duplicates"]) == (7, 4, 3)
    assert report["files"][str(first)]["duplicates"] == 2
    assert report["duplicate_examples"] == {f"{first}:3": f"{first}:1", f"{first}:4": f"{first}:2",
                                            f"{second}:1": f"{first}:5"}
    assert len(PackedNarratives(tmp_path / "out")) == 4


# ------------------------------------------------------------------------------------------------
# images


def _lenient_only_jpeg() -> bytes:
    from loctex.data import jpeg
    data = _jpeg(3)
    scan = jpeg._walk(data)[2]
    mid = scan + (len(data) - scan) // 2
    noise = np.random.default_rng(0).integers(0, 255, 64, dtype=np.uint8)
    noise[noise == 0xFF] = 0
    out = data[:mid] + noise.tobytes() + data[mid + 64:]
    assert jpeg.check_structure(out) is None
    Image.open(io.BytesIO(out)).load()  # a lenient decoder takes it (and paints garbage)
    return out


def test_a_lenient_only_jpeg_is_skipped_at_decode_check(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(_jpeg())
    (images / "bad.jpg").write_bytes(_lenient_only_jpeg())
    lines = [_line("ok"), _line("bad", "a bad dog")]
    _, report = _prepare(tmp_path, lines, images, check_images="decode", max_missing_fraction=1.0)
    assert (report["kept"], report["missing_images"]) == (1, 1)
    (reason,) = report["missing_image_examples"].values()
    assert "Corrupt JPEG data" in reason
    # the byte check alone lets it through; the data set then refuses it at load time
    # (tests/test_data_loader.py)
    _, report = _prepare(tmp_path, lines, images, check_images="structure")
    assert (report["kept"], report["missing_images"]) == (2, 0)
