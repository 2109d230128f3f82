"""The packed, memory-mappable format that ``loctex prepare`` writes and the data set reads.

A prepared directory holds ``manifest.json`` (``format_version``, counts, the image root, the
tokenizer file, the array list) and one NumPy ``.npy`` file per array, opened with
``np.load(mmap_mode="r")``: opening costs a few milliseconds whatever the size, and reading narrative
``i`` touches only its own slices. Ragged data is stored flat with an ``int64 [N+1]`` offsets array:
the rows of narrative ``i`` are ``data[offsets[i]:offsets[i+1]]``.

=====================  ===============  =========================================================
array                  dtype, shape     meaning
=====================  ===============  =========================================================
narr_image             int32 [N]        row of the image tables
narr_annotator         int32 [N]        annotator id (-1: absent)
narr_dataset           int16 [N]        index into ``manifest["dataset_ids"]``
narr_source            int16 [N]        index into ``manifest["sources"]`` (input file)
narr_line              int64 [N]        1-based line number in that file
caption_offsets        int64 [N+1]      into caption_bytes
caption_bytes          uint8 [C]        UTF-8 captions (the input text, not lower-cased)
token_offsets          int64 [N+1]      into the token arrays
token_ids              int32 [T]        caption tokens, no [CLS]/[SEP]
token_chars            int32 [T,2]      ``[start, end)`` character offsets in the caption
token_windows          float32 [T,2]    raw utterance ``[start_s, end_s]``; NaN: no window
point_offsets          int64 [N+1]      into the point arrays
points_xy              float32 [P,2]    normalized to the full image, as in the input
points_t               float32 [P]      seconds; ascending within each narrative
point_segment          int32 [P]        segment index within the narrative
point_dt               float32 [P]      time to the next point of the same segment (the last
                                        point of a segment repeats its previous interval; NaN
                                        for a one-point segment)
image_path_offsets     int64 [I+1]      into image_path_bytes
image_path_bytes       uint8            UTF-8 paths relative to ``manifest["image_root"]``
image_id_offsets       int64 [I+1]      into image_id_bytes
image_id_bytes         uint8            UTF-8 image ids
image_sizes            int32 [I,2]      (width, height) read from the file header
=====================  ===============  =========================================================

Token windows are stored raw (times, not point ranges): the data set applies ``data.window_pad_s``
and ``data.lag_s`` and finds the point range with a binary search on ``points_t``, so those config
values change without a new ``prepare``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# name -> (dtype, trailing shape)
ARRAYS: dict[str, tuple[str, tuple]] = {
    "narr_image": ("<i4", ()),
    "narr_annotator": ("<i4", ()),
    "narr_dataset": ("<i2", ()),
    "narr_source": ("<i2", ()),
    "narr_line": ("<i8", ()),
    "caption_offsets": ("<i8", ()),
    "caption_bytes": ("|u1", ()),
    "token_offsets": ("<i8", ()),
    "token_ids": ("<i4", ()),
    "token_chars": ("<i4", (2,)),
    "token_windows": ("<f4", (2,)),
    "point_offsets": ("<i8", ()),
    "points_xy": ("<f4", (2,)),
    "points_t": ("<f4", ()),
    "point_segment": ("<i4", ()),
    "point_dt": ("<f4", ()),
    "image_path_offsets": ("<i8", ()),
    "image_path_bytes": ("|u1", ()),
    "image_id_offsets": ("<i8", ()),
    "image_id_bytes": ("|u1", ()),
    "image_sizes": ("<i4", (2,)),
}

_HEADER_LEN = 128  # fixed .npy v1 header size, so the final shape can be written in place


class NpyAppender:
    """Append rows to a ``.npy`` file without holding them: the header is rewritten on close."""

    def __init__(self, path, dtype: str, inner: tuple = ()):
        self.path, self.dtype, self.inner = Path(path), np.dtype(dtype), tuple(inner)
        self.rows = 0
        self.f = open(self.path, "wb")
        self.f.write(self._header())

    def _header(self) -> bytes:
        shape = (self.rows, *self.inner)
        d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (self.dtype.str, shape)
        head = b"\x93NUMPY\x01\x00"
        body = d.encode("latin1")
        pad = _HEADER_LEN - len(head) - 2 - len(body) - 1
        if pad < 0:  # pragma: no cover - 2**63 rows still fit
            raise ValueError("npy header too long")
        body += b" " * pad + b"\n"
        return head + np.uint16(len(body)).astype("<u2").tobytes() + body

    def append(self, arr) -> None:
        a = np.ascontiguousarray(arr, dtype=self.dtype)
        if a.shape[1:] != self.inner:
            a = a.reshape((-1, *self.inner))
        self.rows += a.shape[0]
        self.f.write(a.tobytes())

    def close(self) -> None:
        if self.f.closed:
            return
        self.f.seek(0)
        self.f.write(self._header())
        self.f.close()


class PackedWriter:
    """Streams narratives into the arrays above; memory is one chunk."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.arrays = {name: NpyAppender(self.out / f"{name}.npy", dt, inner)
                       for name, (dt, inner) in ARRAYS.items()}
        self.ends = {k: 0 for k in ("caption", "token", "point", "image_path", "image_id")}
        for k in self.ends:
            self.arrays[f"{k}_offsets"].append(np.zeros(1, np.int64))
        self.num_narratives = 0
        self.num_images = 0

    def _ragged(self, key: str, lengths) -> None:
        lengths = np.asarray(lengths, np.int64)
        ends = self.ends[key] + np.cumsum(lengths)
        if len(ends):
            self.ends[key] = int(ends[-1])
            self.arrays[f"{key}_offsets"].append(ends)

    def add_images(self, paths: list[str], ids: list[str], sizes) -> None:
        pb = [p.encode() for p in paths]
        ib = [i.encode() for i in ids]
        self.arrays["image_path_bytes"].append(np.frombuffer(b"".join(pb), np.uint8))
        self.arrays["image_id_bytes"].append(np.frombuffer(b"".join(ib), np.uint8))
        self._ragged("image_path", [len(b) for b in pb])
        self._ragged("image_id", [len(b) for b in ib])
        self.arrays["image_sizes"].append(np.asarray(sizes, np.int32).reshape(-1, 2))
        self.num_images += len(paths)

    def add_chunk(self, *, narr_image, narr_annotator, narr_dataset, narr_source, narr_line,
                  captions: list, token_lengths, token_ids, token_chars, token_windows,
                  point_lengths, points_xy, points_t, point_segment, point_dt) -> None:
        """One chunk of narratives; token and point arrays are flat with per-narrative lengths."""
        n = len(captions)
        if n == 0:
            return
        a = self.arrays
        a["narr_image"].append(narr_image)
        a["narr_annotator"].append(narr_annotator)
        a["narr_dataset"].append(narr_dataset)
        a["narr_source"].append(narr_source)
        a["narr_line"].append(narr_line)
        a["caption_bytes"].append(np.frombuffer(b"".join(captions), np.uint8))
        self._ragged("caption", [len(c) for c in captions])
        self._ragged("token", token_lengths)
        a["token_ids"].append(token_ids)
        a["token_chars"].append(token_chars)
        a["token_windows"].append(token_windows)
        self._ragged("point", point_lengths)
        a["points_xy"].append(points_xy)
        a["points_t"].append(points_t)
        a["point_segment"].append(point_segment)
        a["point_dt"].append(point_dt)
        self.num_narratives += n

    def close(self, manifest: dict) -> dict:
        for arr in self.arrays.values():
            arr.close()
        shapes = {name: {"dtype": arr.dtype.str, "shape": [arr.rows, *arr.inner]}
                  for name, arr in self.arrays.items()}
        manifest = {"format_version": FORMAT_VERSION, "num_narratives": self.num_narratives,
                    "num_images": self.num_images, "arrays": shapes, **manifest}
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.out / MANIFEST)  # the manifest appears last: its presence = complete
        return manifest

    def abort(self) -> None:
        for name, arr in self.arrays.items():
            arr.close()
            (self.out / f"{name}.npy").unlink(missing_ok=True)


def compute_point_dt(t: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Time to the next point of the same segment; a segment's last point repeats its previous
    interval; NaN for one-point segments. Works for interleaved segments too."""
    n = len(t)
    out = np.full(n, np.nan, np.float32)
    if n == 0:
        return out
    order = np.lexsort((t, seg)) if (np.diff(seg) < 0).any() else np.arange(n)
    ts, ss = np.asarray(t, np.float64)[order], np.asarray(seg)[order]
    same = ss[1:] == ss[:-1]
    d = np.diff(ts)
    dt = np.full(n, np.nan)
    dt[:-1][same] = d[same]
    last = np.ones(n, bool)
    last[:-1] = ~same
    prev = np.full(n, np.nan)
    prev[1:][same] = d[same]
    dt[last] = prev[last]
    out[order] = dt
    return out


class PackedNarratives:
    """Read side: ``PackedNarratives(dir)`` memory-maps every array (milliseconds)."""

    def __init__(self, prepared, image_root: str | None = None):
        self.dir = Path(prepared)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.dir}: no {MANIFEST} (not a prepared directory, or "
                                    f"`loctex prepare` did not finish)")
        self.manifest = json.loads(mpath.read_text())
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{self.dir}: format_version {version}; this code reads "
                             f"{FORMAT_VERSION} (re-run `loctex prepare`)")
        self.arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r")
                       for name in self.manifest["arrays"]}
        root = image_root or self.manifest.get("image_root", "")
        self.image_root = Path(root) if root else self.dir
        self.dataset_ids = self.manifest.get("dataset_ids", [])
        # Offsets are small and hit on every access: keep them in RAM.
        for k in ("caption_offsets", "token_offsets", "point_offsets", "image_path_offsets",
                  "image_id_offsets", "narr_image"):
            self.arrays[k] = np.asarray(self.arrays[k])

    def __len__(self) -> int:
        return int(self.manifest["num_narratives"])

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.manifest.get("tokenizer", "tokenizer.json")

    def _slice(self, key: str, i: int) -> slice:
        off = self.arrays[f"{key}_offsets"]
        return slice(int(off[i]), int(off[i + 1]))

    def caption(self, i: int) -> str:
        return bytes(self.arrays["caption_bytes"][self._slice("caption", i)]).decode("utf-8")

    def image_index(self, i: int) -> int:
        return int(self.arrays["narr_image"][i])

    def image_path(self, image_index: int) -> Path:
        rel = bytes(self.arrays["image_path_bytes"][self._slice("image_path", image_index)])
        return self.image_root / rel.decode("utf-8")

    def image_id(self, image_index: int) -> str:
        return bytes(self.arrays["image_id_bytes"][self._slice("image_id", image_index)]).decode()

    def image_size(self, image_index: int) -> tuple[int, int]:
        w, h = self.arrays["image_sizes"][image_index]
        return int(w), int(h)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids int32 [T], token_chars int32 [T,2], raw token_windows float32 [T,2])."""
        s = self._slice("token", i)
        a = self.arrays
        return np.asarray(a["token_ids"][s]), np.asarray(a["token_chars"][s]), \
            np.asarray(a["token_windows"][s])

    def points(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(points_xy float32 [P,2], points_t float32 [P], point_segment int32 [P],
        point_dt float32 [P]) of narrative ``i``."""
        s = self._slice("point", i)
        a = self.arrays
        return (np.asarray(a["points_xy"][s]), np.asarray(a["points_t"][s]),
                np.asarray(a["point_segment"][s]), np.asarray(a["point_dt"][s]))

