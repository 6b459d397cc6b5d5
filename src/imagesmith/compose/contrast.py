"""Colour contrast as WCAG 2.x defines it, and contrast measured on rendered pixels.

``contrast_ratio`` is the textbook formula on two colours. ``measured_contrast`` is what an ad is judged by:
it reads the colours back from the final image, so anti-aliasing, scrims, buttons and busy backgrounds are
all accounted for. Both use the same worst-case definition as the typesetter's colour choice
(:func:`worst_case_contrast`), so what the typesetter aims for is what the check measures."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

import cv2
import numpy as np
from PIL import Image

from ..core.errors import BadRequest

RGB = tuple[int, int, int]
ColorLike = Union[str, Sequence[int], np.ndarray]

# percentiles of the background luminance the text is checked against: the darkest 10 % and the
# brightest 10 % of what lies around the glyphs; a single speck does not decide, a textured half does
BACKGROUND_PERCENTILES = (10.0, 90.0)
# the AA fringe of glyphs is ~1 px; the background is read beyond it
_FRINGE_PX = 2
_HEX = re.compile(r"#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def relative_luminance(rgb: ColorLike) -> float | np.ndarray:
    """WCAG 2.x relative luminance of sRGB colour(s) given as 0-255 values: a float for one colour
    (tuple or hex string), an array of shape ``rgb.shape[:-1]`` for an array of colours.

    Linearisation uses the sRGB threshold 0.04045 (WCAG's 0.03928 is a typo of it; no 8-bit value
    falls between the two, so results are identical)."""
    if isinstance(rgb, str):
        rgb = parse_hex(rgb)
    arr = np.asarray(rgb, dtype=np.float64)
    if arr.shape[-1:] != (3,):
        raise ValueError(f"expected RGB triples, got an array of shape {arr.shape}")
    c = arr / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = lin @ np.array([0.2126, 0.7152, 0.0722])
    return float(lum) if lum.ndim == 0 else lum


def contrast_from_luminance(l1: float, l2: float) -> float:
    """(lighter + 0.05) / (darker + 0.05): 1 (same) to 21 (black on white)."""
    hi, lo = (l1, l2) if l1 >= l2 else (l2, l1)
    return float((hi + 0.05) / (lo + 0.05))


def contrast_ratio(c1: ColorLike, c2: ColorLike) -> float:
    """WCAG contrast ratio of two colours (RGB 0-255 triples or hex strings), always >= 1."""
    return contrast_from_luminance(float(relative_luminance(c1)), float(relative_luminance(c2)))


def parse_hex(s: str) -> RGB:
    """``#rgb`` or ``#rrggbb`` (the ``#`` may be left out) -> (r, g, b). Anything else -> BadRequest."""
    if not isinstance(s, str) or not _HEX.fullmatch(s.strip()):
        raise BadRequest(f"brand colour '{s}' is not a hex colour like #1a2b3c")
    h = s.strip().lstrip("#")
    if len(h) == 3:
        h = "".join(ch * 2 for ch in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def to_hex(rgb: ColorLike) -> str:
    """(r, g, b) 0-255 (floats are rounded and clipped) -> ``#rrggbb`` (lower case)."""
    if isinstance(rgb, str):
        rgb = parse_hex(rgb)
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in list(rgb)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def percentiles(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """``np.percentile(values, qs)`` (linear interpolation), via partial sorts: ~100x faster for the few
    thousand values the colour search evaluates again and again."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v)
    if n == 0:
        raise ValueError("percentiles of an empty set")
    pos = [q / 100.0 * (n - 1) for q in qs]
    kth = sorted({int(np.floor(p)) for p in pos} | {int(np.ceil(p)) for p in pos})
    part = np.partition(v, kth)
    out = []
    for p in pos:
        lo, hi = int(np.floor(p)), int(np.ceil(p))
        out.append(float(part[lo] + (part[hi] - part[lo]) * (p - lo)))
    return out


def worst_case_contrast(text_rgb: ColorLike, background: np.ndarray) -> float:
    """Contrast of one text colour against a set of background pixels (N x 3, 0-255), worst case: the
    lower of its contrast with the 10th and with the 90th percentile of the background luminance."""
    text_l = float(relative_luminance(text_rgb))
    bg = np.asarray(background, dtype=np.float64).reshape(-1, 3)
    if bg.size == 0:
        raise ValueError("no background pixels to measure contrast against")
    lo, hi = percentiles(relative_luminance(bg), BACKGROUND_PERCENTILES)
    return min(contrast_from_luminance(text_l, float(lo)), contrast_from_luminance(text_l, float(hi)))


def _morph(mask: np.ndarray, px: int, op: str) -> np.ndarray:
    if px <= 0:
        return mask.copy()
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    fn = cv2.erode if op == "erode" else cv2.dilate
    return fn(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def measured_contrast(image: Image.Image, text_mask: np.ndarray, box: Sequence[int]) -> float:
    """Contrast of rendered text, read back from ``image`` (RGB) inside ``box`` (x0, y0, x1, y1).

    Definition (the one every contrast number in an ad manifest uses):

    - text colour: the median colour of the glyph *core*, the mask (``text_mask``, True where glyph
      coverage >= 50 %) eroded by 1 px, so anti-aliased edges do not dilute it; small text has strokes
      too thin to keep a core (under 15 % of the mask survives), and then the tenth of the mask's
      pixels farthest in luminance from the background's median stands in for it (the fully inked
      pixels; the rest are edge blends);
    - background: every pixel of ``box`` outside the mask dilated by 2 px (past the anti-aliasing fringe);
      if glyphs are packed so tightly that too few remain, the dilation shrinks to 1 px, then 0;
    - the result is the worst case: the lower of the text colour's WCAG contrast with the 10th and with
      the 90th percentile of the background luminance (:func:`worst_case_contrast`).
    """
    w, h = image.size
    mask = np.asarray(text_mask, dtype=bool)
    if mask.shape != (h, w):
        raise ValueError(f"text mask is {mask.shape[::-1]}, the image {w}x{h}")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"measurement box {tuple(box)} lies outside the {w}x{h} image")
    # work on the box plus a border, so erosion/dilation near the box edge sees the real neighbours
    pad = _FRINGE_PX + 1
    X0, Y0, X1, Y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    sub_mask = mask[Y0:Y1, X0:X1]
    sub_rgb = np.asarray(image.crop((X0, Y0, X1, Y1)).convert("RGB"))
    inside = np.zeros(sub_mask.shape, bool)
    inside[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = True
    glyph = sub_mask & inside
    if not glyph.any():
        raise ValueError("no text pixels inside the measurement box")
    background = np.zeros(0)
    for px in (_FRINGE_PX, 1, 0):
        bg_sel = inside & ~_morph(sub_mask, px, "dilate")
        if bg_sel.sum() >= 16 or (px == 0 and bg_sel.any()):
            background = sub_rgb[bg_sel]
            break
    if background.size == 0:
        raise ValueError("no background pixels around the text inside the measurement box")
    core = _morph(sub_mask, 1, "erode") & inside
    if core.sum() >= max(4, 0.15 * glyph.sum()):
        text_pixels = sub_rgb[core]
    else:
        ink = sub_rgb[glyph].reshape(-1, 3)
        ink_l = relative_luminance(ink)
        bg_l = float(np.median(relative_luminance(background.reshape(-1, 3))))
        distance = np.abs(ink_l - bg_l)
        text_pixels = ink[distance >= percentiles(distance, (90.0,))[0]]
    text_rgb = np.median(text_pixels.reshape(-1, 3), axis=0)
    return worst_case_contrast(text_rgb, background)
