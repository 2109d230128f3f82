"""The loader layer: one sampler contract for every path, one entry (``build_loader``), modules
without an import circle, ``batch["index"]`` naming the narrative actually loaded (also after a bad
image was replaced), and loader workers that survive a scheduler's SIGTERM/SIGINT."""
from __future__ import annotations

import ast
import dataclasses
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loctex.config import load_config
from loctex.data import jpeg
from loctex.data.loader import build_loader
from loctex.data.packed import PackedNarratives
from loctex.data.samplers import (EpochBatchSampler, RankBatchSampler, TarShardBatchSampler,
                                  tar_shard_order)
from loctex.data.shards import ShardNarratives, write_shards_from_prepared
from loctex.data.tokenizer import CLS_ID, SEP_ID

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except Exception:  # noqa: BLE001
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not importable")

DATA_DIR = Path(__file__).resolve().parents[1] / "loctex" / "data"
SIZE, BATCH = 32, 4


# ------------------------------------------------------------------------------------------------
# samplers and modules


def test_every_sampler_is_one_contract():
    rank = RankBatchSampler(23, 3, rank=1, world_size=2, seed=4, epochs=2)
    shard = TarShardBatchSampler([7, 7, 5, 4], 3, rank=1, world_size=2, seed=4, epochs=2)
    for s in (rank, shard):
        assert isinstance(s, EpochBatchSampler)
        assert "__iter__" not in type(s).__dict__ and "__len__" not in type(s).__dict__
        expect = [[(int(i), e) for i in s.batch(e, k)] for e in range(2)
                  for k in range(s.steps_per_epoch)]
        assert list(s) == expect and len(s) == len(expect)
    # the map-style order: rank 1's slice of each global batch of the seeded permutation
    perm = np.random.default_rng([4, 1]).permutation(23)
    assert np.array_equal(rank.batch(1, 2), perm[2 * 6 + 3:2 * 6 + 6])
    assert rank.steps_per_epoch == 23 // 6
    # the tar-shard order: this rank's shards, cut into batches
    order = tar_shard_order([7, 7, 5, 4], 4, 1, 1, 2)
    assert np.array_equal(shard.batch(1, 2), order[6:9]) and shard.steps_per_epoch == 11 // 3
    # resuming at a global step continues the same stream
    resumed = RankBatchSampler(23, 3, rank=1, world_size=2, seed=4, epochs=2, start_step=4)
    assert list(resumed) == list(rank)[4:]


def _data_imports(path: Path) -> set[str]:
    """The ``loctex.data`` modules a module imports, anywhere in it (top level or in functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "loctex.data":
                found |= {a.name for a in node.names}
            elif node.module.startswith("loctex.data."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names
                      if a.name.startswith("loctex.data.")}
    return found


def test_data_modules_import_without_a_circle():
    graph = {p.stem: _data_imports(p) - {p.stem} for p in DATA_DIR.glob("*.py")}
    assert {"loader", "backends", "shards", "dali", "samplers"} <= set(graph)
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # the library's data layer stays below the engine
    for p in DATA_DIR.glob("*.py"):
        assert "loctex.engine" not in p.read_text(), p


# ------------------------------------------------------------------------------------------------
# a prepared set with damaged images


def _lenient_only(data: bytes, seed: int = 0) -> bytes:
    """The JPEG with noise in the middle of its scan: well-formed bytes (no stray marker, EOI at
    the end) that a lenient decoder paints with a warning and a strict one refuses."""
    scan = jpeg._walk(data)[2]
    mid = scan + (len(data) - scan) // 2
    noise = np.random.default_rng(seed).integers(0, 255, 120, dtype=np.uint8)
    noise[noise == 0xFF] = 0x12
    out = data[:mid] + noise.tobytes() + data[mid + 120:]
    assert jpeg.check_structure(out) is None
    with pytest.raises(jpeg.BadImage):
        jpeg.decode_strict(out)
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A prepared set (and its tar shards) in which one image is missing, one truncated and one
    decodes only leniently; the set was prepared before the damage, so the loaders meet it at run
    time. Returns the image rows each backend finds bad: DALI checks bytes, not the decode, so it
    takes the lenient one (see loctex.data.dali)."""
    from loctex.data.prepare import prepare
    from loctex.synth import generate
    root = tmp_path_factory.mktemp("damaged")
    generate(str(root / "synth"), 16, 2, 48, 0.0, 90)
    prepared = root / "prepared"
    prepare([root / "synth" / "narratives_train.jsonl"], root / "synth", prepared,
            log=lambda *a: None)
    packed = PackedNarratives(prepared)
    images = root / "synth" / "images"
    lenient, missing = images / "000000000005.jpg", images / "000000000011.jpg"
    truncated = images / "000000000012.jpg"
    lenient.write_bytes(_lenient_only(lenient.read_bytes()))
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing.unlink()
    # the shards leave the missing image out and take the lenient one (its bytes look fine)
    shards = root / "shards"
    write_shards_from_prepared(prepared, shards, samples_per_shard=6, check_images=False,
                               log=lambda *a: None)
    rows = {int(packed.image_id(i)): i for i in range(packed.arrays["image_sizes"].shape[0])}
    bad_rows = {"torch": {rows[5], rows[12], rows[11]}, "dali": {rows[12], rows[11]}}
    return prepared, shards, bad_rows


def _cfg(backend: str, workers: int):
    return load_config(None, [f"data.backend={backend}", f"data.image_size={SIZE}",
                              f"train.micro_batch_size={BATCH}", f"data.num_workers={workers}",
                              "seed=3", "data.flip_prob=0"])  # no flip: tokens as prepared


@pytest.mark.parametrize("backend,workers,source", [
    ("torch", 0, "packed"), ("torch", 2, "packed"), ("torch", 2, "shards"),
    pytest.param("dali", 1, "packed", marks=needs_dali),
    pytest.param("dali", 1, "shards", marks=needs_dali)])
def test_index_names_the_narrative_loaded(damaged, backend, workers, source):
    prepared, shards, bad_rows = damaged
    bad_rows = bad_rows[backend]
    packed = PackedNarratives(prepared)
    path = prepared if source == "packed" else shards
    loader = build_loader(_cfg(backend, workers), str(path), train=True, epochs=2)
    planned = [i for batch in loader.sampler for i, _ in batch]
    batches = list(loader)
    assert len(batches) == 2 * loader.steps_per_epoch
    got = torch.cat([b["index"] for b in batches])
    assert got.dtype == torch.int64 and all(b["index"].shape == (BATCH,) for b in batches)

    # narrative of the packed set behind each index of the loader's data set
    narr = (lambda i: i) if source == "packed" else \
        (lambda i: ShardNarratives(shards).store.meta(i)["index"])
    n = len(loader.dataset)

    def loaded(i):  # the first candidate whose image is good
        for c in range(i, i + 16):
            if packed.image_index(narr(c % n)) not in bad_rows:
                return c % n

    expect = [loaded(i) for i in planned]
    assert got.tolist() == expect
    assert expect != planned  # a bad image was met, and replaced
    assert loader.skipped == sum((e - p) % n for e, p in zip(expect, planned))
    # each row holds the narrative its index names: tokens, points
    for b in batches:
        for row, i in enumerate(b["index"].tolist()):
            ids = packed.tokens(narr(i))[0][:loader.dataset.cfg.max_tokens - 2]
            L = len(ids) + 2
            assert b["tokens"][row, :L].tolist() == [CLS_ID, *ids.tolist(), SEP_ID]
            assert not b["attention_mask"][row, L:].any()
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def test_build_loader_builds_one_sampler(damaged, monkeypatch):
    prepared, shards, _ = damaged
    made = []
    original = EpochBatchSampler.__init__

    def counting(self, *a, **kw):
        made.append(type(self).__name__)
        original(self, *a, **kw)

    monkeypatch.setattr(EpochBatchSampler, "__init__", counting)
    build_loader(_cfg("torch", 0), str(prepared))
    build_loader(_cfg("torch", 0), str(shards))
    assert made == ["RankBatchSampler", "TarShardBatchSampler"]


def test_non_image_errors_are_not_unreadable_images(damaged, monkeypatch):
    """A bad crop size or a bug propagates with its own message at once; it is not counted as an
    unreadable image nor retried on the next narratives."""
    from loctex.data import augment
    from loctex.data.dataset import NarrativeDataset
    prepared = damaged[0]
    cfg = dataclasses.replace(_cfg("torch", 0).data, image_size=0)  # past load-time validation
    ds = NarrativeDataset(prepared, cfg, train=True, seed=0)
    with pytest.raises(ValueError) as err:
        ds[0]
    assert "unreadable" not in str(err.value) and ds.skipped == 0
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise TypeError("a bug in the crop")

    monkeypatch.setattr(augment, "apply_to_image", broken)
    ds = NarrativeDataset(prepared, _cfg("torch", 0).data, train=True, seed=0)
    with pytest.raises(TypeError, match="a bug in the crop"):
        ds[0]
    assert len(calls) == 1 and ds.skipped == 0


def test_lenient_only_jpeg_is_an_unreadable_image(damaged):
    from loctex.data.dataset import NarrativeDataset
    prepared, _, bad_rows = damaged
    bad_rows = bad_rows["torch"]
    ds = NarrativeDataset(prepared, _cfg("torch", 0).data, train=False)
    lenient = next(i for i in range(len(ds)) if ds.packed.image_id(ds.packed.image_index(i))
                   in ("5", "000000000005"))
    good = next(i for i in range(lenient, len(ds)) if ds.packed.image_index(i) not in bad_rows)
    sample = ds[lenient]
    assert sample["index"] == good and ds.skipped == good - lenient
    # the prepare-time check at --check-images decode refuses it too; structure alone does not
    data = ds.packed.image_path(ds.packed.image_index(lenient)).read_bytes()
    assert "Corrupt JPEG data" in jpeg.check_image_bytes(data, "decode")
    assert jpeg.check_image_bytes(data, "structure") is None


# ------------------------------------------------------------------------------------------------
# stop signals


def _worker_pids() -> list[int]:
    """Live children of this process that run this program (forked loader workers)."""
    me = os.getpid()
    with open(f"/proc/{me}/cmdline", "rb") as f:
        cmdline = f.read()
    pids = []
    for task in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == cmdline:
                    out.append(pid)
        except OSError:
            pass
    return out


def _ann(batch):
    return [batch[k] for k in ("tokens", "points_xy", "token_ranges", "index")]


@pytest.mark.parametrize("backend,source", [
    ("torch", "packed"), ("torch", "shards"), pytest.param("dali", "packed", marks=needs_dali)])
def test_loader_workers_ignore_stop_signals(damaged, backend, source):
    prepared, shards, _ = damaged
    path = str(prepared if source == "packed" else shards)
    reference = list(build_loader(_cfg(backend, 2), path, train=True, epochs=2))
    loader = build_loader(_cfg(backend, 2), path, train=True, epochs=2)
    it = iter(loader)
    got = [next(it)]
    pids = _worker_pids()
    assert len(pids) >= 2, pids
    # from another process, as a scheduler sends them (a worker obeys its parent's SIGTERM)
    for sig in ("TERM", "INT"):
        subprocess.run(["kill", "-s", sig, *map(str, pids)], check=True)
    time.sleep(0.5)
    got.append(next(it))
    for pid in pids:
        os.kill(pid, 0)  # still alive (raises ProcessLookupError otherwise)
    got += list(it)
    assert len(got) == len(reference)
    for a, b in zip(reference, got):
        for x, y in zip(_ann(a), _ann(b)):
            assert torch.equal(x, y)
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def test_sigterm_to_the_process_group_leaves_the_loader_running(damaged):
    """What a scheduler does: SIGTERM and SIGINT to every process of the job, from outside it (here
    a ``kill`` process). The main process handles them (here: counts them); the DataLoader keeps
    yielding, no worker is killed."""
    script = textwrap.dedent(f"""
        import os, signal, subprocess, time
        from loctex.config import load_config
        from loctex.data.loader import build_loader
        got = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: got.append(s))
        cfg = load_config(None, ["data.image_size=32", "train.micro_batch_size=4",
                                 "data.num_workers=2", "data.backend=torch"])
        it = iter(build_loader(cfg, {str(damaged[0])!r}, train=True, epochs=3))
        n = len([next(it), next(it)])
        for sig in ("TERM", "INT"):
            subprocess.run(["kill", "-s", sig, "--", f"-{{os.getpgid(0)}}"])
        time.sleep(0.5)
        n += len(list(it))
        print("batches", n, "signals", sorted(got))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, start_new_session=True, cwd=str(DATA_DIR.parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killed by signal" not in proc.stderr
    steps = PackedNarratives(damaged[0]).arrays["narr_image"].shape[0] // 4
    assert f"batches {3 * steps} signals [2, 15]" in proc.stdout, proc.stdout
