"""Input pipelines: the DALI backend against the torch path, bad images, shards, resume.

Everything runs on the CPU: the DALI pipeline in its CPU-only mode (``device_id=None``).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loctex.config import load_config
from loctex.data import jpeg
from loctex.data.augment import IMAGENET_STD
from loctex.data.loader import build_loader
from loctex.data.samplers import tar_shard_order
from loctex.data.shards import (ShardNarratives, ShardWriter, ShardStore, is_shard_dir, iter_tar,
                                write_shards_from_prepared)

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except Exception:  # noqa: BLE001
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not importable "
                                "(pip install nvidia-dali-cuda120, the [dali] extra)")

SIZE = 32      # output pixels: small keeps the CPU pipelines fast (a multiple of 32, the stride)
BATCH = 4
ANN_KEYS = ("tokens", "attention_mask", "points_xy", "point_weights", "token_ranges", "loc_mask")


def _synth_prepared(root: Path, num_images: int, seed: int, corrupt: dict | None = None,
                    check: str = "structure") -> Path:
    from loctex.data.prepare import prepare
    from loctex.synth import generate
    generate(str(root / "synth"), num_images, seed, 64, 0.0, 90)
    for name, how in (corrupt or {}).items():
        path = root / "synth" / "images" / name
        data = path.read_bytes()
        half = len(data) // 2  # inside the entropy-coded data
        path.write_bytes(data[:half] if how == "truncate"
                         else data[:half] + b"\x12\xff\x42\x00" * 64 + data[half + 256:])
    prepare([root / "synth" / "narratives_train.jsonl"], root / "synth", root / "prepared",
            log=lambda *a: None, check_images=check)
    return root / "prepared"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _synth_prepared(tmp_path_factory.mktemp("pipelines"), 24, seed=3)


def _cfg(backend: str, workers: int = 2, **extra):
    over = [f"data.backend={backend}", f"data.image_size={SIZE}", f"train.micro_batch_size={BATCH}",
            f"data.num_workers={workers}", "seed=5", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, over)


def _take(cfg, prepared, n: int, **kw) -> tuple[list[dict], object]:
    loader = build_loader(cfg, str(prepared), train=True, **kw)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    return out, loader


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two normalized image batches, measured back in [0, 1] pixel units."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mse = (((a.float().cpu() - b.float().cpu()) * std) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------
# JPEG checks


def _jpeg_bytes(seed: int = 0, size=(96, 64), progressive: bool = False) -> bytes:
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_checks(progressive):
    good = _jpeg_bytes(progressive=progressive)
    assert jpeg.jpeg_size(good) == (96, 64)
    assert jpeg.check_structure(good) is None and jpeg.check_jpeg(good) is None
    assert jpeg.check_structure(good + b"\0" * 300) is None       # bytes after EOI are ignored
    assert "truncated" in jpeg.check_structure(good[: len(good) // 2])
    garbage = good[:800] + bytes(range(256)) * 2 + good[1312:]
    assert "corrupt" in jpeg.check_structure(garbage)
    assert "SOI" in jpeg.check_structure(b"not a jpeg at all")
    # Truncated, then "repaired" with an EOI: only the trial decode sees it.
    patched = good[: len(good) // 2] + b"\xff\xd9"
    assert jpeg.check_structure(patched) is None
    assert jpeg.check_jpeg(patched) is not None


# ------------------------------------------------------------------------------------------------
# backends


def test_auto_backend_without_gpu(monkeypatch):
    from loctex.data import backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.resolve_backend("auto") == "torch"
    assert backends.resolve_backend("torch") == "torch"
    with pytest.raises(ValueError):
        backends.resolve_backend("tensorflow")


@needs_dali
def test_dali_cpu_matches_torch(prepared):
    ref, _ = _take(_cfg("torch"), prepared, 3)
    got, loader = _take(_cfg("dali"), prepared, 3)
    assert type(loader).__name__ == "DaliLoader" and loader.backend == "dali"
    assert len(got) == 3
    for a, b in zip(ref, got):
        assert set(a) == set(b)
        for k in ANN_KEYS:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert a["images"].shape == b["images"].shape == (BATCH, 3, SIZE, SIZE)
        assert b["images"].dtype == torch.float32
        assert _psnr(a["images"], b["images"]) > 30.0
    # something was actually augmented: flips and crops move points off the identity
    assert any(bool((b["points_xy"] != 0).any()) for b in got)


@needs_dali
def test_dali_resume_continues_the_same_order(prepared):
    full, _ = _take(_cfg("dali"), prepared, 4)
    resumed, _ = _take(_cfg("dali"), prepared, 2, start_step=2)
    for a, b in zip(full[2:], resumed):
        for k in ANN_KEYS:
            assert torch.equal(a[k], b[k]), k
        assert _psnr(a["images"], b["images"]) > 60.0  # same pipeline, same pixels


@needs_dali
def test_dali_ranks_shard_like_torch(prepared):
    for rank in range(2):
        a, _ = _take(_cfg("torch"), prepared, 2, rank=rank, world_size=2)
        b, _ = _take(_cfg("dali"), prepared, 2, rank=rank, world_size=2)
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["points_xy"],
                                                                          y["points_xy"])


# ------------------------------------------------------------------------------------------------
# bad images


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    # prepare with header-only checks lets the bad images into the set: the run-time guard is tested
    prepared = _synth_prepared(root, 12, seed=4, check="header",
                               corrupt={"000000000003.jpg": "truncate",
                                        "000000000007.jpg": "garbage"})
    return root, prepared


def test_prepare_flags_corrupt_images(corrupt_set, tmp_path):
    from loctex.data.prepare import prepare
    root, _ = corrupt_set
    report = prepare([root / "synth" / "narratives_train.jsonl"], root / "synth", tmp_path / "p",
                     log=lambda *a: None, check_images="structure", max_missing_fraction=1.0)
    bad = {Path(p).name: why for p, why in report["missing_image_examples"].items()}
    assert "truncated" in bad["000000000003.jpg"] and "corrupt" in bad["000000000007.jpg"]
    n_bad = sum(1 for line in (root / "synth" / "narratives_train.jsonl").read_text().splitlines()
                if json.loads(line)["image_id"] in (3, 7, "3", "7"))
    assert report["missing_images"] == n_bad


def _epoch(cfg, prepared):
    loader = build_loader(cfg, str(prepared), train=True, epochs=1)
    batches = list(loader)
    return batches, loader


@pytest.mark.parametrize("backend,workers", [("torch", 0), ("torch", 2),
                                            pytest.param("dali", 1, marks=needs_dali)])
def test_corrupt_jpeg_is_skipped_and_counted(corrupt_set, backend, workers):
    _, prepared = corrupt_set
    batches, loader = _epoch(_cfg(backend, workers=workers), prepared)
    assert len(batches) == loader.steps_per_epoch and len(batches) > 0
    for b in batches:
        assert b["images"].shape[0] == BATCH and torch.isfinite(b["images"]).all()
    assert loader.skipped >= 1
    ref, ref_loader = _epoch(_cfg("torch", workers=0), prepared)
    if backend == "torch":  # the workers' counts reach this process: the same skips as in-process
        assert loader.skipped == ref_loader.skipped
    # the same narratives replace the bad ones on every path
    for a, b in zip(ref, batches):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["token_ranges"], b["token_ranges"])


@needs_dali
def test_dali_recovers_from_a_decoder_error(corrupt_set, monkeypatch):
    """An image that passes the byte check but breaks the decoder: the pipeline is rebuilt at that
    batch without it, and the run goes on."""
    from loctex.data import dali
    _, prepared = corrupt_set
    monkeypatch.setattr(dali, "check_structure", lambda data: None)  # let everything through
    batches, loader = _epoch(_cfg("dali", workers=1), prepared)
    assert len(batches) == loader.steps_per_epoch
    assert loader.skipped >= 1


# ------------------------------------------------------------------------------------------------
# shards


def test_shards_round_trip(prepared, tmp_path):
    from loctex.data.packed import PackedNarratives
    out = tmp_path / "shards"
    manifest = write_shards_from_prepared(prepared, out, samples_per_shard=7, log=lambda *a: None)
    assert is_shard_dir(out) and manifest["bad_images"] == 0
    packed, shards = PackedNarratives(prepared), ShardNarratives(out)
    assert len(shards) == len(packed) == manifest["num_samples"]
    assert len(manifest["shards"]) == math.ceil(len(packed) / 7)
    for i in range(len(packed)):
        assert shards.caption(i) == packed.caption(i)
        for a, b in zip(packed.tokens(i) + packed.points(i), shards.tokens(i) + shards.points(i)):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
        img = packed.image_index(i)
        assert shards.image_size(i) == packed.image_size(img)
        assert shards.image_bytes(i) == packed.image_path(img).read_bytes()
    # the tars are plain WebDataset tars: KEY.jpg then KEY.json, streamable without the index
    groups = list(iter_tar(out / manifest["shards"][0]["name"]))
    assert [k for k, _ in groups] == [f"{i:09d}" for i in range(7)]
    assert all(set(g) == {"jpg", "json"} for _, g in groups)
    assert json.loads(groups[2][1]["json"])["caption"] == packed.caption(2)
    # the loader yields identical batches from the shards as from ... the shards, on both paths
    a, _ = _take(_cfg("torch"), out, 2)
    assert a[0]["images"].shape == (BATCH, 3, SIZE, SIZE)
    if HAVE_DALI:
        b, _ = _take(_cfg("dali"), out, 2)
        for x, y in zip(a, b):
            for k in ANN_KEYS:
                assert torch.equal(x[k], y[k]), k
            assert _psnr(x["images"], y["images"]) > 30.0


def test_shard_writer_rejects_dotted_keys(tmp_path):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError):
            w.add("a.b", b"x", {})
        w.add("k0", _jpeg_bytes(), {"i": 0})
    store = ShardStore(tmp_path)
    assert len(store) == 1 and store.meta(0) == {"i": 0}


def test_tar_shard_order_partitions_shards():
    counts = [7, 7, 7, 3]
    for world in (1, 2, 3):
        orders = [tar_shard_order(counts, 1, 2, r, world) for r in range(world)]
        assert {len(o) for o in orders} == {sum(counts) // world}
        flat = np.concatenate(orders)
        assert len(np.unique(flat)) == len(flat)
    # a different epoch, a different order; the same epoch, the same order
    assert not np.array_equal(tar_shard_order(counts, 1, 2, 0, 1), tar_shard_order(counts, 1, 3, 0, 1))
    assert np.array_equal(tar_shard_order(counts, 1, 2, 0, 1), tar_shard_order(counts, 1, 2, 0, 1))


def test_shard_stream_resume(prepared, tmp_path):
    out = tmp_path / "shards"
    write_shards_from_prepared(prepared, out, samples_per_shard=5, log=lambda *a: None)
    full, loader = _take(_cfg("torch", workers=2), out, 5)
    assert type(loader).__name__ == "ShardLoader"
    resumed, loader2 = _take(_cfg("torch", workers=1), out, 3, start_step=2)
    for a, b in zip(full[2:], resumed):
        for k in (*ANN_KEYS, "images"):
            assert torch.equal(a[k], b[k]), k
    assert loader2.state_dict() == {"position": 5}
    # ranks read disjoint narratives
    seen = []
    for rank in range(2):
        batches, _ = _take(_cfg("torch", workers=0), out, 2, rank=rank, world_size=2)
        seen.append({tuple(t.tolist()) for b in batches for t in b["tokens"]})
    assert seen[0] and seen[1]


def test_prepare_cli_writes_shards(tmp_path):
    from loctex.cli import main
    from loctex.synth import generate
    generate(str(tmp_path / "s"), 6, 1, 64, 0.0, 90)
    rc = main(["prepare", "--narratives", str(tmp_path / "s" / "narratives_train.jsonl"),
               "--images", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--format", "shards",
               "--samples-per-shard", "4"])
    assert rc == 0
    assert is_shard_dir(tmp_path / "p" / "shards")
    assert (tmp_path / "p" / "shards" / "tokenizer.json").is_file()
    shutil.rmtree(tmp_path / "p")
