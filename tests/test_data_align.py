"""Token time windows (DESIGN §2.3): utterance alignment, multi-word and zero-length utterances,
window_pad_s and lag_s."""
import numpy as np
import pytest

from loctex.data.align import align_utterances, apply_window, point_ranges, token_windows


@pytest.fixture(scope="module")
def tok():
    from loctex.data.tokenizer import train_tokenizer
    return train_tokenizer(["In this image there is a dog on the grass.",
                            "A man is standing near a car at the top right."] * 5, vocab_size=200)


def windows_for(tok, caption, utterances):
    enc = tok.encode(caption, add_special_tokens=False)
    spans, missing = align_utterances(caption, utterances)
    times = np.array([u[1:] for u in utterances], np.float64)
    return enc, token_windows(np.array(enc.offsets), spans, times), missing


def test_multi_word_and_zero_length_utterances(tok):
    caption = "In this image there is a dog on the grass."
    utt = [("In this", 0.0, 0.0), ("image", 0.0, 0.4), ("there is a", 0.4, 0.9),
           ("dog", 0.9, 1.3), ("on the", 1.3, 1.6), ("grass.", 1.6, 2.2)]
    enc, win, missing = windows_for(tok, caption, utt)
    assert missing == 0
    by_token = {caption[s:e].lower(): tuple(w) for (s, e), w in zip(enc.offsets, win.tolist())}
    assert by_token["in"] == by_token["this"] == (0.0, 0.0)           # zero-length, multi-word
    assert by_token["there"] == by_token["is"] == by_token["a"] == pytest.approx((0.4, 0.9))
    assert by_token["dog"] == pytest.approx((0.9, 1.3))
    assert by_token["grass"] == pytest.approx((1.6, 2.2))
    assert np.isnan(by_token["."]).all()                             # punctuation: no window


def test_alignment_ignores_case_and_punctuation_and_respects_word_boundaries():
    caption = "A man, at the TOP-left; a cat."
    utt = [("a", 0, 1), ("MAN", 1, 2), ("at the", 2, 3), ("top left", 3, 4), ("a", 4, 5),
           ("cat", 5, 6)]
    spans, missing = align_utterances(caption, utt)
    assert missing == 0
    assert [caption[s:e] for s, e in spans] == ["A", "man", "at the", "TOP-left", "a", "cat"]


def test_unmatched_utterance_costs_one_word():
    caption = "a red kite in the sky"
    utt = [("a", 0, 1), ("blue", 1, 2), ("red", 2, 3), ("kite", 3, 4), ("", 4, 4), ("sky", 5, 6)]
    spans, missing = align_utterances(caption, utt)
    assert missing == 2  # "blue" not in the caption; "" has no letters
    assert [caption[s:e] if s >= 0 else None for s, e in spans] == \
        ["a", None, "red", "kite", None, "sky"]


def test_pad_and_lag_and_closed_windows():
    t = np.array([0.0, 0.5, 1.0, 1.0, 1.5, 2.0], np.float32)
    raw = np.array([[1.0, 1.0], [0.5, 1.5], [np.nan, np.nan], [3.0, 4.0]], np.float32)
    # zero-length window at t=1 selects exactly the points at t=1 (closed interval)
    r = point_ranges(apply_window(raw, 0.0, 0.0), t)
    assert r.tolist() == [[2, 4], [1, 5], [0, 0], [6, 6]]
    # padding widens on both sides
    r = point_ranges(apply_window(raw, 0.5, 0.0), t)
    assert r.tolist() == [[1, 5], [0, 6], [0, 0], [6, 6]]
    # lag shifts: the trace lags speech by 0.5 s
    w = apply_window(raw, 0.0, 0.5)
    np.testing.assert_allclose(w[0], [1.5, 1.5])
    assert point_ranges(w, t).tolist()[0] == [4, 5]
    assert point_ranges(apply_window(raw, 0.0, -1.0), t).tolist()[0] == [0, 1]


def test_non_ascii_captions_align_on_character_offsets():
    from loctex.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["Café au lait, über alles"] * 5, vocab_size=100)
    caption = "Café au lait, über alles"
    utt = [("café au", 0, 1), ("LAIT", 1, 2), ("über", 2, 3), ("alles", 3, 4)]
    enc, win, missing = windows_for(tok, caption, utt)
    assert missing == 0
    assert [caption[s:e] for s, e in enc.offsets] == ["Café", "au", "lait", ",", "über", "alles"]
    assert win[:, 0].tolist()[:3] == [0, 0, 1] and np.isnan(win[3, 0]) and win[4:, 0].tolist() == [2, 3]


def test_caption_encoder_equals_the_tokenizer():
    from loctex.synth.coco_like import coco_like_lines
    from loctex.data.tokenizer import CaptionEncoder, train_tokenizer
    import json
    caps = [json.loads(s)["caption"] for s in coco_like_lines(200, points=10)]
    caps += ["A man's hat (red) -- 2,000 dogs!!", "x" * 150 + " ok", "Tab\there\nnew", "",
             "Café au lait", "weird\x01ctrl", "   spaces   ", "abc123def 12.5 top-left's"]
    tok = train_tokenizer(caps[:150], vocab_size=400)
    enc = CaptionEncoder(tok, max_cache=300)  # small: the word table also starts over
    # all printable ASCII (one batch split), then mixed with captions the tokenizer must take
    for batch in (caps[:200], caps[150:], caps):
        got = enc.encode_batch(batch)
        for cap, (ids, offsets), e in zip(batch, got,
                                          tok.encode_batch(batch, add_special_tokens=False)):
            assert (list(ids), [tuple(o) for o in offsets]) == \
                (e.ids, [tuple(o) for o in e.offsets]), cap


def test_align_batch_equals_align_utterances_caption_by_caption():
    import random

    from loctex.data.align import align_batch
    rng = random.Random(0)
    words = ["a", "man", "In", "this", "TOP-left", "café", "grass.", "x_y", "12", "", "ß", "--"]
    for _ in range(300):
        caps, utts = [], []
        for _ in range(rng.randint(1, 5)):
            ws = [rng.choice(words) for _ in range(rng.randint(0, 7))]
            caps.append(" ".join(ws) + rng.choice(["", ".", " "]))
            u = [" ".join(ws[i:i + 2]) for i in range(0, len(ws), 2)]
            if u and rng.random() < 0.3:  # an utterance that is not in the caption, or none
                u[rng.randrange(len(u))] = rng.choice(words + ["zzz"])
            elif u and rng.random() < 0.3:  # one cut inside a word: "man" as "ma", "n"
                k = rng.randrange(len(u))
                cut = rng.randrange(len(u[k]) + 1)
                u[k:k + 1] = [u[k][:cut], u[k][cut:]]
            utts.append(u if rng.random() > 0.1 else [])
        spans, missing = align_batch(caps, utts)
        want, want_missing, base = [], 0, 0
        for cap, u in zip(caps, utts):
            sp, m = align_utterances(cap, u)
            want.append(np.where(sp >= 0, sp + base, -1))
            want_missing += m
            base += len(cap) + 1
        assert missing == want_missing
        np.testing.assert_array_equal(spans, np.concatenate(want).reshape(-1, 2))
