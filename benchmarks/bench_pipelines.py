"""Input-pipeline throughput: samples/s and CPU utilisation of a loader backend.

    python benchmarks/bench_pipelines.py --backend torch|dali [--prepared DIR | --embedded N |
                                --images DIR | --synthetic-640x480 N]
                                [--image-size 224] [--batch-size 64] [--workers 2] [--batches 30]

Data sets: ``--prepared`` an existing prepared (or shard) directory; ``--embedded N`` the embedded
data set (``loctex synth``, 128 px images) with N images; ``--synthetic-640x480 N`` the same
narratives with their images replaced by N 640x480 photo-like JPEGs (COCO-like sizes, ~110 KB);
``--images DIR`` every JPEG under DIR with a generic narrative each (to measure real photos).
The last three are built in a temporary directory (``--keep DIR`` keeps them).

The loader is the real one (``loctex.data.loader.build_loader`` with ``data.backend``), so the figure
includes tokens, traces and collation. After ``--warmup`` batches, ``--batches`` batches are timed;
CPU utilisation is this process tree's CPU time (user+system, workers included) over wall time, in
cores, and the machine's load average is printed beside it because the machine may be shared.
Prints one JSON line per run (``--json FILE`` appends it to FILE as well).
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------------------------
# data sets


def photo_like_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480,
                    quality: int = 92) -> bytes:
    """A JPEG whose size and decode cost resemble a COCO photo: a smooth colour field, a
    mid-frequency texture, sensor noise and a few solid shapes."""
    from PIL import Image, ImageDraw

    small = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    tex = (rng.random((height // 4, width // 4)) * 255).astype(np.uint8)
    tex = np.asarray(Image.fromarray(tex).resize((width, height), Image.BILINEAR), np.float32)
    img = base * 0.8 + (tex[..., None] - 128.0) * 0.35 + rng.normal(0, 9, (height, width, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        x1, y1 = x0 + int(rng.integers(30, 250)), y0 + int(rng.integers(30, 200))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _prepare(narratives: Path, images: Path, out: Path, template: str | None = None) -> Path:
    from loctex.data.prepare import prepare
    prepare([narratives], images, out, image_template=template, log=lambda *a: None)
    return out


def make_embedded(root: Path, num_images: int, seed: int = 0) -> Path:
    from loctex.synth import generate
    generate(str(root / "synth"), num_images, seed, 128, 0.0, 90)
    return _prepare(root / "synth" / "narratives_train.jsonl", root / "synth",
                    root / "prepared")


def make_synthetic_640x480(root: Path, num_images: int, seed: int = 0, unique: int = 64) -> Path:
    """The embedded narratives over 640x480 photo-like JPEGs. ``unique`` distinct images are
    generated (each ~80 ms) and repeated under the other names: decode cost does not depend on
    which picture it is, and the set builds in seconds."""
    from loctex.synth import generate
    generate(str(root / "synth"), num_images, seed, 128, 0.0, 90)
    rng = np.random.default_rng(seed)
    pool = [photo_like_jpeg(rng) for _ in range(min(unique, num_images))]
    img_dir = root / "synth" / "images"
    for k, path in enumerate(sorted(img_dir.glob("*.jpg"))):
        path.write_bytes(pool[k % len(pool)])
    return _prepare(root / "synth" / "narratives_train.jsonl", root / "synth",
                    root / "prepared")


def make_from_images(root: Path, images: Path) -> Path:
    """A generic narrative (a caption with left/right, a trace sweeping the image) per JPEG."""
    files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files under {images}")
    words = "in this image we can see an object on the left and another one on the right".split()
    lines = []
    for k, p in enumerate(files):
        t = np.linspace(0.0, 0.4 * len(words), 60)
        xs, ys = np.linspace(0.1, 0.9, 60), 0.5 + 0.2 * np.sin(np.linspace(0, 6, 60))
        lines.append(json.dumps({
            "dataset_id": "bench", "image_id": str(p.relative_to(images).with_suffix("")),
            "annotator_id": 0, "caption": " ".join(words),
            "timed_caption": [{"utterance": w, "start_time": 0.4 * j, "end_time": 0.4 * j + 0.3}
                              for j, w in enumerate(words)],
            "traces": [[{"x": float(x), "y": float(y), "t": float(tt)}
                        for x, y, tt in zip(xs, ys, t)]],
            "voice_recording": ""}))
    nfile = root / "narratives.jsonl"
    nfile.write_text("\n".join(lines) + "\n")
    suffixes = {p.suffix for p in files}
    template = "{image_id}" + (suffixes.pop() if len(suffixes) == 1 else ".jpg")
    return _prepare(nfile, Path(images), root / "prepared", template)


# ------------------------------------------------------------------------------------------------
# measuring


def _tree_cpu_seconds() -> float:
    """User+system CPU seconds of this process and its live children (loader workers)."""
    import psutil
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def measure(loader, batches: int, warmup: int) -> dict:
    """Iterate an (infinite) loader for ``warmup`` + ``batches`` batches; time the last
    ``batches``: wall time, samples/s, and CPU seconds of the process tree per wall second."""
    samples = 0
    t0 = c0 = c1 = None
    it = iter(loader)
    for done in range(warmup + batches):
        if done == warmup:
            t0, c0 = time.perf_counter(), _tree_cpu_seconds()
        batch = next(it)
        if done >= warmup:
            samples += int(batch["images"].shape[0])
    wall = time.perf_counter() - t0
    c1 = _tree_cpu_seconds()  # before the workers shut down
    skipped = int(getattr(loader, "skipped", 0) or 0)
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    del it
    return {"samples": samples, "seconds": round(wall, 3),
            "samples_per_s": round(samples / wall, 1),
            "cpu_cores_used": round((c1 - c0) / wall, 2),
            # load-independent-ish: what one fully used core delivers (contention inflates CPU
            # time too, so this is a lower bound on an idle machine)
            "samples_per_cpu_s": round(samples / max(c1 - c0, 1e-9), 1), "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_pipelines.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "dali", "auto"], default="torch")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prepared", help="an existing prepared or shard directory")
    src.add_argument("--embedded", type=int, metavar="N", help="embedded data set of N images")
    src.add_argument("--images", help="a directory of JPEGs (one generic narrative each)")
    src.add_argument("--synthetic-640x480", type=int, metavar="N", dest="synthetic",
                     help="N photo-like 640x480 JPEGs")
    ap.add_argument("--shards", action="store_true", help="read the set through tar shards")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="loader workers (torch) / Python "
                    "workers and threads (dali)")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="build the data set here and keep it")
    ap.add_argument("--json", help="append the result line to this file")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from loctex.config import load_config

    tmp = None
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="loctex-bench-")
        root = Path(tmp.name)
    t0 = time.perf_counter()
    if args.prepared:
        prepared, name = Path(args.prepared), f"prepared:{args.prepared}"
    elif args.images:
        prepared, name = make_from_images(root, Path(args.images)), f"images:{args.images}"
    elif args.synthetic:
        prepared, name = make_synthetic_640x480(root, args.synthetic, args.seed), \
            f"synthetic-640x480:{args.synthetic}"
    else:
        n = args.embedded or 1000
        prepared, name = make_embedded(root, n, args.seed), f"embedded:{n}"
    if args.shards:
        from loctex.data.shards import is_shard_dir, write_shards_from_prepared
        if not is_shard_dir(prepared):
            prepared = Path(write_shards_from_prepared(prepared, root / "shards",
                                                       log=lambda *a: None) and root / "shards")
    build_s = time.perf_counter() - t0

    cfg = load_config(None, [f"data.backend={args.backend}", f"data.image_size={args.image_size}",
                             f"data.num_workers={args.workers}",
                             f"train.micro_batch_size={args.batch_size}", f"seed={args.seed}",
                             f"data.prepared={prepared}", *args.overrides])
    from loctex.data.loader import build_loader

    load_before = os.getloadavg()[0]
    loader = build_loader(cfg, str(prepared), train=True, rank=0, world_size=1)
    backend = getattr(loader, "backend", "torch")
    result = measure(loader, args.batches, args.warmup)
    # Persistent DataLoader workers live as long as the loader: end them before the temporary
    # images go away, or their prefetching reports every remaining image as unreadable.
    del loader
    gc.collect()
    result = {"backend": backend, "data": name, "image_size": args.image_size,
              "batch_size": args.batch_size, "workers": args.workers,
              "machine_cores": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
              "loadavg_1m_after": round(os.getloadavg()[0], 2),
              "build_s": round(build_s, 1), **result}
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
