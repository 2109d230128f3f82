"""Throughput of ``loctex prepare`` on COCO-like records, on one core.

    python benchmarks/bench_prepare.py [--narratives 20000] [--points 500] [--words 40]

Writes a temporary JSON Lines file of records shaped like COCO Localized Narratives
(:func:`loctex.synth.coco_like.coco_like_lines`) and tiny JPEGs named like COCO, trains the
tokenizer (timed apart), then times the prepare pass pinned to one CPU with tokenizer threads off,
and prints narratives/s.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--narratives", type=int, default=20000)
    ap.add_argument("--points", type=int, default=500)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    args = ap.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from PIL import Image

    from loctex.data.prepare import prepare
    from loctex.data.tokenizer import iter_captions, train_tokenizer
    from loctex.synth.coco_like import coco_like_lines

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "coco_like.jsonl"
        with open(src, "w") as f:
            for line in coco_like_lines(args.narratives, args.points, args.words):
                f.write(line + "\n")
        num_images = max(1, int(args.narratives / 1.14))
        (tmp / "images" / "train2017").mkdir(parents=True)
        buf = tmp / "one.jpg"
        Image.new("RGB", (64, 48), (90, 120, 200)).save(buf, quality=90)
        data = buf.read_bytes()
        for i in range(num_images):
            (tmp / "images" / "train2017" / f"{i:012d}.jpg").write_bytes(data)
        size_mb = src.stat().st_size / 1e6
        if not args.all_cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        t0 = time.perf_counter()
        tok = train_tokenizer(iter_captions([src]), 8000)
        t_tok = time.perf_counter() - t0
        tok.save(str(tmp / "tok.json"))
        t0, c0 = time.perf_counter(), time.process_time()
        report = prepare([src], tmp / "images", tmp / "out", tokenizer=tmp / "tok.json",
                         log=lambda *a: None)
        t_prep = time.perf_counter() - t0
        c_prep = time.process_time() - c0
    n = args.narratives
    cores = "all cores" if args.all_cores else "1 core"
    print(f"records: {n} ({size_mb / n * 1e3:.1f} KB/line, {size_mb:.0f} MB), "
          f"{num_images} images; kept {report['kept']}, rejected {report['rejected']}")
    print(f"tokenizer training: {t_tok:.2f} s ({n / t_tok:,.0f} captions/s)")
    print(f"prepare: {t_prep:.2f} s wall = {n / t_prep:,.0f} narratives/s ({cores})")
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB")
    print(f"prepare: {c_prep:.2f} s CPU  = {n / c_prep:,.0f} narratives per CPU-second "
          f"(the wall figure is lower when other processes share the core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
