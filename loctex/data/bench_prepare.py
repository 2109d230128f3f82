"""Throughput of ``loctex prepare`` on COCO-like records, on one core.

    python -m loctex.data.bench_prepare [--narratives 20000] [--points 500] [--words 40]

Writes a temporary JSON Lines file of synthetic records shaped like COCO Localized Narratives
(~40-word captions, one utterance per word with some multi-word and zero-length ones, ~500 trace
points in 3–6 segments, x/y with 4 decimals and t in ms, ~1.14 narratives per image, ~20 KB a line)
and tiny JPEGs named like COCO, trains the tokenizer (timed apart), then times the prepare pass
pinned to one CPU with tokenizer threads off, and prints narratives/s. Target: >= 5,000/s.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("in this image we can see a person standing on the road and there are some trees in the "
         "background at the top left corner there is a building with windows on the right side "
         "of the image there is a car parked near the sky is cloudy and blue we can also see a "
         "few people walking on the footpath holding bags bottom").split()


def coco_like_lines(n: int, points: int = 500, words: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    num_images = max(1, int(n / 1.14))
    for i in range(n):
        k = int(rng.integers(words // 2, words * 3 // 2))
        ws = list(rng.choice(WORDS, k))
        ws[0] = ws[0].capitalize()
        caption = " ".join(ws) + "."
        timed, t, j = [], 0.0, 0
        while j < len(ws):
            m = 2 if rng.random() < 0.1 and j + 1 < len(ws) else 1
            d = 0.0 if rng.random() < 0.05 else float(rng.uniform(0.15, 0.6))
            text = " ".join(ws[j:j + m]) + ("." if j + m == len(ws) else "")
            timed.append({"utterance": text, "start_time": round(t, 3), "end_time": round(t + d, 3)})
            t += d
            j += m
        p = int(rng.integers(points * 3 // 4, points * 5 // 4))
        nseg = int(rng.integers(3, 7))
        cuts = np.sort(rng.choice(np.arange(1, p), nseg - 1, replace=False))
        xy = np.clip(np.cumsum(rng.normal(0, 0.02, (p, 2)), axis=0) + 0.5, -0.1, 1.1).round(4)
        ts = (np.arange(p) * (t / p)).round(3)
        traces = [[{"x": float(x), "y": float(y), "t": float(tt)} for (x, y), tt in zip(xs, tseg)]
                  for xs, tseg in zip(np.split(xy, cuts), np.split(ts, cuts))]
        yield json.dumps({"dataset_id": "mscoco_train2017", "image_id": str(i % num_images),
                          "annotator_id": int(i // num_images), "caption": caption,
                          "timed_caption": timed, "traces": traces,
                          "voice_recording": f"coco_train/coco_train_{i:012d}.ogg"})


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
    print(f"prepare: {t_prep:.2f} s wall = {n / t_prep:,.0f} narratives/s ({cores}; target >= 5,000)")
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB")
    print(f"prepare: {c_prep:.2f} s CPU  = {n / c_prep:,.0f} narratives per CPU-second "
          f"(the wall figure is lower when other processes share the core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
