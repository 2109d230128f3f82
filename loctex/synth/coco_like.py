"""COCO-like Localized Narratives lines for tests and benchmarks of ``loctex prepare``: the shape of
the real records (~40-word captions, one utterance per word with some multi-word and zero-length
ones, ~500 trace points in 3-6 segments, x/y with 4 decimals and t in ms, ~1.14 narratives per
image, ~20 KB a line) without the embedded data set's images and scenes."""
from __future__ import annotations

import json

import numpy as np

WORDS = ("in this image we can see a person standing on the road and there are some trees in the "
         "background at the top left corner there is a building with windows on the right side "
         "of the image there is a car parked near the sky is cloudy and blue we can also see a "
         "few people walking on the footpath holding bags bottom").split()


def coco_like_lines(n: int, points: int = 500, words: int = 40, seed: int = 0):
    """``n`` JSON lines (str) of dataset ``mscoco_train2017``; image ids ``0 .. n/1.14``."""
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
