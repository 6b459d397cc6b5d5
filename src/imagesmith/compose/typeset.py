"""Typesetting ad copy onto a finished scene: fonts that cover the text (Latin and Korean), auto-fitted
sizes, word wrapping, a position chosen from measured maps, and colours whose contrast is measured on
the rendered pixels and guaranteed (WCAG AA, >= 4.5:1).

How one call goes:

1. fonts: NanumGothic (from the installed ``koreanize_matplotlib`` package, located, never imported)
   covers Latin and Hangul; DejaVuSans is the Latin-only fallback. Text no font covers -> BadRequest.
2. fit: the largest headline size for which headline, subline (0.5x) and CTA (0.45x, in a button) fit
   the copy area, stacked, or for wide areas with the button beside the text. When even the minimum
   size cannot hold everything, the subline is left out, then the CTA; the headline never is: if it
   cannot fit, BadRequest says so and why.
3. position: among top/middle/bottom x left/centre spots in the area, the one whose pixels have the
   lowest mean saliency (when given) plus normalised Sobel gradient: text goes where the scene is calm.
4. colour: the first of (brand colour, white, #111111, the image's own best palette colour) reaching the
   target contrast against the pixels under the text (worst case, as :func:`~.contrast.measured_contrast`
   defines it); failing all, a scrim (translucent rounded rectangle) goes under the text, just opaque
   enough. The CTA button is filled with the brand colour (or a colour standing out from the scene) and
   its label is white or black, whichever contrasts more.
5. check: every element's contrast is measured on the final pixels; any under 4.5 gets a stronger scrim
   (or button) and everything is rendered again.
"""

from __future__ import annotations

import importlib.util
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field, field_validator

from ..core.errors import BadRequest
from .contrast import RGB, contrast_ratio, measured_contrast, parse_hex, to_hex, worst_case_contrast

Weight = Literal["regular", "bold", "extrabold"]
Role = Literal["headline", "subline", "cta"]

MIN_CONTRAST = 4.5  # WCAG 2.x AA for normal text
# colours are chosen against this, above the guarantee: the pre-render estimate reads the whole box,
# the measurement only the pixels next to the glyphs
_AIM = 5.0
_NANUM_FILES: Mapping[str, str] = MappingProxyType(
    {"regular": "NanumGothic.ttf", "bold": "NanumGothicBold.ttf", "extrabold": "NanumGothicExtraBold.ttf"})
# Latin only: the fallback when NanumGothic is not installed
_DEJAVU_FILES: Mapping[str, str] = MappingProxyType(
    {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "extrabold": "DejaVuSans-Bold.ttf"})
_DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
_ROLE_WEIGHT: Mapping[str, str] = MappingProxyType({"headline": "extrabold", "subline": "regular", "cta": "bold"})
# size of each role relative to the headline
_ROLE_SCALE: Mapping[str, float] = MappingProxyType({"headline": 1.0, "subline": 0.5, "cta": 0.45})
_WHITE: RGB = (255, 255, 255)
_NEAR_BLACK: RGB = (17, 17, 17)
_BLACK: RGB = (0, 0, 0)
# a codepoint no font maps: what it renders is the font's .notdef glyph
_NOTDEF_PROBE = "\U0010ffff"
_PROBE_SIZE = 32


# ---------------------------------------------------------------------------------------------- fonts
def _nanum_dir() -> Path | None:
    """The fonts/ folder of the installed koreanize_matplotlib package, found without importing it (its
    __init__ needs matplotlib, which is not installed)."""
    try:
        spec = importlib.util.find_spec("koreanize_matplotlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "fonts"
        if folder.is_dir():
            return folder
    return None


def font_candidates(weight: Weight = "regular") -> list[Path]:
    """Installed fonts for ``weight``, best first: NanumGothic (Latin + Korean), then DejaVuSans (Latin)."""
    if weight not in _NANUM_FILES:
        raise BadRequest(f"unknown font weight '{weight}'; known: {', '.join(_NANUM_FILES)}")
    out: list[Path] = []
    nanum = _nanum_dir()
    if nanum is not None and (nanum / _NANUM_FILES[weight]).is_file():
        out.append(nanum / _NANUM_FILES[weight])
    if (_DEJAVU_DIR / _DEJAVU_FILES[weight]).is_file():
        out.append(_DEJAVU_DIR / _DEJAVU_FILES[weight])
    return out


def font_path(weight: Weight = "regular") -> Path:
    """The preferred installed font file for ``weight`` (NanumGothic, else DejaVuSans)."""
    found = font_candidates(weight)
    if not found:
        raise BadRequest("no font for ad copy is installed: install koreanize-matplotlib (NanumGothic, "
                         "`pip install --no-deps koreanize-matplotlib`) or the DejaVu fonts")
    return found[0]


@lru_cache(maxsize=128)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _glyph_signature(path: str, ch: str) -> tuple[tuple[int, int], bytes]:
    mask = _font(path, _PROBE_SIZE).getmask(ch)
    return mask.size, bytes(mask)


@lru_cache(maxsize=16)
def _notdef_signature(path: str) -> tuple[tuple[int, int], bytes]:
    return _glyph_signature(path, _NOTDEF_PROBE)


def _ignorable(ch: str) -> bool:
    """Whitespace and invisible format/control characters: nothing to draw, nothing to cover."""
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def missing_glyphs(path: Path | str, text: str) -> list[str]:
    """The characters of ``text`` that the font would draw as its .notdef box (tofu)."""
    p = str(path)
    notdef = _notdef_signature(p)
    return [ch for ch in dict.fromkeys(text) if not _ignorable(ch) and _glyph_signature(p, ch) == notdef]


def covers(path: Path | str, text: str) -> bool:
    """True when the font at ``path`` has a real glyph for every visible character of ``text``
    (a glyph whose rendering differs from the font's .notdef glyph)."""
    return not missing_glyphs(path, text)


def font_for(text: str, weight: Weight = "regular", *, role: str = "copy") -> Path:
    """The first installed font of ``weight`` covering ``text``; BadRequest naming the characters none
    can draw."""
    candidates = font_candidates(weight)
    if not candidates:
        font_path(weight)  # raises the 'no font installed' error
    for path in candidates:
        if covers(path, text):
            return path
    missing = "".join(missing_glyphs(candidates[0], text))
    raise BadRequest(f"no installed font can draw {missing!r} in the {role} '{text}' "
                     f"(fonts tried: {', '.join(p.name for p in candidates)})")


# --------------------------------------------------------------------------------------------- models
class CopySpec(BaseModel):
    """The words of one ad."""

    headline: str = Field(..., min_length=1, max_length=200)
    subline: str | None = Field(None, max_length=300)
    cta: str | None = Field(None, max_length=60, description="call-to-action button label")
    brand_color: str | None = Field(None, description="hex colour, #rgb or #rrggbb")

    @field_validator("headline", "subline", "cta")
    @classmethod
    def _squash_spaces(cls, v: str | None) -> str | None:
        return " ".join(v.split()) if v is not None else None

    @field_validator("brand_color")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        return to_hex(parse_hex(v)) if v is not None else None


class TextElement(BaseModel):
    """One piece of rendered copy, as placed (also what the HTML export re-creates)."""

    role: Role
    text: str
    lines: list[str]
    box: list[int] = Field(description="[x0, y0, x1, y1]: the element's box, padding (scrim/button) included")
    font_size: int
    font: str = Field(description="font file name, e.g. NanumGothicExtraBold.ttf")
    color: str
    background_color: str | None = Field(None, description="scrim or button colour, if any")
    background_opacity: float | None = Field(None, description="opacity of background_color (1 = solid)")
    contrast_ratio: float = Field(description="measured on the rendered pixels (see measured_contrast)")
    align: Literal["left", "center"] = "left"
    line_height: int = 0
    padding: list[int] = Field(default_factory=lambda: [0, 0], description="[x, y] between box and lines")
    radius: int = Field(0, description="corner radius of the scrim or button")


# --------------------------------------------------------------------------------------------- layout
@dataclass
class _Item:
    role: str
    text: str
    font: str
    size: int
    lines: list[str]
    line_w: list[int]
    line_h: int
    pad_x: int
    pad_y: int
    radius: int
    dx: int = 0  # offset inside the block
    dy: int = 0

    @property
    def width(self) -> int:
        return max(self.line_w) + 2 * self.pad_x

    @property
    def height(self) -> int:
        return len(self.lines) * self.line_h + 2 * self.pad_y


@dataclass
class _Plan:
    headline_size: int
    items: list[_Item]
    width: int
    height: int
    variant: str


@dataclass
class _Style:
    color: RGB
    bg: RGB | None = None
    opacity: float = 0.0


@dataclass
class _Misfit:
    role: str
    word: str
    word_w: int
    avail: int
    lines_h: int = 0


def _text_w(font: ImageFont.FreeTypeFont, s: str) -> int:
    left, _, right, _ = font.getbbox(s, anchor="ls")
    return int(math.ceil(max(font.getlength(s), right) - min(0, left)))


def _wrap(font: ImageFont.FreeTypeFont, text: str, max_w: int) -> tuple[list[str], list[int]] | tuple[str, int]:
    """Greedy wrap at spaces. Returns (lines, widths), or (word, width) for a word wider than max_w."""
    lines: list[str] = []
    widths: list[int] = []
    cur = ""
    for word in text.split(" "):
        ww = _text_w(font, word)
        if ww > max_w:
            return word, ww
        trial = f"{cur} {word}" if cur else word
        tw = _text_w(font, trial)
        if tw <= max_w or not cur:
            cur = trial
        else:
            lines.append(cur)
            widths.append(_text_w(font, cur))
            cur = word
    lines.append(cur)
    widths.append(_text_w(font, cur))
    return lines, widths


def _item(role: str, text: str, font: str, size: int, max_w: int) -> _Item | _Misfit:
    f = _font(font, size)
    if role == "cta":
        pad_x, pad_y = math.ceil(1.0 * size), math.ceil(0.45 * size)
        line_h = math.ceil(1.25 * size)
        w = _text_w(f, text)
        if w > max_w - 2 * pad_x:  # a button holds one line
            return _Misfit(role, text, w, max_w - 2 * pad_x)
        radius = int(round(0.35 * (line_h + 2 * pad_y)))
        return _Item(role, text, font, size, [text], [w], line_h, pad_x, pad_y, radius)
    pad_x, pad_y = max(2, math.ceil(0.3 * size)), max(1, math.ceil(0.1 * size))
    wrapped = _wrap(f, text, max_w - 2 * pad_x)
    if isinstance(wrapped[0], str):
        return _Misfit(role, wrapped[0], int(wrapped[1]), max_w - 2 * pad_x)
    lines, widths = wrapped
    return _Item(role, text, font, size, list(lines), list(widths), math.ceil(1.2 * size), pad_x, pad_y,
                 max(1, int(round(0.25 * size))))


def _role_size(role: str, h: int, min_px: int) -> int:
    return max(min_px, int(round(_ROLE_SCALE[role] * h)))


def _plan(h: int, texts: dict[str, str], fonts: dict[str, str], variant: str, aw: int, ah: int,
          min_px: int) -> _Plan | None:
    """Lay the elements out at headline size ``h``; None when they do not fit aw x ah."""
    items: dict[str, _Item] = {}
    cta: _Item | None = None
    col_w = aw
    if "cta" in texts:
        got = _item("cta", texts["cta"], fonts["cta"], _role_size("cta", h, min_px), aw)
        if isinstance(got, _Misfit):
            return None
        cta = got
        if variant == "row":
            col_w = aw - cta.width - max(2, round(0.5 * h))
    elif variant == "row":
        return None
    for role in ("headline", "subline"):
        if role in texts:
            got = _item(role, texts[role], fonts[role], _role_size(role, h, min_px), col_w)
            if isinstance(got, _Misfit):
                return None
            items[role] = got
    column = [items[r] for r in ("headline", "subline") if r in items]
    gap_hs = max(1, round(0.2 * h))
    gap_cta = max(2, round(0.35 * h))
    y = 0
    for i, it in enumerate(column):
        it.dy = y
        y += it.height + (gap_hs if i + 1 < len(column) else 0)
    col_h = y
    col_width = max(it.width for it in column)
    if cta is None:
        width, height = col_width, col_h
    elif variant == "stack":
        cta.dy = col_h + gap_cta
        width, height = max(col_width, cta.width), cta.dy + cta.height
        column.append(cta)
    else:
        gap_x = max(2, round(0.5 * h))
        height = max(col_h, cta.height)
        shift = (height - col_h) // 2
        for it in column:
            it.dy += shift
        cta.dx, cta.dy = col_width + gap_x, (height - cta.height) // 2
        width = cta.dx + cta.width
        column.append(cta)
    if width > aw or height > ah:
        return None
    return _Plan(h, column, width, height, variant)


def _best_plan(texts: dict[str, str], fonts: dict[str, str], aw: int, ah: int, min_px: int,
               max_px: int) -> _Plan | None:
    """The largest headline size that fits, over the stacked and the side-by-side (button beside the
    text, wide areas) variants; the stacked one wins unless the other is clearly bigger."""
    best: _Plan | None = None
    for variant in ("stack", "row"):
        if variant == "row" and ("cta" not in texts or aw < 2.5 * ah):
            continue
        lo, hi, found = min_px, max(min_px, max_px), None
        while lo <= hi:
            mid = (lo + hi) // 2
            p = _plan(mid, texts, fonts, variant, aw, ah, min_px)
            if p is not None:
                found, lo = p, mid + 1
            else:
                hi = mid - 1
        if found is not None and (best is None or found.headline_size > 1.15 * best.headline_size):
            best = found
    return best


def _does_not_fit(fmt_name: str, msg: str) -> BadRequest:
    where = f"the {fmt_name} format" if fmt_name else "the copy area"
    return BadRequest(f"copy does not fit {where}: {msg}")


# -------------------------------------------------------------------------------------------- position
def _calm_map(image: Image.Image, area: tuple[int, int, int, int], saliency: np.ndarray | None) -> np.ndarray:
    """Per-pixel cost over the area: normalised Sobel gradient plus normalised saliency (when given)."""
    x0, y0, x1, y1 = area
    gray = np.asarray(image.convert("L").crop(area), np.float32) / 255.0
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.sqrt(gx * gx + gy * gy)
    grad = np.clip(grad / 4.0, 0.0, 1.0)  # 4 = the largest Sobel response of a 0->1 step
    if saliency is None:
        return grad
    sal = np.asarray(saliency, np.float32)
    if sal.ndim == 3:
        sal = sal.mean(axis=2)
    if sal.shape != (image.height, image.width):
        sal = cv2.resize(sal, image.size, interpolation=cv2.INTER_LINEAR)
    top = float(sal.max())
    sal = sal / top if top > 0 else sal
    return grad + sal[y0:y1, x0:x1]


def _choose_origin(plan: _Plan, area: tuple[int, int, int, int], cost: np.ndarray, align: str) -> tuple[int, int, str]:
    """The block's top-left corner and alignment with the lowest mean cost."""
    x0, y0, x1, y1 = area
    aw, ah = x1 - x0, y1 - y0
    xs: list[tuple[int, str, float]] = []
    if align in ("auto", "left"):
        xs.append((0, "left", 0.02 if align == "auto" else 0.0))
    if align in ("auto", "center"):
        xs.append(((aw - plan.width) // 2, "center", 0.0))
    ys = sorted({0, (ah - plan.height) // 2, ah - plan.height})
    best = None
    for yi, oy in enumerate(ys):
        for ox, al, penalty in xs:
            c = float(cost[oy:oy + plan.height, ox:ox + plan.width].mean()) + penalty + 0.001 * yi
            if best is None or c < best[0]:
                best = (c, ox, oy, al)
    assert best is not None
    return x0 + best[1], y0 + best[2], best[3]


# ---------------------------------------------------------------------------------------------- colour
def _palette(image: Image.Image, n: int = 6) -> list[RGB]:
    small = image.convert("RGB").resize((64, 64), Image.BILINEAR)
    pal = small.quantize(colors=n, method=Image.Quantize.MEDIANCUT).getpalette() or []
    return [tuple(pal[i:i + 3]) for i in range(0, min(len(pal), 3 * n), 3)]  # type: ignore[misc]


def _sample(pixels: np.ndarray, n: int = 4096) -> np.ndarray:
    """At most ``n`` pixels, evenly strided (deterministic): percentiles need no more, and colour search
    over every pixel of a 1080 px headline box would cost seconds."""
    if len(pixels) <= n:
        return pixels
    return pixels[np.linspace(0, len(pixels) - 1, n).astype(np.int64)]


def _blend(pixels: np.ndarray, colour: RGB, opacity: float) -> np.ndarray:
    return pixels.astype(np.float32) * (1 - opacity) + np.asarray(colour, np.float32) * opacity


def _text_style(role: str, under: np.ndarray, brand: RGB | None, palette: Sequence[RGB]) -> _Style:
    """A text colour reaching _AIM against ``under`` on its own, else the lightest scrim that makes one."""
    best_pal = max(palette, key=lambda c: worst_case_contrast(c, under)) if palette else None
    plain: list[RGB] = [_WHITE, _NEAR_BLACK]
    if brand is not None:
        plain = [brand, *plain] if role == "headline" else [*plain, brand]
    candidates = plain + ([best_pal] if best_pal is not None else [])
    for c in candidates:
        if worst_case_contrast(c, under) >= _AIM:
            return _Style(c)
    options: list[tuple[float, int, _Style]] = []
    texts = ([brand] if brand is not None and role == "headline" else []) + [_WHITE, _NEAR_BLACK, _BLACK]
    for rank, text in enumerate(texts):
        for scrim in (_BLACK, _WHITE):
            if contrast_ratio(text, scrim) < _AIM + 0.5:
                continue
            for opacity in np.arange(0.3, 1.0001, 0.05):
                if worst_case_contrast(text, _blend(under, scrim, float(opacity))) >= _AIM:
                    # the brand colour wins unless it needs a much heavier scrim
                    options.append((float(opacity) + 0.1 * (rank > 0 and brand is not None and role == "headline"),
                                    rank, _Style(text, scrim, round(float(opacity), 2))))
                    break
    if options:
        return min(options, key=lambda o: (o[0], o[1]))[2]
    return _Style(_WHITE, _BLACK, 1.0)


def _button_style(under: np.ndarray, brand: RGB | None, palette: Sequence[RGB]) -> _Style:
    """Fill: the brand colour, else the candidate standing out most from the scene; label: white or
    black, whichever contrasts more with the fill (one of them always reaches 4.5)."""
    if brand is not None:
        fill = brand
    else:
        options = [_NEAR_BLACK, _WHITE, *palette]
        fill = max(options, key=lambda c: worst_case_contrast(c, under))
    label = max((_WHITE, _NEAR_BLACK, _BLACK), key=lambda c: (round(contrast_ratio(c, fill), 2) >= _AIM,
                                                               c != _BLACK, contrast_ratio(c, fill)))
    if contrast_ratio(label, fill) < MIN_CONTRAST:
        label = max((_WHITE, _BLACK), key=lambda c: contrast_ratio(c, fill))
    return _Style(label, fill, 1.0)


def _strengthen(role: str, style: _Style, under: np.ndarray) -> _Style:
    """The next stronger style after a failed measurement."""
    if role == "cta":
        fill = style.bg or _NEAR_BLACK
        best = max((_WHITE, _BLACK), key=lambda c: contrast_ratio(c, fill))
        if best != style.color:
            return _Style(best, fill, 1.0)
        return _Style(_WHITE, _BLACK, 1.0)
    if style.bg is None:
        dark = worst_case_contrast(_WHITE, under) >= worst_case_contrast(_BLACK, under)
        scrim = _BLACK if dark else _WHITE
        text = style.color if contrast_ratio(style.color, scrim) >= _AIM + 0.5 else (_WHITE if dark else _NEAR_BLACK)
        return _Style(text, scrim, 0.6)
    if style.opacity < 1.0:
        return _Style(style.color, style.bg, min(1.0, round(style.opacity + 0.2, 2)))
    return _Style(_WHITE, _BLACK, 1.0) if style.color != _WHITE else _Style(_BLACK, _WHITE, 1.0)


# ---------------------------------------------------------------------------------------------- render
def _render(base: Image.Image, placed: list[tuple[_Item, tuple[int, int, int, int], str]],
            styles: list[_Style]) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw every element (scrim or button, then its text) on a copy of ``base``; each element only
    touches its own box. Returns the image and per element its glyph mask (coverage >= 50 %)."""
    img = base.copy()
    masks: list[np.ndarray] = []
    for (item, box, align), style in zip(placed, styles):
        bw, bh = box[2] - box[0], box[3] - box[1]
        local = img.crop(box)
        if style.bg is not None and style.opacity > 0:
            shape = Image.new("L", (bw, bh), 0)
            ImageDraw.Draw(shape).rounded_rectangle((0, 0, bw - 1, bh - 1), radius=item.radius,
                                                    fill=int(round(255 * min(1.0, style.opacity))))
            local.paste(Image.new("RGB", (bw, bh), style.bg), (0, 0), shape)
        font = _font(item.font, item.size)
        cover = Image.new("L", (bw, bh), 0)
        draw, cdraw = ImageDraw.Draw(local), ImageDraw.Draw(cover)
        for i, line in enumerate(item.lines):
            cy = item.pad_y + i * item.line_h + item.line_h / 2
            if align == "center" or item.role == "cta":
                xy, anchor = (bw / 2, cy), "mm"
            else:
                xy, anchor = (item.pad_x, cy), "lm"
            draw.text(xy, line, font=font, fill=style.color, anchor=anchor)
            cdraw.text(xy, line, font=font, fill=255, anchor=anchor)
        img.paste(local, box[:2])
        mask = np.zeros((img.height, img.width), bool)
        mask[box[1]:box[3], box[0]:box[2]] = np.asarray(cover) >= 128
        masks.append(mask)
    return img, masks


def _measure_box(item: _Item, box: tuple[int, int, int, int], mask: np.ndarray) -> tuple[int, int, int, int]:
    """Ink bounding box grown by a margin, kept inside the element box (and, for a button, inside its
    straight middle, clear of the rounded corners)."""
    ys, xs = np.nonzero(mask[box[1]:box[3], box[0]:box[2]])
    e = max(2, round(0.2 * item.size))
    x0, x1 = box[0] + int(xs.min()) - e, box[0] + int(xs.max()) + 1 + e
    y0, y1 = box[1] + int(ys.min()) - e, box[1] + int(ys.max()) + 1 + e
    inset = item.radius if item.role == "cta" else 0
    return max(box[0] + inset, x0), max(box[1], y0), min(box[2] - inset, x1), min(box[3], y1)


def typeset(image: Image.Image, copy: CopySpec, area: Sequence[int], *, saliency: np.ndarray | None = None,
            fmt_name: str = "", min_font_px: int = 10, max_font_px: int | None = None,
            align: Literal["auto", "left", "center"] = "auto",
            ) -> tuple[Image.Image, list[TextElement], list[np.ndarray]]:
    """Render ``copy`` inside ``area`` (x0, y0, x1, y1) of ``image``; nothing outside the area changes.

    Returns the new image, one :class:`TextElement` per rendered element (headline, then subline and CTA
    when they fit) and per element its glyph mask (bool H x W, coverage >= 50 %). Every element's
    ``contrast_ratio`` is measured on the returned pixels and is >= 4.5."""
    if align not in ("auto", "left", "center"):
        raise BadRequest(f"unknown text alignment '{align}'; known: auto, left, center")
    if min_font_px < 6:
        raise BadRequest(f"minimum font size must be at least 6 px, got {min_font_px}")
    base = image.convert("RGB")
    W, H = base.size
    ax0, ay0 = max(0, int(area[0])), max(0, int(area[1]))
    ax1, ay1 = min(W, int(area[2])), min(H, int(area[3]))
    aw, ah = ax1 - ax0, ay1 - ay0
    if aw < min_font_px or ah < min_font_px:
        raise _does_not_fit(fmt_name, f"the copy area {aw}x{ah} px is smaller than the minimum font size")
    brand = parse_hex(copy.brand_color) if copy.brand_color else None

    texts: dict[str, str] = {"headline": " ".join(copy.headline.split())}
    for role in ("subline", "cta"):
        value = getattr(copy, role)
        if value and value.split():
            texts[role] = " ".join(value.split())
    if not texts["headline"]:
        raise BadRequest("the headline is empty")
    fonts = {role: str(font_for(text, _ROLE_WEIGHT[role], role=role)) for role, text in texts.items()}  # type: ignore[arg-type]

    # the headline alone must fit at the minimum size, else say exactly why
    alone = _item("headline", texts["headline"], fonts["headline"], min_font_px, aw)
    if isinstance(alone, _Misfit):
        raise _does_not_fit(fmt_name, f"headline '{alone.word}' needs {alone.word_w} px at the minimum font size "
                            f"({min_font_px} px) but the copy area leaves {alone.avail} px")
    if alone.height > ah:
        raise _does_not_fit(fmt_name, f"headline '{texts['headline']}' needs {len(alone.lines)} lines "
                            f"({alone.height} px) at the minimum font size ({min_font_px} px) but the copy area "
                            f"is {ah} px tall")
    cap = max_font_px if max_font_px is not None else max(min_font_px, round(0.09 * max(W, H)))
    plan = None
    for drop in ((), ("subline",), ("cta",), ("subline", "cta")):
        if any(r not in texts for r in drop):
            continue
        subset = {r: t for r, t in texts.items() if r not in drop}
        plan = _best_plan(subset, fonts, aw, ah, min_font_px, cap)
        if plan is not None:
            break
    assert plan is not None  # the headline alone fits (checked above)

    cost = _calm_map(base, (ax0, ay0, ax1, ay1), saliency)
    bx, by, block_align = _choose_origin(plan, (ax0, ay0, ax1, ay1), cost, align)
    placed: list[tuple[_Item, tuple[int, int, int, int], str]] = []
    for it in plan.items:
        if block_align == "center" and not (plan.variant == "row" and it.role == "cta"):
            if plan.variant == "row":
                col_w = max(i.width for i in plan.items if i.role != "cta")
                x = bx + (col_w - it.width) // 2
            else:
                x = bx + (plan.width - it.width) // 2
        else:
            x = bx + it.dx
        y = by + it.dy
        placed.append((it, (x, y, x + it.width, y + it.height), block_align))

    arr = np.asarray(base)
    palette = _palette(base)
    unders = [_sample(arr[b[1]:b[3], b[0]:b[2]].reshape(-1, 3)) for _, b, _ in placed]
    styles = [_button_style(u, brand, palette) if it.role == "cta" else _text_style(it.role, u, brand, palette)
              for (it, _, _), u in zip(placed, unders)]

    for _ in range(8):
        out, masks = _render(base, placed, styles)
        measured = [measured_contrast(out, m, _measure_box(it, b, m)) for (it, b, _), m in zip(placed, masks)]
        failing = [i for i, c in enumerate(measured) if c < MIN_CONTRAST]
        if not failing:
            break
        for i in failing:
            styles[i] = _strengthen(placed[i][0].role, styles[i], unders[i])
    else:
        raise RuntimeError("typesetting could not reach 4.5:1 contrast even on solid backgrounds: compose bug")

    elements = [
        TextElement(role=it.role, text=it.text, lines=list(it.lines), box=list(b), font_size=it.size,
                    font=Path(it.font).name, color=to_hex(st.color),
                    background_color=to_hex(st.bg) if st.bg is not None else None,
                    background_opacity=st.opacity if st.bg is not None else None,
                    contrast_ratio=math.floor(c * 100) / 100,
                    align="center" if (al == "center" or it.role == "cta") else "left",
                    line_height=it.line_h, padding=[it.pad_x, it.pad_y],
                    radius=it.radius if st.bg is not None else 0)
        for (it, b, al), st, c in zip(placed, styles, measured)
    ]
    return out, elements, masks
