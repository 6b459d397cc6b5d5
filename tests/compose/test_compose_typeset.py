"""Typesetting: fonts that cover the copy, fitting, and contrast measured on the rendered pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesmith.compose.contrast import contrast_ratio, measured_contrast, parse_hex
from imagesmith.compose.formats import FORMATS
from imagesmith.compose.placement import place_product
from imagesmith.compose.typeset import (CopySpec, TextElement, _font, covers, font_for, font_path,
                                        missing_glyphs, typeset)
from imagesmith.core.errors import BadRequest

COPY = CopySpec(headline="Summer Glow Serum", subline="Light, fresh, made to last all day", cta="Shop now")
KOREAN = "신제품 출시 기념 할인"


def noise(size, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pale(size) -> Image.Image:
    return Image.new("RGB", size, (238, 236, 229))


def remeasure(img: Image.Image, el: TextElement, mask: np.ndarray) -> float:
    """An independent reading: the element's whole box (corners of buttons excluded)."""
    x0, y0, x1, y1 = el.box
    inset = el.radius if el.role == "cta" else 0
    return measured_contrast(img, mask, (x0 + inset, y0, x1 - inset, y1))


def check_inside(img, base, elements, masks, area):
    ax0, ay0, ax1, ay1 = area
    out, ref = np.asarray(img), np.asarray(base)
    outside = np.ones(out.shape[:2], bool)
    outside[ay0:ay1, ax0:ax1] = False
    assert np.array_equal(out[outside], ref[outside]), "pixels outside the copy area changed"
    for el, mask in zip(elements, masks):
        x0, y0, x1, y1 = el.box
        assert ax0 <= x0 < x1 <= ax1 and ay0 <= y0 < y1 <= ay1, el
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0 and x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, el.role


def test_fonts_are_found_and_korean_never_renders_as_tofu():
    for weight in ("regular", "bold", "extrabold"):
        assert font_path(weight).is_file()
    path = font_for(KOREAN, "extrabold")
    assert path.name.startswith("NanumGothic") and covers(path, KOREAN)
    font = _font(str(path), 32)
    notdef = font.getmask("\U0010ffff")
    notdef_sig = (notdef.size, bytes(notdef))
    glyphs = {ch: (font.getmask(ch).size, bytes(font.getmask(ch))) for ch in KOREAN if ch != " "}
    assert all(sig != notdef_sig for sig in glyphs.values())
    assert len(set(glyphs.values())) == len(glyphs)  # every syllable is its own drawing
    # DejaVu (the Latin fallback) has no Hangul: the check notices
    dejavu = [p for p in font_path("regular").parent.parent.glob("**/DejaVuSans.ttf")]
    if dejavu:
        assert not covers(dejavu[0], KOREAN)
        assert "신" in missing_glyphs(dejavu[0], KOREAN)


def test_korean_headline_is_typeset_with_nanum():
    area = (20, 20, 1060, 400)
    img, elements, masks = typeset(pale((1080, 1080)), CopySpec(headline=KOREAN, cta="구매하기"), area,
                                   fmt_name="1:1")
    head = elements[0]
    assert head.role == "headline" and head.font.startswith("NanumGothic") and " ".join(head.lines) == KOREAN
    assert masks[0].sum() > 500 and head.contrast_ratio >= 4.5


def test_uncoverable_text_is_a_bad_request():
    with pytest.raises(BadRequest, match="no installed font"):
        typeset(pale((400, 200)), CopySpec(headline="Sale \U00010000\U00010001"), (0, 0, 400, 200))


def test_busy_background_gets_a_scrim_and_every_element_measures_at_least_4_5():
    fmt = FORMATS["1:1"]
    base = noise(fmt.size)
    area = place_product(fmt, (100, 300)).copy_area
    img, elements, masks = typeset(base, COPY, area, fmt_name=fmt.name)
    assert [e.role for e in elements] == ["headline", "subline", "cta"]
    for el, mask in zip(elements, masks):
        assert el.background_color is not None, el.role  # scrim or button
        assert el.contrast_ratio >= 4.5
        assert remeasure(img, el, mask) >= 4.5
    check_inside(img, base, elements, masks, area)
    head, sub = elements[0], elements[1]
    assert head.font_size > sub.font_size > 0 and abs(sub.font_size - head.font_size / 2) <= 1


def test_pale_flat_background_gets_dark_text_and_no_scrim():
    fmt = FORMATS["4:5"]
    base = pale(fmt.size)
    area = place_product(fmt, (100, 300)).copy_area
    img, elements, masks = typeset(base, CopySpec(headline="Summer Glow Serum", subline="Fresh all day"), area)
    for el, mask in zip(elements, masks):
        assert el.background_color is None and el.background_opacity is None
        assert contrast_ratio(el.color, (0, 0, 0)) < 1.5  # dark
        assert el.contrast_ratio >= 12
        assert remeasure(img, el, mask) >= 12
    check_inside(img, base, elements, masks, area)


def test_brand_colour_is_used_when_it_has_contrast():
    base = pale((1080, 1080))
    area = (65, 65, 1015, 400)
    _, elements, _ = typeset(base, COPY.model_copy(update={"brand_color": "#1a3c8f"}), area)
    head, cta = elements[0], elements[-1]
    assert head.color == "#1a3c8f" and head.background_color is None
    assert cta.role == "cta" and cta.background_color == "#1a3c8f" and cta.color == "#ffffff"
    # a pale yellow brand colour cannot be read on a pale scene: not used for the text, still the button
    _, elements, masks = typeset(base, COPY.model_copy(update={"brand_color": "#ffe680"}), area)
    head, cta = elements[0], elements[-1]
    assert head.color != "#ffe680" and head.contrast_ratio >= 4.5
    assert cta.background_color == "#ffe680" and contrast_ratio(cta.color, parse_hex("#ffe680")) >= 4.5
    assert cta.contrast_ratio >= 4.5


def test_text_goes_where_the_scene_is_calm():
    """Noise on the top half, flat below: the block lands low in the area."""
    base = pale((1080, 1080))
    arr = np.asarray(base).copy()
    arr[:300] = np.asarray(noise((1080, 300), seed=3))
    base = Image.fromarray(arr)
    area = (40, 40, 1040, 700)
    _, elements, _ = typeset(base, CopySpec(headline="Calm place"), area, max_font_px=80)
    assert elements[0].box[1] >= 300


def test_wide_banners_fit_or_drop_the_extras_but_never_the_headline():
    for name in ("728x90", "320x50", "300x250"):
        fmt = FORMATS[name]
        base = noise(fmt.size, seed=5)
        area = place_product(fmt, (100, 270)).copy_area
        img, elements, masks = typeset(base, COPY, area, fmt_name=name)
        assert elements[0].role == "headline" and elements[0].font_size >= 10
        for el, mask in zip(elements, masks):
            assert el.contrast_ratio >= 4.5 and remeasure(img, el, mask) >= 4.5, (name, el)
        check_inside(img, base, elements, masks, area)


def test_an_unbreakable_word_that_cannot_fit_names_the_format():
    fmt = FORMATS["320x50"]
    area = place_product(fmt, (300, 100)).copy_area
    with pytest.raises(BadRequest) as err:
        typeset(pale(fmt.size), CopySpec(headline="Incomprehensibilities-extraordinarily-long-word"), area,
                fmt_name=fmt.name)
    msg = str(err.value)
    assert "320x50" in msg and "Incomprehensibilities-extraordinarily-long-word" in msg and "minimum" in msg


def test_words_are_never_split():
    _, elements, _ = typeset(pale((300, 600)), CopySpec(headline="Handcrafted sustainable skincare essentials"),
                             (18, 18, 282, 300))
    head = elements[0]
    assert len(head.lines) > 1 and " ".join(head.lines) == head.text


def test_copy_spec_validates_the_brand_colour():
    with pytest.raises(BadRequest, match="zzz"):
        CopySpec(headline="x", brand_color="zzz")
    assert CopySpec(headline="  two   spaces ", brand_color="#ABC").model_dump()["headline"] == "two spaces"
