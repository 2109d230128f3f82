"""JPEG validation: the checks that keep a corrupt or truncated file from killing a run (DESIGN §2.2).

Two levels, because they cost very different amounts:

* :func:`check_structure` walks the marker segments up to the scan, checks that the entropy-coded
  data holds only legal markers and that the file ends with EOI. It reads bytes only (tens of µs for
  a COCO-sized file), so the DALI sample source runs it on every sample before a GPU decoder sees it.
* :func:`check_jpeg` adds a strict trial decode at 1/8 scale (libjpeg-turbo through simplejpeg,
  which still entropy-decodes every block). ``loctex prepare`` runs it once per image.

Both return ``None`` for a good file and a short reason string otherwise; neither raises.

Strict decoding (:func:`decode_strict`) is what the torch data set uses too: libjpeg recovers from
corrupt scan data with a warning and paints the rest of the image grey, which would train as a real
picture. A warning therefore makes the image unreadable (:class:`BadImage`), like a decode error.
"""
from __future__ import annotations

import re

import numpy as np

# Markers that carry no length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}
_ILLEGAL_IN_SCAN = re.compile(
    rb"\xff[^\x00\xd0-\xd7\xff\xc4\xdb\xda\xdd\xdc\xfe\xe0-\xef\xcc\xd9]")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImage(ValueError):
    """An image that cannot be decoded; the message is the reason that gets counted."""


def _as_bytes(data) -> bytes | memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    return data


def jpeg_size(data) -> tuple[int, int]:
    """(width, height) from the SOF segment; raises :class:`BadImage`."""
    info = _walk(_as_bytes(data))
    if isinstance(info, str):
        raise BadImage(info)
    return info[0], info[1]


def _walk(buf) -> tuple[int, int, int] | str:
    """Walk the header segments: (width, height, offset of the scan data) or a reason string."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return "not a JPEG (no SOI marker)"
    pos, size = 2, None
    while True:
        # Fill bytes (0xFF repeated) may precede a marker.
        while pos < n and buf[pos] == 0xFF and pos + 1 < n and buf[pos + 1] == 0xFF:
            pos += 1
        if pos + 4 > n:
            return "truncated header"
        if buf[pos] != 0xFF:
            return f"bad marker at byte {pos}"
        marker = buf[pos + 1]
        if marker in _STANDALONE:
            if marker == 0xD9:
                return "EOI before any scan"
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return "truncated header segment"
        if marker in _SOF:
            if length < 8:
                return "bad SOF segment"
            h = (buf[pos + 5] << 8) | buf[pos + 6]
            w = (buf[pos + 7] << 8) | buf[pos + 8]
            if w == 0 or h == 0:
                return "zero image size"
            size = (w, h)
        if marker == 0xDA:  # SOS: entropy-coded data follows the segment
            if size is None:
                return "scan before SOF"
            return size[0], size[1], pos + 2 + length
        pos += 2 + length


def check_structure(data) -> str | None:
    """Cheap byte-level check (no decode). ``None`` when the file looks complete and well formed."""
    buf = _as_bytes(data)
    info = _walk(buf)
    return info if isinstance(info, str) else _check_scan(buf, info[2])


def _check_scan(buf, scan_start: int) -> str | None:
    """The entropy-coded part of :func:`check_structure`, from the scan's first byte."""
    # Inside entropy-coded data 0xFF is followed only by a stuffed 0x00, RSTn or fill 0xFF, or by
    # the markers that separate progressive scans (DHT, DQT, SOS, DRI, DNL, APPn, COM); the first
    # EOI ends the image (bytes after it are ignored, as decoders do). No EOI: truncated.
    raw = buf if isinstance(buf, (bytes, bytearray)) else bytes(buf)
    if len(raw) - scan_start < 8192:  # small files: C-level find + one regex pass are cheapest
        eoi = raw.find(b"\xff\xd9", scan_start)
        if eoi < 0:
            return "truncated (no EOI marker)"
        m = _ILLEGAL_IN_SCAN.search(raw, scan_start, eoi + 1)
        bad = None if m is None else m.start()
    else:  # large files: vectorized over the 0xFF bytes
        scan = np.frombuffer(raw, np.uint8, offset=scan_start)
        ff = np.flatnonzero(scan[:-1] == 0xFF)
        nxt = scan[ff + 1]
        eoi = np.flatnonzero(nxt == 0xD9)
        if eoi.size == 0:
            return "truncated (no EOI marker)"
        ff, nxt = ff[:eoi[0]], nxt[:eoi[0]]
        legal = ((nxt == 0x00) | ((nxt >= 0xD0) & (nxt <= 0xD7)) | (nxt == 0xFF)
                 | (nxt == 0xC4) | (nxt == 0xDB) | (nxt == 0xDA) | (nxt == 0xDD) | (nxt == 0xDC)
                 | (nxt == 0xFE) | ((nxt >= 0xE0) & (nxt <= 0xEF)) | (nxt == 0xCC))
        bad = None if legal.all() else int(ff[np.argmin(legal)]) + scan_start
    if bad is not None:
        return f"corrupt scan data (marker 0xFF{raw[bad + 1]:02X} at byte {bad})"
    return None


def decode_strict(data, min_width: int = 0, min_height: int = 0) -> np.ndarray | None:
    """Decode a JPEG with libjpeg-turbo (simplejpeg) at the smallest DCT scale N/8 that keeps at
    least ``min_width`` x ``min_height`` pixels: RGB uint8 [H, W, 3]. Raises :class:`BadImage` on
    a decode error *or warning* (corrupt scan data); returns None when libjpeg-turbo's TurboJPEG
    API cannot take the JPEG's colour format (CMYK, unusual subsampling), for PIL to decode."""
    import simplejpeg
    try:
        return simplejpeg.decode_jpeg(bytes(_as_bytes(data)), colorspace="RGB", strict=True,
                                      min_width=min_width, min_height=min_height)
    except (ValueError, RuntimeError) as exc:
        if _unsupported_format(exc):
            return None
        raise BadImage(f"decode failed ({exc})") from None


def _unsupported_format(exc: Exception) -> bool:
    text = str(exc).lower()
    return "colorspace" in text or "subsampling" in text


def check_jpeg(data, trial_decode: bool = True) -> str | None:
    """:func:`check_structure`, then a strict reduced-size trial decode. ``None`` when good."""
    buf = _as_bytes(data)
    info = _walk(buf)  # once: the structure check and the decode size both come from it
    if isinstance(info, str):
        return info
    reason = _check_scan(buf, info[2])
    if reason is not None or not trial_decode:
        return reason
    w, h = info[0], info[1]
    try:
        arr = decode_strict(buf, min_width=max(1, w // 8), min_height=max(1, h // 8))
    except BadImage as exc:
        return str(exc)
    return _trial_decode_pil(data) if arr is None else None


def _trial_decode_pil(data) -> str | None:
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(bytes(_as_bytes(data)))) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as exc:  # noqa: BLE001
        return f"decode failed ({exc})"
    return None


def check_image_bytes(data: bytes, level: str = "structure") -> str | None:
    """What ``loctex prepare --check-images`` runs on each image's bytes: ``header`` (nothing
    beyond the size read), ``structure`` (:func:`check_structure` on the whole file) or ``decode``
    (plus the trial decode). Non-JPEG files pass unless ``decode`` (then PIL must load them).
    ``None`` when good."""
    if level == "header":
        return None
    if data[:2] != b"\xff\xd8":
        return _trial_decode_pil(data) if level == "decode" else None
    return check_jpeg(data, trial_decode=(level == "decode"))
