"""Token time windows (DESIGN §2.3).

1. :func:`align_utterances` finds each utterance's character span in the caption, in order, ignoring
   case and punctuation/whitespace (``"In this"`` matches ``"in this"``; ``"grass."`` matches
   ``"grass"``), and only at word boundaries (``"a"`` never matches inside ``"man"``). An utterance
   that is not found (or holds no letters/digits) gets no span and the search goes on after the last
   match, so one bad utterance costs one word, not the rest of the caption.
   :func:`align_batch` does the same for a batch of captions.
2. :func:`token_windows`: a token takes the ``[start_time, end_time]`` of the utterance whose span
   holds the token's first character; tokens outside every span (e.g. a final ``"."``) get NaN.
   Zero-length utterances (``start == end``) keep their zero-length window: it still selects the
   points at exactly that time, and ``window_pad_s`` widens it.
3. :func:`apply_window` adds ``window_pad_s`` on both sides and shifts by ``lag_s``;
   :func:`point_ranges` turns windows into ``[start, end)`` ranges of time-sorted points
   (a window is closed: ``start <= t <= end``).

The prepared data set stores the raw utterance windows (step 2); the data set applies step 3 with the
config values, so changing ``data.window_pad_s`` or ``data.lag_s`` needs no new ``prepare``.
"""
from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"[^\W_]+")                 # runs of letters/digits (Unicode aware)
_NOT_WORD_OR_SEP = re.compile(r"[^\w\x00]|_")  # what normalization removes from utterances


_ASCII_DROP = {c: None for c in range(128) if not chr(c).isalnum()}  # str.translate table
_ASCII_DROP_KEEP_SEP = {c: None for c in range(1, 128) if not chr(c).isalnum()}
_ASCII_WORD = np.zeros(128, bool)
_ASCII_WORD[[c for c in range(128) if chr(c).isalnum()]] = True


def _normalize_caption(caption: str):
    """(normalized text, index map norm->caption char, bool word-start, bool word-end)."""
    if caption.isascii():
        low = caption.lower()
        isword = _ASCII_WORD[np.frombuffer(low.encode("ascii"), np.uint8)]
        index = np.flatnonzero(isword)
        norm = low.translate(_ASCII_DROP)
        gap = np.diff(index) != 1
        word_start = np.ones(len(index), bool)
        word_start[1:] = gap
        word_end = np.ones(len(index), bool)
        word_end[:-1] = gap
        return norm, index, word_start, word_end
    runs = [(m.start(), m.end()) for m in _WORD.finditer(caption)]
    if not runs:
        return "", np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool)
    starts = np.fromiter((s for s, _ in runs), np.int64, len(runs))
    lengths = np.fromiter((e - s for s, e in runs), np.int64, len(runs))
    norm = "".join(caption[s:e] for s, e in runs)
    low = norm.lower()
    if len(low) != len(norm):  # a few Unicode letters change length when lower-cased
        low = "".join(c.lower()[:1] for c in norm)
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths
    index = np.repeat(starts - before, lengths) + np.arange(total)
    word_start = np.zeros(total, bool)
    word_start[before] = True
    word_end = np.zeros(total, bool)
    word_end[before + lengths - 1] = True
    return low, index, word_start, word_end


def _keys(texts: list) -> list:
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:  # a text holds a \x00 itself (never, in practice)
        joined = "\x00".join(t.replace("\x00", " ") for t in texts)
    if joined.isascii():
        keys = joined.lower().translate(_ASCII_DROP_KEEP_SEP).split("\x00")
    else:
        keys = _NOT_WORD_OR_SEP.sub("", joined).lower().split("\x00")
    if len(keys) != len(texts):  # cannot happen (\x00 survives both); be safe
        keys = [_NOT_WORD_OR_SEP.sub("", t).lower() for t in texts]
    return keys


def align_utterances(caption: str, utterances) -> tuple[np.ndarray, int]:
    """Character spans ``int64 [U,2]`` (``[start, end)`` in ``caption``; ``-1`` rows: not found)
    of the utterances (strings, or ``(text, start_s, end_s)`` tuples), and the number not found."""
    texts = [u if isinstance(u, str) else u[0] for u in utterances]
    n = len(texts)
    spans = np.full((n, 2), -1, np.int64)
    if n == 0:
        return spans, 0
    norm, index, word_start, word_end = _normalize_caption(caption)
    keys = _keys(texts)
    # Common case: the utterances, concatenated, are exactly the caption's words.
    lengths = np.fromiter(map(len, keys), np.int64, n)
    if lengths.all() and "".join(keys) == norm:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        if word_start[starts].all() and word_end[ends - 1].all():
            spans[:, 0] = index[starts]
            spans[:, 1] = index[ends - 1] + 1
            return spans, 0
    cursor, missing = 0, 0
    ws, we = word_start.tolist(), word_end.tolist()
    starts, ends, rows = [], [], []
    for i, key in enumerate(keys):
        if not key:
            missing += 1
            continue
        j = norm.find(key, cursor)
        k = len(key)
        while j >= 0 and not (ws[j] and we[j + k - 1]):
            j = norm.find(key, j + 1)
        if j < 0:
            missing += 1
            continue
        rows.append(i)
        starts.append(j)
        ends.append(j + k - 1)
        cursor = j + k
    if rows:
        spans[rows, 0] = index[starts]
        spans[rows, 1] = index[ends] + 1
    return spans, missing


def align_batch(captions: list[str], utterances: list[list[str]]) -> tuple[np.ndarray, int]:
    """:func:`align_utterances` for many captions at once, on one character axis: caption ``k``
    starts at ``sum(len(c) + 1 for c in captions[:k])`` (one separator between captions). Returns
    the spans ``int64 [U,2]`` of all utterances in order, shifted onto that axis (``-1`` rows: not
    found), and the number not found.

    The common case (an ASCII caption whose utterances, concatenated, are exactly its words) is
    checked and solved for every caption in a few NumPy calls; any other caption goes through
    :func:`align_utterances` itself, so the result is the same caption by caption."""
    counts = [len(t) for t in utterances]
    flat = [t for texts in utterances for t in texts]
    spans = np.full((len(flat), 2), -1, np.int64)
    if not flat:
        return spans, 0
    base = np.cumsum([0] + [len(c) + 1 for c in captions[:-1]])
    ubase = np.cumsum([0] + counts[:-1])
    # One ASCII text with every caption in its place; captions left to the slow path are blanked
    # (same length), so they hold no words and the positions of the others do not move.
    eligible = [m > 0 and c.isascii() for c, m in zip(captions, counts)]
    norm, index, word_start, word_end = _normalize_caption(
        "\n".join(c if e else " " * len(c) for c, e in zip(captions, eligible)))
    keys = _keys(flat)
    klen = np.fromiter(map(len, keys), np.int64, len(keys))
    nb = np.searchsorted(index, base).tolist() + [len(norm)]  # caption k: norm[nb[k]:nb[k + 1]]
    matched = np.array([e and "".join(keys[u:u + m]) == norm[nb[k]:nb[k + 1]]
                        for k, (e, u, m) in enumerate(zip(eligible, ubase.tolist(), counts))])
    # where each utterance starts and ends in norm if its caption matched, and whether it lies on
    # word boundaries there
    owner = np.repeat(np.arange(len(captions)), counts)
    before = np.cumsum(klen) - klen
    first = np.asarray(nb[:-1])[owner] + before - before[ubase[owner]]
    last = first + klen - 1
    good = matched[owner] & (klen > 0)
    if len(norm):
        good &= word_start[np.clip(first, 0, len(norm) - 1)]
        good &= word_end[np.clip(last, 0, len(norm) - 1)]
    # a caption takes the fast result only if all its utterances do (else its own search)
    matched &= np.bincount(owner[~good], minlength=len(captions)) == 0
    good = matched[owner]
    if good.any():
        spans[good, 0] = index[first[good]]
        spans[good, 1] = index[last[good]] + 1
    missing = 0
    for k in np.flatnonzero(~matched & (np.asarray(counts) > 0)).tolist():
        sp, m = align_utterances(captions[k], utterances[k])
        found = sp[:, 0] >= 0
        sp[found] += base[k]
        spans[ubase[k]:ubase[k] + counts[k]] = sp
        missing += m
    return spans, missing


def token_windows(token_chars: np.ndarray, spans: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``float32 [T,2]`` raw ``[start_s, end_s]`` per token (NaN: no window).

    ``token_chars`` int [T,2] character offsets of the tokens; ``spans`` from
    :func:`align_utterances`; ``times`` float [U,2] the utterances' (start, end)."""
    out = np.full((len(token_chars), 2), np.nan, np.float32)
    found = spans[:, 0] >= 0
    if not found.any() or len(token_chars) == 0:
        return out
    sp, tm = spans[found], np.asarray(times, np.float64)[found]
    first = np.asarray(token_chars, np.int64)[:, 0]
    u = np.searchsorted(sp[:, 0], first, side="right") - 1
    ok = (u >= 0) & (first < sp[np.maximum(u, 0), 1])
    out[ok] = tm[u[ok]]
    return out


def apply_window(windows: np.ndarray, window_pad_s: float, lag_s: float) -> np.ndarray:
    """Raw windows -> padded, lag-shifted windows (NaN stays NaN)."""
    w = np.asarray(windows, np.float32)
    return np.stack([w[:, 0] - window_pad_s + lag_s, w[:, 1] + window_pad_s + lag_s], axis=1)


def point_ranges(windows: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``int32 [T,2]`` ``[start, end)`` indices of the points whose time ``t`` (sorted ascending)
    lies in each closed window; ``[0, 0]`` for NaN windows."""
    w = np.asarray(windows, np.float32)
    t = np.asarray(times, np.float32)
    out = np.zeros((len(w), 2), np.int32)
    ok = np.isfinite(w).all(axis=1)
    if ok.any() and len(t):
        out[ok, 0] = np.searchsorted(t, w[ok, 0], side="left")
        out[ok, 1] = np.searchsorted(t, w[ok, 1], side="right")
        out[:, 1] = np.maximum(out[:, 1], out[:, 0])
    return out
