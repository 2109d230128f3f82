"""Tar shards for data sets that live on object storage (``loctex prepare --format shards``).

Layout (WebDataset): ``shard-000000.tar`` ... each holding, per narrative, ``KEY.jpg`` (the original
JPEG bytes) followed by ``KEY.json`` (its packed annotations: caption, ids, image size, and the
token / trace arrays of the prepared directory as exact little-endian bytes, see
:func:`sample_to_json`), so generic tar / webdataset tools read them as they are. Beside the tars,
``shards.json`` (format, version, per-shard sample counts, bad images left out) and ``members.npy``
(per sample: shard, byte offset and size of its .jpg and .json) let a reader seek straight to a
sample of a local or mounted shard; :func:`iter_tar` streams a tar without them.

Reading, on both backends:

* :class:`ShardNarratives` - the read API of the prepared directory
  (:class:`~loctex.data.packed.PackedNarratives`) over the shards, so
  :class:`ShardNarrativeDataset` is the torch data set with images from the tars: same decisions,
  same annotations, same samples.
* :class:`~loctex.data.samplers.TarShardBatchSampler` - per-rank shard assignment: shards are
  dealt to ranks per epoch (seeded) and read one after the other; the position is a step count
  (``start_step``), as for the prepared directory.
* :class:`ShardStream` (an ``IterableDataset``) + :class:`ShardLoader` - the torch backend's
  streaming loader with ``state_dict()``; the DALI backend feeds the same sampler's batches through
  its sample source (:mod:`loctex.data.dali`). DALI's own ``readers.webdataset`` is not used: it
  shuffles and shards internally, while the per-sample decisions (crop, flip, jitter) and the
  annotations must come from the one seeded sample source, before decoding.
"""
from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from loctex.data.collate import collate_batch
from loctex.data.dataset import NarrativeDataset
from loctex.data.samplers import TarShardBatchSampler
from loctex.data.workers import stop_signals_blocked, worker_init

FORMAT = "loctex-shards"
VERSION = 1
MANIFEST = "shards.json"
MEMBERS = "members.npy"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# ------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Writes samples into tar shards of at most ``samples_per_shard`` samples.

    ``add(key, jpeg_bytes, meta)``; ``close()`` writes the manifest and the member index. Keys may
    not contain dots (WebDataset splits the member name at the first dot).
    """

    def __init__(self, out_dir, samples_per_shard: int = 1000, extra: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard = max(1, int(samples_per_shard))
        self.extra = dict(extra or {})
        self.counts: list[int] = []
        self.members: list[tuple[int, int, int, int, int]] = []
        self._tar: tarfile.TarFile | None = None
        self._closed = False

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible shards: same inputs, same bytes
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        header = self._tar.offset - start - padded  # 512 bytes (more for long names)
        return start + header, len(data)

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} may not contain '.' or '/'")
        if self._tar is None or self.counts[-1] >= self.per_shard:
            self._roll()
        jo, js = self._member(f"{key}.jpg", bytes(jpeg))
        mo, ms = self._member(f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
        self.members.append((len(self.counts) - 1, jo, js, mo, ms))
        self.counts[-1] += 1

    def _roll(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self.counts.append(0)
        self._tar = tarfile.open(self.out / shard_name(len(self.counts) - 1), "w",
                                 format=tarfile.USTAR_FORMAT)

    def close(self) -> dict:
        if self._closed:
            return self.manifest
        if self._tar is not None:
            self._tar.close()
        members = np.asarray(self.members, np.int64).reshape(-1, 5)
        np.save(self.out / MEMBERS, members)
        self.manifest = {"format": FORMAT, "version": VERSION, "num_samples": int(len(members)),
                         "shards": [{"name": shard_name(i), "num_samples": c}
                                    for i, c in enumerate(self.counts)],
                         "members": MEMBERS, **self.extra}
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST)  # the manifest appears last: its presence means complete
        self._closed = True
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------
# reading


def is_shard_dir(path) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class ShardStore:
    """Random access to the samples of a shard directory: ``jpeg(i)`` and ``meta(i)``.

    Shards are opened lazily and read with ``os.pread``, which leaves the file offset alone: forked
    DataLoader workers can share the parent's descriptors, and a pickled copy (DALI workers) opens
    its own.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a {FORMAT} directory")
        if int(self.manifest.get("version", 0)) > VERSION:
            raise ValueError(f"{self.path}: shard format version {self.manifest['version']} is newer "
                             f"than this reader ({VERSION})")
        self.members = np.load(self.path / self.manifest.get("members", MEMBERS), mmap_mode="r")
        self.names = [s["name"] for s in self.manifest["shards"]]
        counts = np.array([s["num_samples"] for s in self.manifest["shards"]], np.int64)
        self.shard_counts = counts
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.members.shape[0])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        state["members"] = None  # re-mapped in the worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.members = np.load(self.path / self.manifest.get("members", MEMBERS), mmap_mode="r")

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.path / self.names[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.path / self.names[shard]}: short read at byte {offset} "
                          f"({len(data)} of {size} bytes); was the shard truncated?")
        return data

    def jpeg(self, i: int) -> bytes:
        s, jo, js, _, _ = (int(v) for v in self.members[i])
        return self._read(s, jo, js)

    def meta(self, i: int) -> dict:
        s, _, _, mo, ms = (int(v) for v in self.members[i])
        return json.loads(self._read(s, mo, ms))

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}  # __del__ after a failed __init__ too
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        self.close()


def iter_tar(path):
    """Stream ``(key, {ext: bytes})`` groups of one tar in file order (no index needed): what an
    object-storage reader does; used to check that shards are valid WebDataset tars."""
    with tarfile.open(path, "r|") as tar:
        key, group = None, {}
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            k, _, ext = base.partition(".")
            if key is not None and k != key:
                yield key, group
                group = {}
            key = k
            group[ext] = tar.extractfile(m).read()
        if key is not None:
            yield key, group


# ------------------------------------------------------------------------------------------------
# prepared directory <-> shards

# The per-narrative arrays of the packed format (loctex.data.packed) that travel in KEY.json.
_NARR_ARRAYS = ("token_ids", "token_chars", "token_windows", "points_xy", "points_t",
                "point_segment", "point_dt")


def _pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), np.dtype(d["dtype"])).reshape(d["shape"])


def sample_to_json(narr, i: int) -> dict:
    """The packed annotations of narrative ``i`` of a :class:`~loctex.data.packed.PackedNarratives`:
    the caption and ids as text, the ragged arrays as exact little-endian bytes (base64), so that a
    shard sample carries bit-for-bit what the prepared directory holds."""
    img = narr.image_index(i)
    ids, chars, windows = narr.tokens(i)
    xy, t, seg, dt = narr.points(i)
    a = narr.arrays
    ds = int(a["narr_dataset"][i])
    arrays = dict(zip(_NARR_ARRAYS, (ids, chars, windows, xy, t, seg, dt)))
    return {"index": int(i), "caption": narr.caption(i), "image_id": narr.image_id(img),
            "dataset_id": narr.dataset_ids[ds] if ds < len(narr.dataset_ids) else "",
            "annotator_id": int(a["narr_annotator"][i]), "image_size": list(narr.image_size(img)),
            "arrays": {k: _pack_array(v) for k, v in arrays.items()}}


def write_shards_from_prepared(prepared, out_dir, samples_per_shard: int = 1000,
                               check_images: bool = True, log=print) -> dict:
    """Write the narratives of a prepared directory as tar shards (one sample per narrative; an
    image with several narratives is stored once per narrative). Images that fail
    :func:`loctex.data.jpeg.check_structure` are left out and counted in the manifest
    (``bad_images``); the tokenizer is copied beside the shards."""
    import shutil

    from loctex.data.jpeg import check_structure
    from loctex.data.packed import PackedNarratives

    narr = PackedNarratives(prepared)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    bad: dict[str, str] = {}
    writer = ShardWriter(out, samples_per_shard)
    for i in range(len(narr)):
        path = narr.image_path(narr.image_index(i))
        try:
            data = path.read_bytes()
        except OSError as exc:
            bad[str(path)] = f"unreadable: {exc}"
            continue
        reason = check_structure(data) if check_images else None
        if reason is not None:
            bad[str(path)] = reason
            continue
        writer.add(f"{i:09d}", data, sample_to_json(narr, i))
    tok = narr.tokenizer_path
    if tok.is_file():
        shutil.copyfile(tok, out / "tokenizer.json")
    writer.extra = {"source": str(Path(prepared).resolve()), "tokenizer": "tokenizer.json",
                    "dataset_ids": list(narr.dataset_ids), "bad_images": len(bad),
                    "bad_image_examples": dict(list(bad.items())[:20])}
    manifest = writer.close()
    log(f"shards: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({len(bad)} bad images left out) -> {out}")
    return manifest


class ShardNarratives:
    """A shard directory seen through the read API of :class:`~loctex.data.packed.PackedNarratives`
    (``caption``, ``tokens``, ``points``, ``image_index``, ``image_size``, ``image_id``, ...), plus
    ``image_bytes(image_index)``: the data set and both backends run on it unchanged. Sample ``i``
    is its own image (``image_index(i) == i``)."""

    def __init__(self, path):
        self.store = ShardStore(path)
        self.dir = self.store.path
        self.manifest = self.store.manifest
        self.dataset_ids = self.manifest.get("dataset_ids", [])
        self._cache: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.store)

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.manifest.get("tokenizer", "tokenizer.json")

    def _meta(self, i: int) -> dict:
        if self._cache is None or self._cache[0] != i:
            m = self.store.meta(i)
            m["arrays"] = {k: _unpack_array(v) for k, v in m["arrays"].items()}
            self._cache = (i, m)
        return self._cache[1]

    def caption(self, i: int) -> str:
        return self._meta(i)["caption"]

    def image_index(self, i: int) -> int:
        return int(i)

    def image_id(self, image_index: int) -> str:
        return self._meta(image_index)["image_id"]

    def image_size(self, image_index: int) -> tuple[int, int]:
        w, h = self._meta(image_index)["image_size"]
        return int(w), int(h)

    def image_path(self, image_index: int) -> str:
        """Not a file: ``SHARD.tar#KEY.jpg`` (for messages); read with :meth:`image_bytes`."""
        s = int(self.store.members[image_index][0])
        return f"{self.dir / self.store.names[s]}#{image_index:09d}.jpg"

    def image_bytes(self, image_index: int) -> bytes:
        return self.store.jpeg(image_index)

    def tokens(self, i: int):
        a = self._meta(i)["arrays"]
        return a["token_ids"], a["token_chars"], a["token_windows"]

    def points(self, i: int):
        a = self._meta(i)["arrays"]
        return a["points_xy"], a["points_t"], a["point_segment"], a["point_dt"]


# ------------------------------------------------------------------------------------------------
# the data set and stream over shards (the torch path; the DALI source uses the data set)


class ShardNarrativeDataset(NarrativeDataset):
    """:class:`~loctex.data.dataset.NarrativeDataset` over a shard directory: the same samples,
    decisions and annotations; images come out of the tars instead of files."""

    def __init__(self, path, cfg=None, *, train: bool = True, seed: int = 0):
        super().__init__(path, cfg, train=train, seed=seed)

    @staticmethod
    def open_narratives(prepared, image_root=None):
        return ShardNarratives(prepared)

    def image_file(self, index: int):
        return io.BytesIO(self.packed.image_bytes(self.packed.image_index(index)))


class ShardStream(torch.utils.data.IterableDataset):
    """Streams this rank's collated batches from shards: the iterable-dataset form of the torch path.

    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``: worker ``w`` builds global
    batches ``k`` with ``k % W == w`` and the DataLoader's round-robin over workers gives them back
    in order, so the stream is the sampler's order whatever ``W`` is. The position
    is a step count: ``ShardStream(..., start_step=s)`` continues exactly where a run that consumed
    ``s`` batches was (``state_dict()`` / ``load_state_dict()`` for a running stream; the loader
    counts what it handed out).
    """

    def __init__(self, dataset: ShardNarrativeDataset, sampler: TarShardBatchSampler):
        super().__init__()
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, batch in enumerate(self.sampler):
            if k % nw == wid:
                yield collate_batch([self.dataset[key] for key in batch])

    def __len__(self) -> int:
        return len(self.sampler)


class ShardLoader:
    """DataLoader over a :class:`ShardStream` with a resumable position (``position`` = batches
    handed out, counted from step 0 of epoch 0) and ``skipped`` (unreadable images replaced so far,
    summed over the workers)."""

    backend = "torch"

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool | None = None,
                 prefetch_factor: int = 4):
        self.stream, self.dataset, self.sampler = stream, stream.dataset, stream.sampler
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.position = self.sampler.start_step
        self.dataset.share_skip_counts(num_workers)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self):
        self.sampler.start_step = self.position
        kw = ({"prefetch_factor": self.prefetch_factor, "worker_init_fn": worker_init}
              if self.num_workers > 0 else {})
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None,
                                             num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, **kw)
        with stop_signals_blocked():  # the workers start here
            batches = iter(loader)
        for batch in batches:
            self.position += 1
            yield batch

    def __len__(self) -> int:
        return len(self.sampler)
