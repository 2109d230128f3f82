"""``loctex prepare``: validate, repair, align and pack Localized Narratives (DESIGN §2, §5).

    loctex prepare --narratives F [F ...] --images DIR --out DIR [--tokenizer tok.json]
                   [--image-template T] [--max-reject-fraction 0.01] [--max-missing-fraction 0.01]

Streams every input file in chunks (memory: one chunk plus the image table), so a 500k-line shard
and several shards per run are fine. Per line: parse + validate + repair (:mod:`loctex.data.records`),
find the image (``--image-template`` or the data set's convention: COCO ``train2017/%012d.jpg``,
Open Images ``<id>.jpg``, else ``<id>.jpg``/``%012d.jpg``), read its size from the file header (no
decode), tokenize (the tokenizer is trained on the captions first when none is given), align the
tokens to utterance times (:mod:`loctex.data.align`), and append to the packed arrays
(:mod:`loctex.data.packed`).

Hostile and damaged input:

* An image path that resolves outside ``--images`` (an absolute ``image_id``, ``..``, a symlink
  leading out, a template that climbs) is never opened: the line is rejected with reason
  ``image_outside_root``.
* Exact duplicate lines (same bytes, in any of the files) are dropped: a narrative twice in an epoch
  would be its own contrastive negative. The first copy is kept; ``duplicates`` counts the others
  and ``duplicate_examples`` names a few (``FILE:LINE`` -> the first copy's ``FILE:LINE``).
* A UTF-8 byte-order mark at the start of a file is skipped.

Outputs in ``--out``: the packed arrays + ``manifest.json`` + ``tokenizer.json``, ``report.json``
(``read``, ``kept``, ``rejected``, ``reject_reasons``, ``repaired`` {reason: narratives},
``no_localization``, ``missing_images``, ``duplicates``, ``points_dropped``,
``unaligned_utterances``, ``files`` {file: the same counts + ``reject_fraction`` and
``missing_fraction``}) and ``rejects.jsonl`` (``{file, line, reason, raw}`` per rejected line).
The run fails (exit 1, naming the file or directory) when the ``--images`` directory does not exist,
an input file is missing or holds no record, or a file's reject fraction (rejected / read) exceeds
``--max-reject-fraction`` or its missing-image fraction (narratives whose image is missing or
unreadable / valid narratives) exceeds ``--max-missing-fraction``; after the per-file checks both
reports are still written and the packed arrays are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from loctex.data import align as A
from loctex.data.jpeg import BadImage, check_image_bytes, jpeg_size
from loctex.data.packed import PackedWriter, compute_point_dt
from loctex.data.records import RecordError, iter_lines, parse_lines
from loctex.data.tokenizer import (CaptionEncoder, iter_captions, load_tokenizer,
                                   train_tokenizer)


class PrepareError(RuntimeError):
    """The run failed a data-quality check or its inputs are unusable; the message names the file
    or directory."""


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def image_candidates(dataset_id: str, image_id: str, template: str | None = None) -> list[str]:
    """Relative paths to try for an image, most likely first."""
    num = int(image_id) if image_id.isdigit() else None
    if template:
        if "%" in template and "{" not in template:
            try:
                return [template % (num if num is not None and "d" in template else image_id)]
            except TypeError:
                return [template % image_id]
        return [template.format(image_id=image_id, image_num=num if num is not None else image_id,
                                dataset_id=dataset_id)]
    ds = dataset_id.lower()
    out: list[str] = []
    if num is not None:
        name = f"{num:012d}.jpg"
        if "coco" in ds:
            split = "val2017" if "val" in ds else "train2017"
            out += [f"{split}/{name}", name]
        else:
            out += [name, f"images/{name}"]
    if "open_images" in ds or "openimages" in ds:
        split = "validation" if "val" in ds else ("test" if "test" in ds else "train")
        out += [f"{image_id}.jpg", f"{split}/{image_id}.jpg"]
    out += [f"{image_id}.jpg", f"{image_id}.jpeg", f"{image_id}.png", f"images/{image_id}.jpg"]
    seen: set = set()
    return [p for p in out if not (p in seen or seen.add(p))]


_HEAD_BYTES = 65536  # the image size is read from this much of the file


def read_image_size(path, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the header: JPEG SOF / PNG IHDR from the first 64 KiB (of ``data``
    when the caller has read the file already), else a lazy PIL open (no pixel decode). Raises
    OSError/ValueError for unreadable files."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read(_HEAD_BYTES)
    head = data[:_HEAD_BYTES]
    if head[:2] == b"\xff\xd8":
        try:
            return jpeg_size(head)
        except BadImage as exc:
            if "truncated" not in str(exc) or len(head) < _HEAD_BYTES:
                raise ValueError(str(exc)) from None
    elif head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w and h:
            return w, h
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def probe_image(path, check: str) -> tuple[int, int]:
    """(width, height) of a good image; raises OSError/ValueError (the reason) for a bad one.
    Beyond ``header`` the file is read once, for both the size and the ``--check-images`` check
    (two opens and reads cost about as much as the check of a small image)."""
    if check == "header":
        return read_image_size(path)
    with open(path, "rb", buffering=0) as f:
        data = f.read()
    size = read_image_size(path, data)
    bad = check_image_bytes(data, check)
    if bad is not None:
        raise ValueError(bad)
    return size


OUTSIDE_ROOT = -2  # ImageTable.lookup: the image path leaves the image root


class ImageTable:
    """(dataset_id, image_id) -> row of the packed image tables, -1 when missing/unreadable, or
    ``OUTSIDE_ROOT`` when a candidate path resolves outside the root (then nothing was opened)."""

    def __init__(self, root, template: str | None, writer: PackedWriter,
                 check: str = "structure"):
        self.root, self.template, self.writer = Path(root), template, writer
        self.real_root = os.path.join(os.path.realpath(self.root), "")  # with its trailing "/"
        self.check = check             # --check-images: header | structure | decode
        self.index: dict = {}
        self.pending: tuple[list, list, list] = ([], [], [])
        self.missing_files: dict = {}  # first few missing paths, for the report
        self.outside: dict = {}        # key -> the path that escaped, for the reject reason
        self._dirs_inside: dict[str, bool] = {}

    def inside_root(self, rel: str) -> bool:
        """Whether ``root / rel`` resolves (``..``, symlinks, an absolute ``rel``) inside the root.
        A ``realpath`` costs a system call per component of the whole path, so directories are
        resolved once each, and a file only when it is a symlink (one ``lstat``)."""
        if os.path.isabs(rel):
            return False
        head, name = os.path.split(rel)
        inside = self._dirs_inside.get(head)
        if inside is None:
            inside = self._dirs_inside[head] = self._resolves_inside(head)
        if not inside:
            return False
        if name in ("", ".", ".."):
            return self._resolves_inside(rel)
        try:
            if not stat.S_ISLNK(os.lstat(os.path.join(self.real_root, rel)).st_mode):
                return True
        except OSError:  # not there: the open fails as not found
            return True
        return self._resolves_inside(rel)

    def _resolves_inside(self, rel: str) -> bool:
        real = os.path.realpath(os.path.join(self.real_root, rel))
        return os.path.join(real, "").startswith(self.real_root)  # the root itself counts

    def lookup(self, dataset_id: str, image_id: str) -> int:
        key = (dataset_id, image_id)
        row = self.index.get(key)
        if row is not None:
            return row
        row = -1
        tried = image_candidates(dataset_id, image_id, self.template)
        for rel in tried:
            if not self.inside_root(rel):
                self.outside[key] = rel
                self.index[key] = OUTSIDE_ROOT
                return OUTSIDE_ROOT
            path = self.root / rel
            try:
                size = probe_image(path, self.check)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                if len(self.missing_files) < 20:
                    self.missing_files[str(path)] = f"unreadable: {exc}"
                break
            row = self.writer.num_images + len(self.pending[0])
            self.pending[0].append(rel)
            self.pending[1].append(image_id)
            self.pending[2].append(size)
            break
        else:
            if len(self.missing_files) < 20:
                self.missing_files[str(self.root / tried[0])] = "not found"
        self.index[key] = row
        return row

    def outside_reason(self, dataset_id: str, image_id: str) -> str:
        rel = self.outside[(dataset_id, image_id)]
        return (f"image_outside_root: image_id {image_id!r} gives the path {rel!r}, which "
                f"resolves outside --images {self.root}")

    def flush(self) -> None:
        if self.pending[0]:
            self.writer.add_images(*self.pending)
            self.pending = ([], [], [])


class DuplicateLines:
    """Finds exact duplicate lines across the files of a run, in one pass.

    Hashing whole ~20 KB lines would cost a tenth of the prepare time, so the key is the length and
    the first and last 512 bytes (which hold the ids and the voice recording's name: distinct
    narratives differ there); a key seen before is confirmed by reading the earlier line back, which
    only true duplicates (and the odd key collision) pay."""

    _EDGE = 512

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.seen: dict[int, list[tuple[int, int, int]]] = {}  # key -> [(src, offset, line)]
        self.count = 0
        self.examples: dict[str, str] = {}

    @staticmethod
    def _body(raw: bytes) -> bytes:
        return raw.rstrip(b"\r\n")

    def first_copy(self, src: int, lineno: int, offset: int, raw: bytes) -> str | None:
        """``FILE:LINE`` of an earlier identical line, or None (then this line is remembered)."""
        n = len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
        key = hash((n, raw[:min(n, self._EDGE)], raw[max(0, n - self._EDGE):n]))
        earlier = self.seen.setdefault(key, [])
        body = None
        for e_src, e_offset, e_line in earlier:
            body = self._body(raw) if body is None else body
            with open(self.paths[e_src], "rb") as f:
                f.seek(e_offset)
                if self._body(f.readline()) == body:
                    first = f"{self.paths[e_src]}:{e_line}"
                    self.count += 1
                    if len(self.examples) < 20:
                        self.examples[f"{self.paths[src]}:{lineno}"] = first
                    return first
        earlier.append((src, offset, lineno))
        return None


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
class _Counts:
    def __init__(self):
        self.read = self.kept = self.rejected = self.no_localization = self.missing_images = 0
        self.duplicates = self.points_dropped = self.unaligned_utterances = 0
        self.repaired: Counter = Counter()
        self.reject_reasons: Counter = Counter()

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "rejected": self.rejected,
                "repaired": dict(sorted(self.repaired.items())),
                "no_localization": self.no_localization, "missing_images": self.missing_images,
                "duplicates": self.duplicates, "points_dropped": self.points_dropped,
                "unaligned_utterances": self.unaligned_utterances,
                "reject_reasons": dict(sorted(self.reject_reasons.items()))}

    def reject(self, rejects, path, lineno: int, raw: bytes, code: str, reason: str) -> None:
        """Count a rejected line and write it to ``rejects.jsonl`` (the open file ``rejects``)."""
        self.rejected += 1
        self.reject_reasons[code] += 1
        text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        rejects.write(json.dumps({"file": str(path), "line": lineno, "reason": reason,
                                  "raw": text}) + "\n")

    def add(self, other: "_Counts") -> None:
        for k in ("read", "kept", "rejected", "no_localization", "missing_images", "duplicates",
                  "points_dropped", "unaligned_utterances"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.repaired.update(other.repaired)
        self.reject_reasons.update(other.reject_reasons)


def _pack_chunk(good: list, rows: list, src: int, tok, writer: PackedWriter,
                datasets: dict, counts: _Counts) -> None:
    """Tokenize, align and append a chunk of kept narratives (vectorized over the chunk)."""
    n = len(good)
    caps = [r.caption for r, _ in good]
    ids, chars, ntok = tok.encode_flat(caps)  # tok: a CaptionEncoder
    # All captions of the chunk on one character axis (one gap between captions), so that one
    # searchsorted assigns every token of the chunk to its utterance.
    base = np.cumsum([0] + [len(c) + 1 for c in caps[:-1]])
    spans, missing = A.align_batch(caps, [r.utterance_texts for r, _ in good])
    counts.unaligned_utterances += missing
    windows = A.token_windows(chars + np.repeat(base, ntok)[:, None], spans,
                              np.concatenate([r.utterance_times for r, _ in good]))
    tok_owner = np.repeat(np.arange(n), ntok)
    has_window = np.bincount(tok_owner[np.isfinite(windows[:, 0])], minlength=n) > 0
    npts = np.array([len(r.points) for r, _ in good])
    counts.no_localization += int(((npts == 0) | ~has_window).sum())
    pts = np.concatenate([r.points for r, _ in good]) if npts.sum() else np.zeros((0, 3))
    segs = [r.segments for r, _ in good]
    dts = [r.point_dt if r.point_dt is not None else compute_point_dt(r.points[:, 2], r.segments)
           for r, _ in good]
    narr_dataset = np.array([datasets.setdefault(r.dataset_id, len(datasets)) for r, _ in good],
                            np.int16)
    for r, _ in good:
        if r.repairs or r.points_dropped:
            counts.repaired.update(r.repairs)
            counts.points_dropped += r.points_dropped
    writer.add_chunk(
        narr_image=np.asarray(rows, np.int32),
        narr_annotator=np.array([r.annotator_id for r, _ in good], np.int32),
        narr_dataset=narr_dataset, narr_source=np.full(n, src, np.int16),
        narr_line=np.array([lineno for _, lineno in good], np.int64),
        captions=[c.encode("utf-8") for c in caps], token_lengths=ntok,
        token_ids=ids, token_chars=chars.astype(np.int32),
        token_windows=windows, point_lengths=npts, points_xy=pts[:, :2].astype(np.float32),
        points_t=pts[:, 2].astype(np.float32),
        point_segment=np.concatenate(segs).astype(np.int32, copy=False),
        point_dt=np.concatenate(dts).astype(np.float32, copy=False))
    counts.kept += n


def prepare(narratives, images, out, tokenizer=None, image_template: str | None = None,
            max_reject_fraction: float = 0.01, vocab_size: int = 8000, chunk_lines: int = 256,
            log=print, check_images: str = "structure",
            max_missing_fraction: float = 0.01) -> dict:
    """Run ``loctex prepare``; returns the report dict. Raises :class:`PrepareError` naming the
    file or directory: up front when ``images`` is not a directory or an input file is missing or
    empty; after writing ``report.json`` and ``rejects.jsonl`` when a file holds no record or its
    reject or missing-image fraction is over its threshold."""
    t0 = time.perf_counter()
    narratives = [Path(p) for p in narratives]
    if not Path(images).is_dir():
        raise PrepareError(f"{images}: the --images directory does not exist")
    for p in narratives:
        if not p.is_file():
            raise PrepareError(f"{p}: no such narratives file")
        if p.stat().st_size == 0:
            raise PrepareError(f"{p}: empty file, no narratives")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        if Path(tokenizer).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer, out / "tokenizer.json")
    else:
        log(f"prepare: training a tokenizer (vocab {vocab_size}) on the captions")
        tok = train_tokenizer(iter_captions(narratives), vocab_size)
        tok.save(str(out / "tokenizer.json"))
    encoder = CaptionEncoder(tok)
    writer = PackedWriter(out)
    table = ImageTable(images, image_template, writer, check_images)
    duplicates = DuplicateLines(narratives)
    datasets: dict = {}
    total = _Counts()
    per_file: dict = {}
    failed: list[tuple[str, str]] = []  # (file, why)
    with open(out / "rejects.jsonl", "w") as rej:
        for src, path in enumerate(narratives):
            counts = _Counts()
            for chunk in iter_lines(path, chunk_lines):
                counts.read += len(chunk)
                unique = [(lineno, raw) for lineno, offset, raw in chunk
                          if duplicates.first_copy(src, lineno, offset, raw) is None]
                counts.duplicates += len(chunk) - len(unique)
                results = parse_lines([raw for _, raw in unique])
                good, rows = [], []
                for (lineno, raw), r in zip(unique, results):
                    if isinstance(r, RecordError):
                        counts.reject(rej, path, lineno, raw, r.code, r.reason)
                        continue
                    row = table.lookup(r.dataset_id, r.image_id)
                    if row == OUTSIDE_ROOT:
                        counts.reject(rej, path, lineno, raw, "image_outside_root",
                                      table.outside_reason(r.dataset_id, r.image_id))
                        continue
                    if row < 0:
                        counts.missing_images += 1
                        continue
                    good.append((r, lineno))
                    rows.append(row)
                table.flush()
                if good:
                    _pack_chunk(good, rows, src, encoder, writer, datasets, counts)
            frac = counts.rejected / max(counts.read, 1)
            valid = counts.read - counts.rejected - counts.duplicates
            missing_frac = counts.missing_images / max(valid, 1)
            per_file[str(path)] = {**counts.as_dict(), "reject_fraction": round(frac, 6),
                                   "missing_fraction": round(missing_frac, 6)}
            if counts.read == 0:
                failed.append((str(path), "no narratives (only blank lines)"))
            if frac > max_reject_fraction:
                failed.append((str(path), f"{counts.rejected} of {counts.read} lines rejected "
                                          f"({frac:.2%} > --max-reject-fraction="
                                          f"{max_reject_fraction}); see {out / 'rejects.jsonl'}"))
            if missing_frac > max_missing_fraction:
                failed.append((str(path), f"{counts.missing_images} of {valid} narratives have a "
                                          f"missing or unreadable image under {images} "
                                          f"({missing_frac:.2%} > --max-missing-fraction="
                                          f"{max_missing_fraction}); see missing_image_examples "
                                          f"in {out / 'report.json'}"))
            total.add(counts)
    elapsed = time.perf_counter() - t0
    report = {**total.as_dict(), "missing_image_examples": table.missing_files,
              "duplicate_examples": duplicates.examples,
              "num_images": writer.num_images, "max_reject_fraction": max_reject_fraction,
              "max_missing_fraction": max_missing_fraction,
              "files": per_file, "seconds": round(elapsed, 3),
              "narratives_per_s": round(total.read / max(elapsed, 1e-9), 1)}
    if failed:
        writer.abort()
        report["failed"] = sorted({f for f, _ in failed})
    else:
        writer.close({"image_root": str(Path(images).resolve()), "tokenizer": "tokenizer.json",
                      "dataset_ids": list(datasets), "sources": [str(p) for p in narratives],
                      "image_template": image_template or "",
                      "token_windows": "raw utterance times; the data set applies window_pad_s "
                                       "and lag_s"})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if failed:
        raise PrepareError("; ".join(f"{f}: {why}" for f, why in failed))
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--narratives", nargs="+", required=True, help="Localized Narratives .jsonl")
    parser.add_argument("--images", required=True, help="image root directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: train one on the captions)")
    parser.add_argument("--image-template", default=None,
                        help="image path relative to --images, e.g. 'train2017/%%012d.jpg' or "
                             "'{image_id}.jpg' (fields: image_id, image_num, dataset_id)")
    parser.add_argument("--max-reject-fraction", type=float, default=0.01,
                        help="fail when a file's rejected lines / lines read exceed this")
    parser.add_argument("--max-missing-fraction", type=float, default=0.01,
                        help="fail when a file's narratives with a missing or unreadable image / "
                             "valid narratives exceed this")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="vocabulary size when training the tokenizer")
    parser.add_argument("--check-images", choices=["header", "structure", "decode"],
                        default="structure",
                        help="per image: read the size only / also check the JPEG byte structure "
                             "(truncation, corrupt scan data; default) / also trial-decode it "
                             "strictly (a decoder warning is a failure). Bad images count as "
                             "missing_images")
    parser.add_argument("--format", choices=["packed", "shards"], default="packed",
                        help="shards: also write tar shards (WebDataset layout) to OUT/shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)


def main(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        report = prepare(args.narratives, args.images, args.out, args.tokenizer,
                         args.image_template, args.max_reject_fraction, args.vocab_size,
                         check_images=args.check_images,
                         max_missing_fraction=args.max_missing_fraction)
        if args.format == "shards":
            from loctex.data.shards import write_shards_from_prepared
            write_shards_from_prepared(args.out, Path(args.out) / "shards", args.samples_per_shard,
                                       check_images=args.check_images != "header")
    except PrepareError as exc:
        print(f"loctex prepare: {exc}", file=sys.stderr)
        return 1
    print(f"prepare: read {report['read']}, kept {report['kept']}, rejected {report['rejected']}, "
          f"missing images {report['missing_images']}, duplicates {report['duplicates']}, "
          f"no localization "
          f"{report['no_localization']}, repaired {report['repaired']} "
          f"({report['narratives_per_s']:.0f} narratives/s) -> {args.out}")
    return 0
