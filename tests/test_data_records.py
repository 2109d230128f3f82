"""Parsing, validation and repair of Localized Narratives lines (DESIGN §2.1-2.2)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from loctex.data.records import Narrative, RecordError, parse_csv_numbers, parse_line, parse_lines
from loctex.synth.coco_like import coco_like_lines

# A copy of ../shared/fixtures/ln_quirks.jsonl (and its README with the expected outcomes).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ln_quirks.jsonl"


def fixture_lines():
    return FIXTURE.read_bytes().splitlines()


@pytest.mark.parametrize("parse", ["fast", "reference"])
def test_every_fixture_line_gets_its_outcome(parse):
    lines = fixture_lines()
    assert len(lines) == 9
    if parse == "fast":
        out = parse_lines(lines)
    else:
        out = []
        for raw in lines:
            try:
                out.append(parse_line(raw))
            except RecordError as exc:
                out.append(exc)
    kept = [r for r in out if isinstance(r, Narrative)]
    assert len(kept) == 7
    # 1: two segments, a multi-word and a zero-length utterance
    r1 = out[0]
    assert r1.image_id == "000001" and r1.repairs == []
    assert len(set(r1.segments.tolist())) == 2
    assert r1.utterance_texts[0] == "In this"
    assert r1.utterance_times[0, 0] == r1.utterance_times[0, 1]
    # 2: points outside the image kept as they are; integer image_id
    r2 = out[1]
    assert r2.image_id == "2" and r2.repairs == []
    raw2 = json.loads(lines[1])
    xy = np.array([(p["x"], p["y"]) for seg in raw2["traces"] for p in seg])
    assert (xy[:, 0] > 1).any() and (xy[:, 1] < 0).any()
    np.testing.assert_array_equal(r2.points[:, :2], xy)
    # 3, 4: no localization targets
    assert out[2].repairs == ["empty_traces"] and len(out[2].points) == 0
    assert out[3].repairs == ["missing_traces"] and len(out[3].points) == 0
    # 5: unsorted t sorted
    assert out[4].repairs == ["unsorted_t_sorted"]
    t5 = out[4].points[:, 2]
    assert (np.diff(t5) >= 0).all()
    raw5 = json.loads(lines[4])
    assert sorted(p["t"] for seg in raw5["traces"] for p in seg) == t5.tolist()
    # 6, 7: rejected with reasons
    assert isinstance(out[5], RecordError) and out[5].code == "bad_json"
    assert isinstance(out[6], RecordError) and out[6].code == "missing_caption"
    # 8: the NaN point dropped
    raw8 = lines[7].decode()
    n8 = sum(len(s) for s in json.loads(raw8)["traces"])
    assert out[7].repairs == ["nonfinite_points_dropped"] and out[7].points_dropped == 1
    assert len(out[7].points) == n8 - 1 and np.isfinite(out[7].points).all()
    # 9: a second annotator of image 000001, its own narrative
    assert out[8].image_id == "000001" and out[8].annotator_id != out[0].annotator_id


def test_fast_path_matches_reference_on_coco_like_lines():
    lines = [s.encode() for s in coco_like_lines(40, points=120, seed=3)]
    fast = parse_lines(lines)
    for raw, f in zip(lines, fast):
        ref = parse_line(raw)
        assert f.caption == ref.caption and f.utterance_texts == ref.utterance_texts
        np.testing.assert_array_equal(f.points, ref.points)
        np.testing.assert_array_equal(f.segments, ref.segments)
        np.testing.assert_array_equal(f.utterance_times, ref.utterance_times)
        assert f.point_dt is not None and len(f.point_dt) == len(f.points)


def test_fast_path_falls_back_on_unusual_formatting():
    rec = {"dataset_id": "x", "image_id": 5, "caption": "A dog.",
           "timed_caption": [{"utterance": "A dog.", "start_time": 0, "end_time": 1}],
           "traces": [[{"t": 0.5, "x": 1e-05, "y": 0.25}, {"x": 0.1, "y": 0.2, "t": 0.25}]]}
    compact = json.dumps(rec, separators=(",", ":")).encode()
    spaced = json.dumps(rec).encode()
    for raw in (compact, spaced):
        (r,) = parse_lines([raw])
        assert r.image_id == "5"
        assert r.repairs == ["unsorted_t_sorted"]
        np.testing.assert_allclose(r.points, [[0.1, 0.2, 0.25], [1e-05, 0.25, 0.5]])


@pytest.mark.parametrize("line,code", [
    (b'{"caption": "x"}', "missing_image_id"),
    (b'{"image_id": 1}', "missing_caption"),
    (b'{"image_id": 1, "caption": 3}', "bad_type"),
    (b'{"image_id": [1], "caption": "a"}', "bad_type"),
    (b'{"image_id": 1, "caption": "a", "traces": [[{"x": "a", "y": 0, "t": 0}]]}', "bad_type"),
    (b'{"image_id": 1, "caption": "a", "timed_caption": [{"utterance": 1}]}', "bad_type"),
    (b'[1, 2]', "bad_type"),
    # prepare stores annotator ids as int32: a larger one is a reject, not a crash of the chunk
    (b'{"image_id": 1, "caption": "a", "annotator_id": 2147483648, "traces": []}', "bad_value"),
    (b'{"image_id": 1, "caption": "a", "annotator_id": "-2147483649"}', "bad_value"),
    (b'{"image_id": 1, "caption": "a"', "bad_json"),
    (b'\xff\xfe', "bad_json"),
])
def test_malformed_lines_are_rejected_with_a_reason(line, code):
    (r,) = parse_lines([line])
    assert isinstance(r, RecordError) and r.code == code and r.reason.startswith(code)


def test_fast_path_rejects_digits_outside_their_slot():
    # The skeleton (the line without its number characters) of each bad line is the canonical one:
    # only where the digits sit is wrong, and the reference parser rejects them.
    good = b'{"image_id": "1", "caption": "a dog", "traces": [[{"x": 1, "y": 2, "t": 3}]]}'
    for bad in (good.replace(b'"y": 2', b'"y"2: '), good.replace(b'"x": 1', b'"x1": '),
                good.replace(b'"t": 3}', b'"t": }3'), good.replace(b'"t": 3}]]', b'"t": 3}]3]')):
        (fast,) = parse_lines([bad])
        with pytest.raises(RecordError) as ref:
            parse_line(bad)
        assert isinstance(fast, RecordError) and fast.reason == ref.value.reason, bad
    (r,) = parse_lines([good])
    assert r.points.tolist() == [[1, 2, 3]] and r.point_dt is not None  # the fast path took it


def test_fast_path_keeps_the_sign_of_zero_as_json_does():
    # json.loads("-0") is the int 0 (+0.0 as a float); "-0.0" is -0.0
    line = b'{"image_id": "1", "caption": "a", "traces": [[{"x": -0, "y": -0.0, "t": 0}]]}'
    (fast,) = parse_lines([line])
    assert fast.point_dt is not None  # the fast path took it
    np.testing.assert_array_equal(np.signbit(fast.points), np.signbit(parse_line(line).points))


def test_parse_csv_numbers_is_exact_and_strict():
    rng = np.random.default_rng(0)
    texts = [repr(round(float(x), int(d))) for x, d in zip(rng.uniform(-3, 60, 3000),
                                                           rng.integers(0, 8, 3000))]
    texts += ["0", "-0", "100", "0.0001", "123456789012345", "-7"]
    vals, ok = parse_csv_numbers(",".join(texts).encode())
    assert ok and vals.tolist() == [float(t) for t in texts]
    for bad in ["01", "1.", ".5", "-.5", "--1", "1.2.3", "-", "1-2", "1234567890123456", ""]:
        assert not parse_csv_numbers(f"3,{bad},4".encode())[1], bad


def test_nan_and_inf_points_are_dropped():
    line = (b'{"image_id": "9", "caption": "a cat", "traces": [[{"x": NaN, "y": 0, "t": 0}, '
            b'{"x": 0.5, "y": Infinity, "t": 1}, {"x": 0.5, "y": 0.5, "t": 2}]]}')
    (r,) = parse_lines([line])
    assert r.points.tolist() == [[0.5, 0.5, 2.0]] and r.points_dropped == 2
    assert r.repairs == ["nonfinite_points_dropped"]
    assert not math.isnan(r.points.sum())


@pytest.mark.parametrize("parse", [parse_line, lambda raw: parse_lines([raw])[0]])
def test_values_beyond_float32_are_dropped_and_counted(parse):
    """Finite in JSON, inf once stored as float32: dropped like NaN, under their own reason."""
    line = (b'{"image_id": "9", "caption": "a big cat", "timed_caption": ['
            b'{"utterance": "a", "start_time": 0, "end_time": 0.5}, '
            b'{"utterance": "big", "start_time": 0.5, "end_time": 1e39}, '
            b'{"utterance": "cat", "start_time": 1, "end_time": 1.5}], '
            b'"traces": [[{"x": 1e39, "y": 0, "t": 0}, {"x": 0.5, "y": -4e38, "t": 1}, '
            b'{"x": 0.5, "y": 0.5, "t": 2}, {"x": 0.25, "y": 0.5, "t": 3.4e38}]]}')
    r = parse(line)
    assert r.points.tolist() == [[0.5, 0.5, 2.0], [0.25, 0.5, 3.4e38]] and r.points_dropped == 2
    assert r.utterance_texts == ["a", "cat"]
    assert r.repairs == ["out_of_range_utterances_dropped", "out_of_range_points_dropped"]
    assert np.isfinite(r.points.astype(np.float32)).all()
    assert np.isfinite(r.utterance_times.astype(np.float32)).all()
