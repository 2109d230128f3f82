"""``loctex synth``: the embedded data set, in the real Localized Narratives format.

Output layout (``DIR``)::

    images/%012d.jpg                JPEG (quality 90); the integer is the COCO image id and the LN image_id
    narratives_{train,val}.jsonl    one LN record per line (DESIGN 2.1), dataset_id "loctex_synth_<split>"
    instances_{train,val}.json      COCO instances: boxes, polygon masks, 8 shape categories
    groundings_{train,val}.jsonl    per narrative, in the same order: which caption span names which
                                    COCO annotation, and when its noun is spoken
    synth.json                      arguments, vocabulary, file names and statistics

Every image draws from its own generator seeded by (seed, image id), so a seed gives the same bytes
on any machine load; the last ``val_fraction`` of the ids form the val split.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import simplejpeg

from loctex.synth.language import compose, speak, utterances
from loctex.synth.scene import make_scene
from loctex.synth.traces import DT, annotator_pool, make_traces, traces_json
from loctex.synth.vocab import BACKGROUNDS, CATEGORIES, COLORS, SHAPES, SIZES

FORMAT_VERSION = 1
TWO_ANNOTATORS_P = 0.15   # images with a second narrative
EMPTY_TRACES_P = 0.02     # narratives whose traces list is empty


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1, help="last ids held out as the val split")
    p.add_argument("--jpeg-quality", type=int, default=90)


def main(args) -> int:
    t0 = time.perf_counter()
    info = generate(args.out, args.num_images, args.seed, args.image_size, args.val_fraction,
                    args.jpeg_quality)
    s, sp = info["stats"], info["splits"]
    print(f"wrote {args.num_images} images ({sp['train']['images']} train, {sp['val']['images']} val), "
          f"{s['narratives']} narratives to {args.out} in {time.perf_counter() - t0:.1f}s")
    print(f"objects/image {s['objects_per_image']:.2f}  words/caption {s['words_per_caption']:.1f}  "
          f"points/narrative {s['points_per_narrative']:.0f}  words/s {s['words_per_second']:.2f}")
    return 0


def _narrative(rng, scene, image_id: int, split: str, annotator, ann_ids: list, size: int):
    """One annotator's narrative: (JSON line, record without traces, groundings, traces, speech s)."""
    ann_id, style = annotator
    words = compose(rng, scene, style.left_to_right)
    speak(rng, words, style.rate)
    timed, owner = utterances(rng, words)
    boxes = [tuple(v / size for v in o.box_xyxy) for o in scene.objects]
    traces = [] if rng.random() < EMPTY_TRACES_P else make_traces(rng, words, boxes, style)
    caption = " ".join(w.text for w in words)
    record = {
        "dataset_id": f"loctex_synth_{split}", "image_id": str(image_id), "annotator_id": ann_id,
        "caption": caption, "timed_caption": timed, "traces": 0,
        "voice_recording": f"loctex_synth_{split}/loctex_synth_{split}_{image_id:012d}_{ann_id}.ogg",
    }
    # The traces are by far the bulk of a line; they are written as text directly.
    line = json.dumps(record).replace('"traces": 0', '"traces": ' + traces_json(traces), 1)

    starts = np.cumsum([0] + [len(w.text) + 1 for w in words]).tolist()
    groundings = []
    for k, obj in enumerate(scene.objects):
        span = {}
        for role in ("phrase", "noun"):  # character span, trailing punctuation excluded
            idx = [i for i, w in enumerate(words) if getattr(w, role) == k]
            span[role] = [starts[idx[0]], starts[idx[-1]] + len(words[idx[-1]].text.rstrip(".,"))]
            if role == "noun":
                utt = sorted({owner[i] for i in idx})
        x, y, w, h = obj.bbox
        groundings.append({
            "ann_id": ann_ids[k], "category_id": obj.shape + 1, "category": SHAPES[obj.shape][0],
            "color": COLORS[obj.color][0], "size": SIZES[obj.size][0],
            "phrase": caption[slice(*span["phrase"])], "phrase_span": span["phrase"],
            "noun": caption[slice(*span["noun"])], "noun_span": span["noun"],
            "noun_time": [timed[utt[0]]["start_time"], timed[utt[-1]]["end_time"]],
            "bbox": obj.bbox,
            "box": [round(v / size, 4) for v in (x, y, x + w, y + h)],
        })
    groundings.sort(key=lambda g: g["phrase_span"][0])  # caption order
    ground = {"image_id": str(image_id), "annotator_id": ann_id, "groundings": groundings}
    return line, record, ground, traces, words[-1].end - words[0].start


def generate(out, num_images: int, seed: int, image_size: int = 128, val_fraction: float = 0.1,
             jpeg_quality: int = 90) -> dict:
    """Write the data set to ``out``; returns what ``synth.json`` holds."""
    # The COCO dicts grow to millions of objects without cycles: the cyclic collector would rescan
    # them again and again.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _generate(Path(out), num_images, seed, image_size, val_fraction, jpeg_quality)
    finally:
        if was_enabled:
            gc.enable()


def _count(stats: dict, record: dict, traces: list, speech: float) -> None:
    tc = record["timed_caption"]
    stats["narratives"] += 1
    stats["words"] += len(record["caption"].split())
    stats["speech_s"] += speech
    stats["utterances"] += len(tc)
    stats["zero_length_utterances"] += sum(u["start_time"] == u["end_time"] for u in tc)
    stats["multi_word_utterances"] += sum(" " in u["utterance"] for u in tc)
    stats["empty_traces"] += not traces
    stats["segments"] += len(traces)
    stats["points"] += sum(len(t) for _, _, t in traces)
    stats["outside_points"] += sum(int(((x < 0) | (x > 1) | (y < 0) | (y > 1)).sum()) for x, y, _ in traces)


def _generate(out: Path, num_images: int, seed: int, image_size: int, val_fraction: float,
              jpeg_quality: int) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and num_images >= 2:
        n_val = min(max(n_val, 1), num_images - 1)
    n_train = num_images - n_val
    splits = {"train": range(1, n_train + 1), "val": range(n_train + 1, num_images + 1)}
    pool = annotator_pool(seed)
    stats = dict.fromkeys(["narratives", "objects", "two_annotators", "words", "speech_s", "utterances",
                           "zero_length_utterances", "multi_word_utterances", "empty_traces", "segments",
                           "points", "outside_points"], 0)
    per_category = [0] * len(CATEGORIES)
    info_splits, next_ann = {}, 0
    for split, ids in splits.items():
        coco = {"info": {"description": "LocTex embedded synthetic data set", "version": str(FORMAT_VERSION),
                         "seed": seed},
                "licenses": [], "images": [], "annotations": [], "categories": CATEGORIES}
        n_narr = 0
        with open(out / f"narratives_{split}.jsonl", "w") as fn, \
                open(out / f"groundings_{split}.jsonl", "w") as fg:
            for image_id in ids:
                rng = np.random.default_rng([seed, image_id])
                scene = make_scene(rng, image_size)
                name = f"{image_id:012d}.jpg"
                (out / "images" / name).write_bytes(
                    simplejpeg.encode_jpeg(scene.image, quality=jpeg_quality, colorspace="RGB"))
                coco["images"].append({"id": image_id, "file_name": name, "width": image_size,
                                       "height": image_size})
                ann_ids = []
                for obj in scene.objects:
                    next_ann += 1  # unique across both splits
                    ann_ids.append(next_ann)
                    coco["annotations"].append({
                        "id": next_ann, "image_id": image_id, "category_id": obj.shape + 1,
                        "segmentation": [obj.polygon], "area": obj.area, "bbox": obj.bbox, "iscrowd": 0,
                        "attributes": {"color": COLORS[obj.color][0], "size": SIZES[obj.size][0]}})
                    per_category[obj.shape] += 1
                stats["objects"] += len(scene.objects)
                n_annotators = 2 if rng.random() < TWO_ANNOTATORS_P else 1
                stats["two_annotators"] += n_annotators == 2
                for a in rng.choice(len(pool), n_annotators, replace=False):
                    line, record, ground, traces, speech = _narrative(
                        rng, scene, image_id, split, pool[int(a)], ann_ids, image_size)
                    fn.write(line + "\n")
                    fg.write(json.dumps(ground) + "\n")
                    n_narr += 1
                    _count(stats, record, traces, speech)
        with open(out / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
        info_splits[split] = {"images": len(ids), "narratives": n_narr, "objects": len(coco["annotations"]),
                              "narratives_file": f"narratives_{split}.jsonl",
                              "instances_file": f"instances_{split}.json",
                              "groundings_file": f"groundings_{split}.jsonl"}
    n = max(stats["narratives"], 1)
    stats.update(
        speech_s=round(stats["speech_s"], 1),
        objects_per_image=round(stats["objects"] / max(num_images, 1), 3),
        words_per_caption=round(stats["words"] / n, 2),
        points_per_narrative=round(stats["points"] / n, 1),
        segments_per_traced_narrative=round(stats["segments"] / max(n - stats["empty_traces"], 1), 3),
        words_per_second=round(stats["words"] / max(stats["speech_s"], 1e-9), 3),
        objects_per_category={c["name"]: per_category[i] for i, c in enumerate(CATEGORIES)})
    info = {"format_version": FORMAT_VERSION, "seed": seed, "num_images": num_images,
            "image_size": image_size, "val_fraction": val_fraction, "jpeg_quality": jpeg_quality,
            "image_template": "images/%012d.jpg", "point_rate_hz": 1 / DT, "splits": info_splits,
            "categories": CATEGORIES, "colors": [c[0] for c in COLORS], "sizes": [s[0] for s in SIZES],
            "backgrounds": [b[0] for b in BACKGROUNDS], "stats": stats}
    (out / "synth.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
