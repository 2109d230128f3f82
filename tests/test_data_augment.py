"""The sample source: deterministic decisions; crop/resize/flip move points exactly as pixels;
a flip swaps left/right and keeps the token windows."""
import numpy as np
import pytest
from PIL import Image

from loctex.data import augment as G


def test_decisions_are_a_pure_function_of_seed_epoch_index():
    cfg = G.AugmentConfig(crop_scale_min=0.3, flip_prob=0.5, color_jitter=0.4)
    a = [G.sample_decision(7, 2, i, (640, 480), cfg) for i in range(200)]
    b = [G.sample_decision(7, 2, i, (640, 480), cfg) for i in range(200)]
    assert a == b
    assert a != [G.sample_decision(7, 3, i, (640, 480), cfg) for i in range(200)]
    assert a != [G.sample_decision(8, 2, i, (640, 480), cfg) for i in range(200)]
    x0, y0, w, h = np.array([d.crop for d in a]).T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 1 + 1e-6
    ratio = w * 640 / (h * 480)
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert 0.3 < np.mean([d.flip for d in a]) < 0.7
    jitter = np.array([(d.brightness, d.contrast, d.saturation) for d in a])
    assert (np.abs(jitter - 1) <= 0.4 + 1e-6).all()
    assert G.sample_decision(7, 2, 5, (640, 480), cfg, train=False) == G.IDENTITY


def bright_centroid(img: Image.Image) -> tuple[float, float]:
    a = np.asarray(img.convert("L"), np.float64)
    a = np.where(a > a.max() * 0.3, a, 0)
    ys, xs = np.indices(a.shape)
    return (xs * a).sum() / a.sum(), (ys * a).sum() / a.sum()


@pytest.mark.parametrize("k", range(12))
def test_points_move_exactly_like_pixels(k):
    W, H, S = 320, 240, 96
    rng = np.random.default_rng(k)
    cfg = G.AugmentConfig(crop_scale_min=0.35, flip_prob=0.5, color_jitter=0.2)
    for attempt in range(1000):  # a decision whose crop holds the point well inside
        d = G.sample_decision(k, 0, attempt, (W, H), cfg)
        px = rng.uniform(d.x0 + 0.15 * d.w, d.x0 + 0.85 * d.w) * W
        py = rng.uniform(d.y0 + 0.15 * d.h, d.y0 + 0.85 * d.h) * H
        if d.flip == bool(k % 2):
            break
    # a bright 5x5 blob centered on pixel (cx, cy); its center in continuous coords is cx+0.5
    cx, cy = int(px), int(py)
    img = np.zeros((H, W, 3), np.uint8)
    img[cy - 2:cy + 3, cx - 2:cx + 3] = 255
    point = np.array([[(cx + 0.5) / W, (cy + 0.5) / H]], np.float32)
    out = G.apply_to_image(Image.fromarray(img), d, S)
    moved = G.apply_to_points(point, d)[0] * S          # output continuous pixel coords
    gx, gy = bright_centroid(out)                         # pixel-index centroid
    assert abs((gx + 0.5) - moved[0]) < 0.75, (d, gx, moved)
    assert abs((gy + 0.5) - moved[1]) < 0.75, (d, gy, moved)


def test_flip_swaps_left_and_right_words():
    cap, spans = G.swap_left_right("The Left dog, top-left of the right cat; leftover RIGHT.")
    assert cap == "The Right dog, top-right of the left cat; leftover LEFT."
    assert len(spans) == 4
    assert G.swap_left_right("no sides here") == ("no sides here", [])


def test_flip_retokenizes_and_keeps_windows():
    from loctex.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["a dog at the left and a cat at the right"] * 20, vocab_size=120)
    caption = "A dog at the left and a cat at the right."
    enc = tok.encode(caption, add_special_tokens=False)
    words = [caption[s:e].lower() for s, e in enc.offsets]
    windows = np.array([[i, i + 0.5] for i in range(len(words))], np.float32)
    ids, chars, win = G.flip_caption_tokens(caption, np.array(enc.offsets), windows, tok)
    new_caption = "A dog at the right and a cat at the left."
    assert [new_caption[s:e].lower() for s, e in chars] == \
        [{"left": "right", "right": "left"}.get(w, w) for w in words]
    assert ids.tolist() == tok.encode(new_caption, add_special_tokens=False).ids
    np.testing.assert_array_equal(win, windows)  # same word positions -> same windows


def test_color_jitter_identity_and_range():
    import torch
    x = torch.rand(3, 8, 8)
    y = G.color_jitter_(x.clone(), G.IDENTITY)
    assert torch.equal(x, y)
    d = G.Decision(brightness=1.3, contrast=0.7, saturation=1.2)
    z = G.color_jitter_(x.clone(), d)
    assert z.min() >= 0 and z.max() <= 1 and not torch.equal(z, x)


def test_reduced_size_jpeg_decode_matches_full_decode(tmp_path):
    from loctex.data.dataset import load_image
    W, H, S = 640, 480, 96
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx * 255 // W), (yy * 255 // H), ((xx + yy) * 255 // (W + H))], -1)
    img = (img * 0.2).astype(np.uint8)  # dark, so the blob is what bright_centroid sees
    cx, cy = 301, 222
    img[cy - 6:cy + 7, cx - 6:cx + 7] = 255
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    import simplejpeg
    data = path.read_bytes()
    for d in (G.Decision(x0=0.25, y0=0.2, w=0.6, h=0.6, flip=True),
              G.Decision(x0=0.3, y0=0.25, w=0.41, h=0.45),       # a 3/8-scale decode
              G.Decision(x0=0.35, y0=0.35, w=0.25, h=0.25, flip=True)):  # 7/8
        need = (int(np.ceil(S / d.w)), int(np.ceil(S / d.h)))
        assert simplejpeg.decode_jpeg(data, min_width=need[0], min_height=need[1]).shape[1] < W
        fast = np.asarray(load_image(path, d, S, reduced_decode=True), np.float64)
        full = np.asarray(load_image(path, d, S, reduced_decode=False), np.float64)
        psnr = 10 * np.log10(255 ** 2 / np.mean((fast - full) ** 2))
        assert psnr > 28, (d, psnr)
        point = np.array([[(cx + 0.5) / W, (cy + 0.5) / H]], np.float32)
        moved = G.apply_to_points(point, d)[0] * S
        gx, gy = bright_centroid(Image.fromarray(fast.astype(np.uint8)))
        assert abs(gx + 0.5 - moved[0]) < 0.75 and abs(gy + 0.5 - moved[1]) < 0.75, (d, gx, gy)
    # a PNG goes through PIL and lands the same way
    Image.fromarray(img).save(tmp_path / "big.png")
    d = G.Decision(x0=0.25, y0=0.2, w=0.6, h=0.6, flip=True)
    png = np.asarray(load_image(tmp_path / "big.png", d, S), np.float64)
    gx, gy = bright_centroid(Image.fromarray(png.astype(np.uint8)))
    moved = G.apply_to_points(np.array([[(cx + 0.5) / W, (cy + 0.5) / H]], np.float32), d)[0] * S
    assert abs(gx + 0.5 - moved[0]) < 0.75 and abs(gy + 0.5 - moved[1]) < 0.75
