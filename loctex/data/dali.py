"""The DALI backend (``data.backend: dali``): the same samples as the torch path, pixels on the GPU.

One sample source, two backends. :class:`DaliSampleSource` is a stateless callable that DALI's
parallel ``external_source`` runs in Python worker processes, one call per sample. For sample ``j``
of iteration ``k`` it takes the narrative index and epoch from the torch path's own batch sampler
(:meth:`~loctex.data.samplers.EpochBatchSampler.batch`: same order, same per-rank sharding, same
resume point), the decision from :func:`loctex.data.augment.sample_decision` (crop box, flip,
jitter factors), and the tokens / traces / token ranges from
:meth:`NarrativeDataset.annotations <loctex.data.dataset.NarrativeDataset.annotations>` - the very
code the torch path runs - and hands DALI the *encoded* JPEG bytes plus the decision as small
arrays. The annotations ride through the pipeline untouched and are collated with
:func:`loctex.data.collate.collate_batch`, so tokens, token ranges and traces are bit-identical
between backends; only the pixels come from another implementation.

The graph mirrors :func:`augment.apply_to_image`, :func:`augment.color_jitter_` and
:func:`augment.normalize_`:

1. ``decoders.image_slice`` (``device="mixed"`` on a GPU: nvJPEG / the hardware decoder; ``"cpu"``
   without one) decodes only the integer pixel window that contains the crop box (ROI decode);
2. ``resize`` to S x S with a sub-pixel ``roi_start``/``roi_end`` inside that window, linear with
   antialiasing - PIL's ``resize(box=...)`` with ``BILINEAR``;
3. brightness, contrast (around the mean gray of the image, torchvision's formula) and saturation
   on [0, 1] floats, clamped after each, in that fixed order (arithmetic ops + a per-sample mean);
4. ``crop_mirror_normalize``: the flip (jitter does not care where pixels are) and ImageNet
   mean/std, CHW float32.

Bad images (DESIGN §2.2). The source runs :func:`loctex.data.jpeg.check_structure` on the bytes
(no decode, tens of µs) and, like the torch data set, replaces a missing or malformed image by the
next narrative (:meth:`NarrativeDataset.candidates <loctex.data.dataset.NarrativeDataset.candidates>`),
counting the skip; the decoder therefore never sees them, and the batch's ``index`` names the
narrative loaded. Should a decode still fail inside DALI, the loader trial-decodes that batch's
images on the CPU, adds the culprits to the skip list, rebuilds the pipeline at the same batch and
goes on: a bad image never ends a run. A scan whose bytes are well formed but whose data is corrupt
is caught by the torch path's strict decode, not by the byte check: DALI's decoder may paint it.

The Python feeder workers start with SIGTERM/SIGINT blocked and filter them from their first sample
on (:mod:`loctex.data.workers`): a scheduler's signal to the process group stops the rank, not its
workers.

CPU-only mode (``device_id=None``, every operator on the CPU) is what the tests run; it needs no
GPU and no CUDA driver.
"""
from __future__ import annotations

import io
import logging
import math
import os
from collections import Counter

import numpy as np
import torch

from loctex.data import augment as G
from loctex.data.collate import collate_batch
from loctex.data.jpeg import check_jpeg, check_structure
from loctex.data.workers import filter_stop_signals, stop_signals_blocked

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return False
    return True


def _placeholder_jpeg() -> np.ndarray:
    """A valid 8x8 gray JPEG fed in place of an image when every candidate was bad."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8)


# ------------------------------------------------------------------------------------------------
# the sample source (runs in DALI's Python workers)


class DaliSampleSource:
    """``source(SampleInfo) -> tuple of arrays`` for a parallel ``external_source``.

    Stateless apart from caches: the sample is a function of (iteration, index in batch) through the
    sampler's order, so any number of workers and a restart at ``start_step`` give the same stream.
    Outputs, in order: ``OUTPUTS``.
    """

    OUTPUTS = ("jpeg", "window_anchor", "window_shape", "roi_start", "roi_end", "mirror",
               "jitter", "tokens", "points_xy", "point_weights", "token_ranges", "loc_mask",
               "index", "skipped")

    def __init__(self, dataset, sampler, total_steps: int | None, skip: frozenset = frozenset()):
        self.dataset = dataset          # NarrativeDataset (or a subclass, e.g. over shards)
        self.sampler = sampler          # an EpochBatchSampler: batch(epoch, k), start_step
        self.total_steps = total_steps  # None: infinite
        self.skip = frozenset(skip)     # narratives whose image failed inside DALI before
        self.offset = 0                 # batches produced by the pipelines this one replaces
        self._placeholder = None
        self._loader_pid = os.getpid()  # calls from another process come from a DALI worker

    def __getstate__(self):
        # Spawned workers get a recipe, not the data set: pickling its memory maps would copy them.
        state = dict(self.__dict__)
        ds = self.dataset
        state["dataset"] = None
        state["_dataset_spec"] = (type(ds), str(ds.packed.dir), ds.cfg, ds.train, ds.seed,
                                  getattr(ds.packed, "image_root", None))
        state["_placeholder"] = None
        return state

    def __setstate__(self, state):
        spec = state.pop("_dataset_spec", None)
        self.__dict__.update(state)
        if spec is not None:
            cls, path, cfg, train, seed, image_root = spec
            kw = {"image_root": str(image_root)} if image_root is not None and \
                "image_root" in cls.__init__.__code__.co_varnames else {}
            self.dataset = cls(path, cfg, train=train, seed=seed, **kw)

    # -- which narrative -------------------------------------------------------------------------
    def position(self, iteration: int, idx_in_batch: int) -> tuple[int, int] | None:
        """(narrative index, epoch) of sample ``idx_in_batch`` of loader batch ``iteration``
        (counted from the sampler's ``start_step`` plus ``offset``)."""
        s = self.sampler
        iteration += self.offset
        if self.total_steps is not None and iteration >= self.total_steps:
            return None
        epoch, k = s.position(s.start_step + iteration)
        return int(s.batch(epoch, k)[idx_in_batch]), epoch

    def _image_bytes(self, i: int):
        packed = self.dataset.packed
        img = packed.image_index(i)
        reader = getattr(packed, "image_bytes", None)
        if reader is not None:
            data = reader(img)
        else:
            with open(packed.image_path(img), "rb") as f:
                data = f.read()
        return data

    # -- one sample ------------------------------------------------------------------------------
    def sample(self, index: int, epoch: int) -> tuple:
        ds = self.dataset
        n = len(ds)
        skipped = 0
        for candidate in ds.candidates(index):
            i = candidate % n
            if i in self.skip:
                skipped += 1
                continue
            try:
                data = self._image_bytes(i)
            except OSError:
                skipped += 1
                continue
            if check_structure(data) is not None:
                skipped += 1
                continue
            d = ds.decision(i, epoch)
            W, H = ds.packed.image_size(ds.packed.image_index(i))
            return self._pack(np.frombuffer(data, np.uint8), d, W, H, ds.annotations(i, d), i,
                              skipped)
        # Every candidate was bad: the torch data set raises here; a DALI worker must not, so feed a
        # placeholder and let the loader raise the same error in the main process.
        if self._placeholder is None:
            self._placeholder = _placeholder_jpeg()
        ann = ds.annotations(index, G.IDENTITY)
        # index -1 - index: no narrative loaded, and which sample gave up
        return self._pack(self._placeholder, G.IDENTITY, 8, 8, ann, -1 - index, skipped)

    @staticmethod
    def _pack(data, d: G.Decision, W: int, H: int, ann: dict, index: int, skipped: int) -> tuple:
        # The crop box in source pixels (continuous, as PIL's resize(box=...)), the integer window
        # holding it (what is decoded), and the box relative to that window (what is resampled).
        bx0, by0, bx1, by1 = G.crop_box_pixels(d, W, H)
        wx0, wy0 = max(0, math.floor(bx0)), max(0, math.floor(by0))
        wx1, wy1 = min(W, max(wx0 + 1, math.ceil(bx1))), min(H, max(wy0 + 1, math.ceil(by1)))
        f32 = np.float32
        return (data,
                np.array([wx0, wy0], np.int32), np.array([wx1 - wx0, wy1 - wy0], np.int32),
                np.array([by0 - wy0, bx0 - wx0], f32), np.array([by1 - wy0, bx1 - wx0], f32),
                np.array(1 if d.flip else 0, np.int32),
                np.array([d.brightness, d.contrast, d.saturation], f32),
                np.ascontiguousarray(ann["tokens"], np.int64),
                np.ascontiguousarray(ann["points_xy"], f32).reshape(-1, 2),
                np.ascontiguousarray(ann["point_weights"], f32).reshape(-1),
                np.ascontiguousarray(ann["token_ranges"], np.int32).reshape(-1, 2),
                np.ascontiguousarray(ann["loc_mask"], np.bool_),
                np.array(index, np.int64), np.array(skipped, np.int32))

    def __call__(self, info):
        if os.getpid() != self._loader_pid:
            filter_stop_signals()
        pos = self.position(info.iteration, info.idx_in_batch)
        if pos is None:
            raise StopIteration
        return self.sample(*pos)


# ------------------------------------------------------------------------------------------------
# the pipeline


def build_pipeline(source: DaliSampleSource, batch_size: int, image_size: int,
                   device_id: int | None, num_threads: int = 2, py_workers: int = 2,
                   prefetch: int = 2, start_method: str | None = None, seed: int = 0):
    """The DALI pipeline over ``source``. ``device_id=None``: CPU only."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    if start_method is None:
        # fork is quick, but a process that already holds a CUDA context must not fork
        start_method = "spawn" if gpu or (torch.cuda.is_available()
                                          and torch.cuda.is_initialized()) else "fork"
    S = int(image_size)
    T = types
    dtypes = [T.UINT8, T.INT32, T.INT32, T.FLOAT, T.FLOAT, T.INT32, T.FLOAT, T.INT64, T.FLOAT,
              T.FLOAT, T.INT32, T.BOOL, T.INT64, T.INT32]
    ndims = [1, 1, 1, 1, 1, 0, 1, 1, 2, 1, 2, 1, 0, 0]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  py_num_workers=py_workers, py_start_method=start_method,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipe():
        (jpeg, anchor, shape, roi_start, roi_end, mirror, jitter, tokens, points, weights,
         ranges, loc, index, skipped) = fn.external_source(
            source, num_outputs=len(DaliSampleSource.OUTPUTS), parallel=True, batch=False,
            dtype=dtypes, ndim=ndims, prefetch_queue_depth=prefetch)
        img = fn.decoders.image_slice(
            jpeg, anchor, shape, device="mixed" if gpu else "cpu", axis_names="WH",
            output_type=T.RGB, adjust_orientation=False,  # PIL ignores EXIF orientation too
            jpeg_fancy_upsampling=True)                   # libjpeg's (and PIL's) chroma upsampling
        img = fn.resize(img, size=[S, S], roi_start=roi_start, roi_end=roi_end,
                        interp_type=T.INTERP_LINEAR, antialias=True, dtype=T.FLOAT)
        x = img * (1.0 / 255.0)
        if gpu:
            jitter = jitter.gpu()
        b, c, s = jitter[0], jitter[1], jitter[2]
        x = dmath.clamp(x * b, 0.0, 1.0)
        mean_gray = fn.reductions.mean(_gray(x))
        x = dmath.clamp(x * c + (1.0 - c) * mean_gray, 0.0, 1.0)
        gray = fn.expand_dims(_gray(x), axes=[2], new_axis_names="C")
        x = dmath.clamp(x * s + (1.0 - s) * gray, 0.0, 1.0)
        x = fn.crop_mirror_normalize(x, mirror=mirror, mean=list(G.IMAGENET_MEAN),
                                     std=list(G.IMAGENET_STD), output_layout="CHW",
                                     dtype=T.FLOAT)
        return x, tokens, points, weights, ranges, loc, index, skipped

    return pipe()


def _gray(x):
    return x[:, :, 0] * 0.299 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114


# ------------------------------------------------------------------------------------------------
# the loader


class DaliLoader:
    """Iterable of DESIGN §2.4 batches from a DALI pipeline; the drop-in for the torch path's
    :class:`~loctex.data.loader.NarrativeLoader` (``steps_per_epoch``, ``dataset``, ``sampler``,
    ``len()``), plus ``skipped`` (bad images replaced so far) and ``close()``.

    ``device_id=None`` runs the CPU-only pipeline; images then come back as CPU tensors, otherwise
    as CUDA tensors on ``device_id`` (the other keys are CPU tensors, as on the torch path).
    """

    backend = "dali"

    def __init__(self, dataset, sampler, image_size: int, num_workers: int = 2,
                 device_id: int | None = None, num_threads: int | None = None,
                 prefetch: int = 2):
        self.dataset, self.sampler = dataset, sampler
        self.steps_per_epoch = sampler.steps_per_epoch
        self.image_size = int(image_size)
        self.device_id = device_id
        self.py_workers = max(1, int(num_workers))
        self.num_threads = max(1, int(num_threads or num_workers or 1))
        self.prefetch = prefetch
        self.skipped = 0
        self.bad_images: Counter = Counter()  # narrative index -> times its image was skipped
        self._skip: set[int] = set()
        self._pipe = None
        try:
            self.total_steps = len(sampler)
        except TypeError:
            self.total_steps = None

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an infinite loader has no length; see steps_per_epoch")
        return self.total_steps

    def _start(self, offset: int):
        self.close()
        source = DaliSampleSource(self.dataset, self.sampler, self.total_steps, frozenset(self._skip))
        source.offset = offset
        with stop_signals_blocked():  # the Python workers start here
            pipe = build_pipeline(source, self.sampler.batch_size, self.image_size,
                                  self.device_id, self.num_threads, self.py_workers, self.prefetch,
                                  seed=self.sampler.seed)
            pipe.build()
        self._pipe = pipe
        return pipe

    def _to_torch_images(self, tl) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(tl.as_array(), copy=True))
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out

    def _batch(self, outs) -> dict:
        images, tokens, points, weights, ranges, loc, index, skipped = outs
        images = self._to_torch_images(images)
        samples = []
        for j in range(len(tokens)):
            i = int(np.asarray(index.at(j)))
            if i < 0:
                raise self.dataset.give_up(-1 - i)
            n_skip = int(np.asarray(skipped.at(j)))
            if n_skip:
                self.skipped += n_skip
                self.bad_images[i] += n_skip
                log.warning("skipped %d unreadable image(s) before narrative %d", n_skip, i)
            samples.append({"image": images[j], "tokens": np.array(tokens.at(j)),
                            "points_xy": np.array(points.at(j)),
                            "point_weights": np.array(weights.at(j)),
                            "token_ranges": np.array(ranges.at(j)),
                            "loc_mask": np.array(loc.at(j)), "index": i})
        return collate_batch(samples)

    def _find_culprits(self, produced: int) -> set[int]:
        """Narratives of batch ``produced`` (and the next prefetched ones) whose images fail a
        strict trial decode."""
        source = DaliSampleSource(self.dataset, self.sampler, self.total_steps)
        bad = set()
        for it in range(produced, produced + self.prefetch + 1):
            for j in range(self.sampler.batch_size):
                pos = source.position(it, j)
                if pos is None:
                    break
                for candidate in self.dataset.candidates(pos[0]):
                    i = candidate % len(self.dataset)
                    try:
                        data = source._image_bytes(i)
                    except OSError:
                        continue
                    if check_jpeg(data) is None:
                        break
                    bad.add(i)
        return bad - self._skip

    def __iter__(self):
        produced = 0
        pipe = self._start(0)
        try:
            while self.total_steps is None or produced < self.total_steps:
                try:
                    outs = pipe.run()
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - a decoder error must not end the run
                    culprits = self._find_culprits(produced)
                    if not culprits:
                        raise
                    log.warning("DALI failed on batch %d (%s); skipping narratives %s and "
                                "restarting the pipeline there", produced, str(exc)[:200],
                                sorted(culprits))
                    self._skip |= culprits
                    pipe = self._start(produced)
                    continue
                batch = self._batch(outs)
                produced += 1
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        """Stop the pipeline and its Python workers (idempotent)."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        pool = getattr(pipe, "_py_pool", None)
        shutdown = getattr(pipe, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        if pool is not None:
            pool.close()
        del pipe

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
