"""Localized Narratives records: parse, validate and repair one JSON line (DESIGN §2.1–2.2).

A line becomes a :class:`Narrative` or raises :class:`RecordError` whose ``reason`` starts with a
stable code (``bad_json``, ``missing_caption``, ``missing_image_id``, ``bad_type``, ``bad_value``).
Repairs never reject: they are listed in ``Narrative.repairs`` by reason code:

* ``nonfinite_points_dropped`` — points with a NaN/inf coordinate or time are dropped;
* ``out_of_range_points_dropped`` — points with a finite coordinate or time beyond the float32 range
  (stored as float32, it would become inf) are dropped;
* ``unsorted_t_sorted`` — points of a segment whose ``t`` goes backwards are sorted by ``t``;
* ``segments_overlap_sorted`` — segments that overlap in time are merged in time order (every point
  keeps its segment id), so a time window always selects a contiguous range of points;
* ``empty_traces`` / ``missing_traces`` — ``traces: []`` or no ``traces`` key: the narrative is kept
  without localization targets;
* ``bad_utterances_dropped`` — utterances with non-finite times are dropped;
  ``out_of_range_utterances_dropped`` — likewise times beyond the float32 range;
  ``utterance_times_swapped`` — ``start_time > end_time`` is swapped.

Speed. A COCO narrative is ~20 KB of JSON, most of it ~1,500 trace numbers; CPython parses a float
in ~100-200 ns, so ``json.loads`` alone caps a core at ~3,000 lines/s (``orjson`` too: building the
Python floats and dicts is the cost). :func:`parse_lines` therefore cuts the ``traces`` value out of
the raw bytes, checks that its skeleton (the text without the number characters) is exactly the
canonical ``[[{"x": , "y": , "t": }, ...], ...]`` and that every number sits in its slot, parses
the numbers of 64 lines at once with a vectorized NumPy decimal parser (:func:`_trace_numbers`),
and parses the small rest with ``json`` (``orjson`` when installed). Anything the fast path does
not recognize — other formatting or key order, NaN, exponents, empty segments, bad JSON — goes
through :func:`parse_line` (plain ``json.loads``), which is the reference behaviour; tests pin the
two together.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np

try:  # orjson is faster but optional; it rejects NaN, so the json path stays the fallback
    import orjson as _orjson

    _loads_rest = _orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None
    _loads_rest = json.loads


class RecordError(ValueError):
    """A malformed line. ``reason`` is ``"<code>: <detail>"``; ``code`` is the stable part."""

    def __init__(self, code: str, detail: str = ""):
        self.code = code
        self.reason = f"{code}: {detail}" if detail else code
        super().__init__(self.reason)


@dataclass
class Narrative:
    dataset_id: str
    image_id: str                      # ints are accepted in the input and kept as their decimal text
    annotator_id: int                  # -1 when absent
    caption: str
    utterance_texts: list              # [str] in input order
    utterance_times: np.ndarray        # float64 [U,2] (start_s, end_s), finite, start <= end
    points: np.ndarray                 # float64 [P,3] (x, y, t): time-sorted, finite
    segments: np.ndarray               # int32 [P] segment index of each point
    voice_recording: str = ""
    repairs: list = field(default_factory=list)   # reason codes (see module doc)
    points_dropped: int = 0
    point_dt: np.ndarray | None = None  # float32 [P] (see packed.compute_point_dt); None: not yet

    @property
    def has_traces(self) -> bool:
        return len(self.points) > 0

    @property
    def utterances(self) -> list:
        """[(text, start_s, end_s)]"""
        return [(u, float(a), float(b)) for u, (a, b) in zip(self.utterance_texts,
                                                             self.utterance_times)]


_EMPTY_POINTS = np.zeros((0, 3), np.float64)
_EMPTY_SEGS = np.zeros((0,), np.int32)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_common(obj) -> tuple:
    """Everything but the traces. Returns (dataset_id, image_id, annotator_id, caption,
    utterance_texts, utterance_times, voice_recording, repairs)."""
    if not isinstance(obj, dict):
        raise RecordError("bad_type", f"a line must hold a JSON object, got {type(obj).__name__}")
    if "caption" not in obj or obj["caption"] is None:
        raise RecordError("missing_caption")
    caption = obj["caption"]
    if not isinstance(caption, str):
        raise RecordError("bad_type", f"caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise RecordError("bad_value", "empty caption")
    if "image_id" not in obj or obj["image_id"] is None:
        raise RecordError("missing_image_id")
    image_id = obj["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
        raise RecordError("bad_type", f"image_id must be a string or an integer, "
                                      f"got {type(image_id).__name__}")
    image_id = str(image_id)
    if not image_id:
        raise RecordError("bad_value", "empty image_id")
    dataset_id = obj.get("dataset_id", "")
    if dataset_id is None:
        dataset_id = ""
    if not isinstance(dataset_id, str):
        raise RecordError("bad_type", f"dataset_id must be a string, got {type(dataset_id).__name__}")
    annotator_id = obj.get("annotator_id", -1)
    if annotator_id is None:
        annotator_id = -1
    if isinstance(annotator_id, str) and annotator_id.lstrip("-").isdigit():
        annotator_id = int(annotator_id)
    if isinstance(annotator_id, bool) or not isinstance(annotator_id, int):
        raise RecordError("bad_type", f"annotator_id must be an integer, "
                                      f"got {type(annotator_id).__name__}")
    if not -2**31 <= annotator_id < 2**31:  # stored as int32 (prepare.py's narr_annotator)
        raise RecordError("bad_value", f"annotator_id {annotator_id} does not fit in 32 bits")
    voice = obj.get("voice_recording", "")
    if not isinstance(voice, str):
        voice = ""
    repairs: list[str] = []
    timed = obj.get("timed_caption", [])
    if timed is None:
        timed = []
    if not isinstance(timed, list):
        raise RecordError("bad_type", "timed_caption must be a list")
    texts, times = _utterances(timed, repairs)
    return dataset_id, image_id, annotator_id, caption, texts, times, voice, repairs


_NUM_TYPES = {int, float}
_EMPTY_TIMES = np.zeros((0, 2), np.float64)
# Coordinates and times are stored as float32: a larger finite value would become inf there.
_F32_MAX = float(np.finfo(np.float32).max)


def _beyond_float32(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` with a finite value that float32 cannot hold."""
    return (np.isfinite(a) & (np.abs(a) > _F32_MAX)).any(axis=1)


def _utterances(timed: list, repairs: list) -> tuple[list, np.ndarray]:
    if not timed:
        return [], _EMPTY_TIMES
    try:  # the common case in one pass of C-level work
        texts = [u["utterance"] for u in timed]
        starts = [u["start_time"] for u in timed]
        ends = [u["end_time"] for u in timed]
        good = (set(map(type, texts)) == {str} and set(map(type, starts)) <= _NUM_TYPES
                and set(map(type, ends)) <= _NUM_TYPES)
    except (TypeError, KeyError):
        good = False
    if not good:  # find the first bad entry and say what is wrong with it
        for i, u in enumerate(timed):
            if not isinstance(u, dict):
                raise RecordError("bad_type", f"timed_caption[{i}] must be an object")
            if not (isinstance(u.get("utterance"), str) and _is_number(u.get("start_time"))
                    and _is_number(u.get("end_time"))):
                raise RecordError("bad_type", f"timed_caption[{i}] needs utterance (string), "
                                              f"start_time and end_time (numbers)")
    times = np.array((starts, ends), np.float64).T
    if not (np.abs(times) <= _F32_MAX).all():  # one pass for the common case; NaN fails it too
        for reason, bad in (("bad_utterances_dropped", ~np.isfinite(times).all(axis=1)),
                            ("out_of_range_utterances_dropped", _beyond_float32(times))):
            if bad.any():
                repairs.append(reason)
                texts = [t for t, b in zip(texts, bad) if not b]
                times = times[~bad]
    swap = times[:, 0] > times[:, 1]
    if swap.any():
        repairs.append("utterance_times_swapped")
        times[swap] = times[swap][:, ::-1]
    return texts, times


def _traces_from_json(traces) -> tuple[np.ndarray, np.ndarray]:
    """Validate the ``traces`` value of a json-parsed line: (points [P,3] float64, segments [P])."""
    if not isinstance(traces, list):
        raise RecordError("bad_type", "traces must be a list of segments")
    rows: list = []
    seg_ids: list = []
    for si, seg in enumerate(traces):
        if not isinstance(seg, list):
            raise RecordError("bad_type", f"traces[{si}] must be a list of points")
        for pi, p in enumerate(seg):
            if not isinstance(p, dict):
                raise RecordError("bad_type", f"traces[{si}][{pi}] must be an object")
            x, y, t = p.get("x"), p.get("y"), p.get("t")
            if not (_is_number(x) and _is_number(y) and _is_number(t)):
                raise RecordError("bad_type", f"traces[{si}][{pi}] needs numeric x, y, t")
            rows.append((x, y, t))
        seg_ids.append(len(seg))
    if not rows:
        return _EMPTY_POINTS, _EMPTY_SEGS
    pts = np.asarray(rows, dtype=np.float64)
    segs = np.repeat(np.arange(len(seg_ids), dtype=np.int32), seg_ids)
    return pts, segs


def _repair_points(pts: np.ndarray, segs: np.ndarray, repairs: list) -> tuple:
    """Drop non-finite points, sort t inside segments, merge overlapping segments in time order."""
    dropped = 0
    if len(pts) == 0:
        return pts, segs, 0
    if not (np.abs(pts) <= _F32_MAX).all():  # one pass for the common case; NaN fails it too
        for reason, bad in (("nonfinite_points_dropped", ~np.isfinite(pts).all(axis=1)),
                            ("out_of_range_points_dropped", _beyond_float32(pts))):
            if bad.any():
                dropped += int(bad.sum())
                pts, segs = pts[~bad], segs[~bad]
                repairs.append(reason)
        if len(pts) == 0:
            return _EMPTY_POINTS, _EMPTY_SEGS, dropped
    t = pts[:, 2]
    dt = np.diff(t)
    same = segs[1:] == segs[:-1]
    if (dt[same] < 0).any():
        order = np.lexsort((t, segs))  # stable: by segment, then time
        pts, segs = pts[order], segs[order]
        repairs.append("unsorted_t_sorted")
        t = pts[:, 2]
        dt = np.diff(t)
    if (dt < 0).any():  # a later segment starts before an earlier one ends
        order = np.argsort(t, kind="stable")
        pts, segs = pts[order], segs[order]
        repairs.append("segments_overlap_sorted")
    return pts, segs, dropped


def _finish(common, pts, segs, repairs_traces) -> Narrative:
    dataset_id, image_id, annotator_id, caption, texts, times, voice, repairs = common
    repairs.extend(repairs_traces)
    pts, segs, dropped = _repair_points(pts, segs, repairs)
    return Narrative(dataset_id, image_id, annotator_id, caption, texts, times, pts, segs, voice,
                     repairs, dropped)


def parse_line(raw: bytes | str) -> Narrative:
    """The reference path: ``json.loads`` the whole line, validate, repair."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("bad_json", f"not UTF-8 ({exc})") from None
    else:
        text = raw
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RecordError("bad_json", str(exc)) from None
    common = _validate_common(obj)
    if "traces" not in obj or obj["traces"] is None:
        return _finish(common, _EMPTY_POINTS, _EMPTY_SEGS, ["missing_traces"])
    pts, segs = _traces_from_json(obj["traces"])
    return _finish(common, pts, segs, ["empty_traces"] if len(pts) == 0 else [])


# ---------------------------------------------------------------------------------------------
# Fast path
# ---------------------------------------------------------------------------------------------
_KEY = b'"traces": ['
_POINT_SKELETON = b'{"x": , "y": , "t": }'
_NUM_CHARS = b"0123456789.-"
# Deleting these from a canonical traces value leaves ": N" per coordinate, "}" after each point's
# t, ", " between coordinates and points: the numbers with just enough around them to prove that
# each one sits in its slot (see _trace_numbers).
_LETTERS_AND_BRACKETS = b'{[]"xyt'
_P10F = 10.0 ** np.arange(19)
_ZEROS = np.array([48 * sum(10 ** k for k in range(n)) for n in range(19)])  # n "0" codes, as digits
_GROUP = 64
_MAX_LEN = 17  # longest number text the vectorized parser takes ("-0." + 14 digits)


@functools.lru_cache(maxsize=4096)
def _segment_skeleton(n: int) -> bytes:
    """The canonical text of a segment of ``n`` points with the numbers deleted."""
    return b"[" + b", ".join([_POINT_SKELETON] * n) + b"]"


# a segment "[{...}, {...}]" takes len("{...}, ") bytes a point ("[" and "]" stand in for a ", ")
_SEGMENT_BYTES_PER_POINT = len(_POINT_SKELETON) + 2


def _split_traces(raw: bytes):
    """(rest bytes with ``traces: []``, the traces with letters and brackets deleted, points per
    segment), or None: not the canonical layout (use the slow path)."""
    k = raw.find(_KEY)
    if k < 0:
        return None
    start = k + len(_KEY) - 1
    if raw.startswith(b"[]", start):
        return None  # empty traces: rare, the reference path handles it
    # LN files put traces last but one (before a short voice_recording): search from the end. A
    # "]]" later in the line, or a second "traces" key, fails the checks below or in _parse_group.
    end = raw.rfind(b"]]", start)
    if end < 0:
        return None
    end += 2
    tr = raw[start:end]
    # The skeleton (the text without the number characters) must be exactly "[[{...}, ...], ...]".
    skel = tr.translate(None, _NUM_CHARS)
    # Points per segment, read off the "]" that ends each segment (a one-byte find is a memchr;
    # a wrong guess on odd input just fails the comparison below).
    counts, pos = [], 1
    while pos < len(skel) - 1:
        cut = skel.find(b"]", pos)
        if cut < 0:
            return None
        counts.append((cut + 1 - pos) // _SEGMENT_BYTES_PER_POINT)
        pos = cut + 3
    if not sum(counts):
        return None  # no points: rare, the reference path handles it
    if skel != b"[" + b", ".join(map(_segment_skeleton, counts)) + b"]":
        return None
    return raw[:start] + b"[]" + raw[end:], tr.translate(None, _LETTERS_AND_BRACKETS), counts


def _trace_numbers(traces: list[bytes], num_points: int) -> np.ndarray | None:
    """The x, y, t numbers of several lines' traces (as :func:`_split_traces` leaves them) in one
    float64 array [3 * num_points], or None when the layout or a number is not what the fast path
    takes.

    The skeleton check of :func:`_split_traces` fixes the order of every non-number character,
    but not where the number characters sit between them (``{"x"1: 2`` has the skeleton of
    ``{"x": 12``). Here every number must sit in its slot: with ``", "`` before every line, each
    field between two commas must be exactly ``" : " + number`` (``" : " + number + "}"`` for a
    t), so no number character lies anywhere else."""
    buf = b", ".join([b"", *traces, bytes(_MAX_LEN + 1)])  # zero padding for the column gathers
    a = np.frombuffer(buf, np.uint8)
    seps = np.flatnonzero(a == 44)
    if len(seps) != 3 * num_points + 1:
        return None
    lead = seps[:-1]
    ends = seps[1:].copy()
    ends[2::3] -= 1  # the "}" after a t
    if not ((a[lead + 1] == 32) & (a[lead + 2] == 58) & (a[lead + 3] == 32)).all() \
            or not (a[ends[2::3]] == 125).all():
        return None
    vals, ok = _parse_numbers(a, lead + 4, ends - lead - 4)
    return vals if ok else None


def parse_csv_numbers(buf: bytes) -> tuple[np.ndarray, bool]:
    """Parse ``b"0.25,-1,12.125,..."`` (numbers made of ``[0-9.-]``, one comma between numbers)
    into float64, vectorized: see :func:`_parse_numbers`."""
    a = np.frombuffer(buf + b"," + bytes(_MAX_LEN + 1), np.uint8)
    seps = np.flatnonzero(a[: len(buf) + 1] == 44)
    if len(seps) == 0:
        return np.zeros(0), True
    starts = np.empty(len(seps), np.int64)
    starts[0] = 0
    starts[1:] = seps[:-1] + 1
    return _parse_numbers(a, starts, seps - starts)


def _parse_numbers(a: np.ndarray, starts: np.ndarray,
                   length: np.ndarray) -> tuple[np.ndarray, bool]:
    """The numbers ``a[starts[i]:starts[i] + length[i]]`` of the byte array ``a`` (each made of
    ``[0-9.-]``; ``a`` has no other dots or minus signs and ``_MAX_LEN + 1`` bytes of padding) as
    float64. Returns (values, ok); ``ok`` is False when any number is not a plain JSON number
    (``01``, ``1.``, ``.5``, ``1-2``, empty) or has more than 15 digits — the caller then takes the
    reference path. Values equal ``float(json.loads(text))`` exactly: the digits accumulate exactly
    in float64 (an integer below 2**53) and one division by an exact power of ten rounds.

    Numbers are grouped by their shape (length, dot position, sign); within a shape every digit
    sits at a fixed column, so each column is one gather and one multiply-add over the group."""
    n = len(starts)
    if length.min() < 1 or length.max() > _MAX_LEN:
        return np.zeros(n), False
    # the dot column of each number, one gather per column (cheaper than a search per dot), until
    # every dot of the buffer is placed (trace numbers have theirs in the first few columns)
    dots = int(np.count_nonzero(a == 46))
    dot_col = np.full(n, -1, np.int64)
    found = 0
    for j in range(1, int(length.max())):
        if found == dots:
            break
        is_dot = (a[j:][starts] == 46) & (length > j)
        dot_col[is_dot] = j
        found += int(np.count_nonzero(is_dot))
    # every dot found, and no number holding two (its dot_col keeps only one of them)
    if found != dots or int(np.count_nonzero(dot_col >= 0)) != dots:
        return np.zeros(n), False                         # ".5" or two dots in one number
    neg = a[starts] == 45
    if int(np.count_nonzero(a == 45)) != int(np.count_nonzero(neg)):
        return np.zeros(n), False                         # a minus inside a number
    key = ((length * 32 + dot_col + 1) * 2 + neg).astype(np.int16)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    cut = np.flatnonzero(ks[1:] != ks[:-1]) + 1
    vals = np.empty(n, np.float64)
    for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), n]):
        k = int(ks[lo])
        sign, rest = k & 1, k >> 1
        L, dc = rest // 32, rest % 32 - 1
        first = sign
        int_end = dc if dc >= 0 else L
        if int_end <= first or (dc >= 0 and dc >= L - 1) or L - first - (dc >= 0) > 15:
            return np.zeros(n), False                     # "-", ".5", "1.", too many digits
        idx = order[lo:hi]
        s = starts[idx]
        if int_end - first > 1 and (a[s + first] == 48).any():
            return np.zeros(n), False                     # leading zero: "01"
        # Horner over the digit columns on the character codes: exact (below 2**53 with at most
        # 15 digits), and the codes' "0"s (48 * 11...1) come off once at the end.
        cols = [j for j in range(first, L) if j != dc]
        mant = a[cols[0]:][s].astype(np.float64)
        for j in cols[1:]:
            mant *= 10.0
            mant += a[j:][s]
        mant -= _ZEROS[len(cols)]
        if dc >= 0:
            mant /= _P10F[L - 1 - dc]
        if sign and dc < 0:  # json.loads("-0") is the int 0: +0.0 (0 - 0), where "-0.0" is -0.0
            np.subtract(0.0, mant, out=mant)
        elif sign:
            np.negative(mant, out=mant)
        vals[idx] = mant
    return vals, True


def _slow(raw):
    try:
        return parse_line(raw)
    except RecordError as exc:
        return exc


def parse_lines(lines: list[bytes]) -> list[Narrative | RecordError]:
    """Parse many raw lines at once: the fast path, with the results of :func:`parse_line`
    (point values to within float32 storage; ``point_dt`` filled in)."""
    out: list = [None] * len(lines)
    fast: list = []  # (i, rest, points per segment)
    bufs: list = []
    for i, raw in enumerate(lines):
        split = _split_traces(raw) if isinstance(raw, bytes) else None
        if split is None:
            out[i] = _slow(raw)
        else:
            fast.append((i, split[0], split[2]))
            bufs.append(split[1])
    # Numbers of _GROUP lines per call: enough to amortize NumPy's per-call cost, few enough for
    # the temporaries (~1 MB) to stay in cache.
    for g in range(0, len(fast), _GROUP):
        _parse_group(lines, fast[g:g + _GROUP], bufs[g:g + _GROUP], out)
    return out


def _parse_group(lines, fast, bufs, out) -> None:
    npts = [sum(c) for _, _, c in fast]
    vals = _trace_numbers(bufs, sum(npts))
    if vals is None:
        # A malformed or unusual number somewhere: each line on its own (rare).
        if len(fast) > 1:
            for k in range(len(fast)):
                _parse_group(lines, fast[k:k + 1], bufs[k:k + 1], out)
        else:
            out[fast[0][0]] = _slow(lines[fast[0][0]])
        return
    pts = vals.reshape(-1, 3)
    seg_counts = [c for _, _, cs in fast for c in cs]
    seg_last = np.cumsum(seg_counts) - 1  # index of each segment's last point
    bounds = np.cumsum([0] + npts).tolist()
    t = pts[:, 2]
    d = np.diff(t)
    # t going backwards inside a line (not from one line to the next): that line needs repairs
    backwards = d < 0
    backwards[np.array(bounds[1:-1], np.int64) - 1] = False
    needs_repair = set()
    if backwards.any():
        lines_back = np.searchsorted(bounds, np.flatnonzero(backwards), "right") - 1
        needs_repair = set(lines_back.tolist())
    # time to the next point of the segment; a segment's last point repeats its previous interval
    # (NaN for a one-point segment): what packed.compute_point_dt gives
    dt = np.empty(len(t), np.float32)
    dt[:-1] = d
    prev = np.empty(len(t), np.float32)
    prev[0] = np.nan
    prev[1:] = d
    dt[seg_last] = np.where(np.asarray(seg_counts) > 1, prev[seg_last], np.nan)
    segs = np.repeat(np.array([k for _, _, cs in fast for k in range(len(cs))], np.int32),
                     seg_counts)
    for k, (i, rest, counts) in enumerate(fast):
        try:
            obj = _loads_rest(rest)
        except ValueError:
            out[i] = _slow(lines[i])  # the reference parser decides and words the reason
            continue
        if not isinstance(obj, dict) or obj.get("traces") != []:
            out[i] = _slow(lines[i])  # e.g. a duplicate "traces" key: let json decide
            continue
        try:
            common = _validate_common(obj)
        except RecordError as exc:
            out[i] = exc
            continue
        s, e = bounds[k], bounds[k + 1]
        if k in needs_repair:  # unsorted t or overlapping segments: the general path
            out[i] = _finish(common, pts[s:e], segs[s:e], [])
            continue
        dataset_id, image_id, annotator_id, caption, texts, times, voice, repairs = common
        out[i] = Narrative(dataset_id, image_id, annotator_id, caption, texts, times, pts[s:e],
                           segs[s:e], voice, repairs, 0, dt[s:e])


_BOM = b"\xef\xbb\xbf"


def iter_lines(path, chunk_lines: int = 256):
    """Stream a JSON Lines file in chunks: yields lists of (line_number, byte_offset, raw bytes);
    1-based, blank lines skipped (they are not records). ``raw`` keeps its line ending (no 20 KB
    copy per line; JSON ignores it). A UTF-8 byte-order mark at the start of the file (editors on
    Windows write one) is not part of the first record: it is skipped."""
    chunk = []
    offset = 0
    # A 1 MiB buffer: with the default 8 KiB one, each ~20 KB line costs several reads and joins.
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, raw in enumerate(f, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM):], start + len(_BOM)
            if raw.isspace() or not raw:
                continue
            chunk.append((lineno, start, raw))
            if len(chunk) >= chunk_lines:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
