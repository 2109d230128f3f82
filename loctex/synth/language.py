"""Captions and their timing, the way annotators speak them.

A caption is built word by word; every word carries the *target* the annotator is describing while
saying it (an object index, ``"bg"`` for the background, or ``None`` for fillers such as "In this
image"), which is what the pointer follows. Objects are named with their attributes and placed with
absolute ("at the top left") or relative ("to the right of it") positions that are true of the scene.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loctex.synth.vocab import BACKGROUNDS, COLORS, SHAPES, SIZES


@dataclass
class Word:
    text: str
    target: object = None   # object index, "bg" or None
    phrase: int = -1        # object whose noun phrase (attributes + noun) holds this word
    noun: int = -1          # object whose head noun this word is
    start: float = 0.0      # when it is actually spoken (seconds)
    end: float = 0.0


@dataclass
class Caption:
    """Words being composed, sentence by sentence (capitalized and punctuated as they end)."""
    words: list = field(default_factory=list)
    _sentence_start: int = 0

    def add(self, text: str, target=None, phrase: int = -1, noun: int = -1):
        for w in text.split():
            self.words.append(Word(w, target, phrase, noun))

    def end(self, punct: str = "."):
        first = self.words[self._sentence_start]
        first.text = first.text[0].upper() + first.text[1:]
        self.words[-1].text += punct
        self._sentence_start = len(self.words)

    def comma(self):
        self.words[-1].text += ","

    def reopen(self):
        """Drop the last sentence's period so that the next phrase joins it with "and"."""
        self.words[-1].text = self.words[-1].text.rstrip(".")
        while self._sentence_start > 0 and not self.words[self._sentence_start - 1].text.endswith("."):
            self._sentence_start -= 1


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


OPENERS = ["in this image we can see", "in this picture we can see", "in this image there is",
           "in this picture I can see", "this image shows", "here we can see", "there is",
           "I can see", "we can see", "this picture contains", "in the image there is"]
INTROS = ["there is", "we can see", "I can see", "there is", "you can see"]
ALSO = ["there is also", "we can also see", "I can also see", "also there is", "and there is"]
VERBS = ["is", "is", "is placed", "is located", "can be seen"]
COUNTS = ["", "one", "two", "three", "four"]
RELATIONS = {
    "right": ["to the right of it", "on its right", "to its right", "to the right of that"],
    "left": ["to the left of it", "on its left", "to its left", "to the left of that"],
    "below": ["below it", "under it", "beneath it", "below that"],
    "above": ["above it", "over it", "above that"],
}
BG_PATTERN = {"mottled": ["mottled", "blurry", "textured"], "striped": ["striped"],
              "checkered": ["checkered", "checked"], "plain": ["plain", "smooth"]}


def _position(rng, cx: float, cy: float) -> str:
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if h and v:
        return _pick(rng, [f"at the {v} {h}", f"in the {v} {h} corner", f"on the {v} {h}",
                           f"at the {v} {h} of the image", f"in the {v} {h} of the picture"])
    if h:
        return _pick(rng, [f"on the {h}", f"on the {h} side", f"at the {h}",
                           f"on the {h} side of the image"])
    if v:
        return _pick(rng, [f"at the {v}", f"near the {v}", f"at the {v} of the image"])
    return _pick(rng, ["in the center", "in the middle", "at the center of the image"])


def _relation(rng, obj, prev, prev_noun: str):
    """A true relative position of ``obj`` to ``prev`` when one clearly holds, else None."""
    dx, dy = obj.center[0] - prev.center[0], obj.center[1] - prev.center[1]
    if max(abs(dx), abs(dy)) < 0.15 or 0.6 < abs(dx) / (abs(dy) + 1e-6) < 1.7:
        return None
    rel = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
    if rng.random() < 0.15:  # naming the previous object: noise for that noun's localization
        return {"right": "to the right of the", "left": "to the left of the", "below": "below the",
                "above": "above the"}[rel] + " " + prev_noun
    return _pick(rng, RELATIONS[rel])


def _noun_phrase(rng, cap: Caption, k: int, obj) -> str:
    """'a [size] color noun'; the words after the article are object k's phrase, the last its noun."""
    size = _pick(rng, SIZES[obj.size][2]) if rng.random() < 0.7 else ""
    noun = _pick(rng, SHAPES[obj.shape][3])
    first = size or COLORS[obj.color][0]
    cap.add("an" if first[0] in "aeiou" else "a", k)
    if size:
        cap.add(size, k, phrase=k)
    cap.add(COLORS[obj.color][0], k, phrase=k)
    cap.add(noun, k, phrase=k, noun=k)
    return noun


def compose(rng, scene, order_left_to_right: float = 0.5) -> list:
    """Words of one narrative for ``scene``, each tagged with what it describes."""
    objs = scene.objects
    order = [int(k) for k in rng.permutation(len(objs))]
    if rng.random() < order_left_to_right:
        order.sort(key=lambda k: objs[k].center[0])
    cap, nouns, prev = Caption(), {}, None
    for i, k in enumerate(order):
        obj = objs[k]
        rel = _relation(rng, obj, objs[prev], nouns[prev]) if prev is not None else None
        where = rel if rel and rng.random() < 0.6 else _position(rng, *obj.center)
        form = rng.random()
        if i == 0:
            if len(objs) > 1 and form < 0.15:
                cap.add(f"in this image there are {COUNTS[len(objs)]} shapes")
                cap.end()
                form = rng.random() * 0.5 + 0.5  # then a sentence without an opener
            if form < 0.5:
                cap.add(_pick(rng, OPENERS))
                nouns[k] = _noun_phrase(rng, cap, k, obj)
                if rng.random() < 0.85:
                    cap.add(where, k)
            elif form < 0.75:
                cap.add(where, k)
                cap.comma()
                cap.add(_pick(rng, INTROS), k)
                nouns[k] = _noun_phrase(rng, cap, k, obj)
            else:
                nouns[k] = _noun_phrase(rng, cap, k, obj)
                cap.add(f"{_pick(rng, VERBS)} {where}", k)
        else:
            if form < 0.3 and rel:
                cap.add(f"{rel} {_pick(rng, ['there is', 'we can see', 'is'])}", k)
                nouns[k] = _noun_phrase(rng, cap, k, obj)
            elif form < 0.6:
                cap.add(_pick(rng, ALSO), k)
                nouns[k] = _noun_phrase(rng, cap, k, obj)
                cap.add(where, k)
            elif form < 0.8:
                nouns[k] = _noun_phrase(rng, cap, k, obj)
                cap.add(f"{_pick(rng, VERBS)} {where}", k)
            else:
                cap.reopen()
                cap.add("and", k)
                nouns[k] = _noun_phrase(rng, cap, k, obj)
                cap.add(where, k)
        cap.end()
        prev = k

    if rng.random() < (0.7, 0.7, 0.55, 0.3)[len(objs) - 1]:
        _background_sentence(rng, cap, scene)
    if rng.random() < 0.08:
        cap.add(_pick(rng, ["that is all", "that's it", "that is all I can see"]))
        cap.end()
    return cap.words


def _background_sentence(rng, cap: Caption, scene):
    """A sentence about the backdrop and the clutter: the pointer sweeps the image meanwhile."""
    bg = BACKGROUNDS[scene.background][0]
    pattern = _pick(rng, BG_PATTERN[scene.pattern])
    clutter = " and ".join(scene.clutter[:2])
    surface = _pick(rng, ["surface", "texture", "wall", "pattern"])
    form = rng.random()
    if form < 0.35:
        verb = _pick(rng, ["there is", "we can see"])
        cap.add(f"in the background {verb} a {pattern} {bg} {surface}", "bg")
    elif form < 0.55:
        cap.add(f"the background is {bg} and {pattern}", "bg")
    elif form < 0.8:
        them = "them" if len(scene.objects) > 1 else "it"
        where = _pick(rng, ["behind " + them, "around " + them, "in the background"])
        cap.add(f"{where} there are some {clutter}", "bg")
    else:
        cap.add(f"in the background there are some {clutter} on a {bg} {surface}", "bg")
    cap.end()


def speak(rng, words: list, rate: float) -> None:
    """Give every word a start and end time: ~2.5 words/s with pauses at commas and periods."""
    letters = np.array([sum(c.isalpha() for c in w.text) for w in words], np.float64)
    dur = rate * (0.085 + 0.056 * letters) * rng.uniform(0.85, 1.15, len(words))
    gap = rng.uniform(0.0, 0.06, len(words))
    punct = np.array([w.text[-1] for w in words])
    gap = np.where(punct == ",", rng.uniform(0.15, 0.4, len(words)), gap)
    gap = np.where(punct == ".", rng.uniform(0.35, 0.9, len(words)), gap)
    gap += np.where(rng.random(len(words)) < 0.05, rng.uniform(0.3, 0.8, len(words)), 0.0)  # hesitations
    start = rng.uniform(0.3, 1.5) + np.concatenate([[0.0], np.cumsum(dur + gap)[:-1]])
    for w, s, d in zip(words, start.tolist(), dur.tolist()):
        w.start, w.end = s, s + d


def utterances(rng, words: list) -> tuple[list, list]:
    """Group words into ASR-like utterances: mostly one word, some two or three (never across a
    sentence end); ~3% have zero duration. Returns the timed_caption and, per word, its utterance."""
    timed, owner, i = [], [], 0
    while i < len(words):
        n = 1 + int(rng.random() < 0.25) + int(rng.random() < 0.07)
        j = i + 1
        while j < min(i + n, len(words)) and not words[j - 1].text.endswith("."):
            j += 1
        start, end = round(words[i].start, 2), round(words[j - 1].end, 2)
        if rng.random() < 0.03:
            end = start
        timed.append({"utterance": " ".join(w.text for w in words[i:j]), "start_time": start,
                      "end_time": end})
        owner += [len(timed) - 1] * (j - i)
        i = j
    return timed, owner
