"""WCAG contrast on colours and measured on rendered pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.compose.contrast import (contrast_ratio, measured_contrast, parse_hex, percentiles,
                                         relative_luminance, to_hex, worst_case_contrast)
from imagesmith.compose.typeset import font_path
from imagesmith.core.errors import BadRequest


def test_black_on_white_is_21_and_symmetric():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio("#ffffff", "#000") == pytest.approx(21.0)
    assert contrast_ratio((120, 30, 200), (120, 30, 200)) == pytest.approx(1.0)
    a, b = (10, 108, 255), (250, 250, 240)
    assert contrast_ratio(a, b) == pytest.approx(contrast_ratio(b, a))
    # a published reference pair: #777777 on white is 4.48:1
    assert contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


def test_relative_luminance_scalar_and_array():
    assert relative_luminance((255, 255, 255)) == pytest.approx(1.0)
    assert relative_luminance((0, 0, 0)) == 0.0
    arr = np.zeros((4, 5, 3), np.uint8)
    arr[..., 1] = 255
    lum = relative_luminance(arr)
    assert lum.shape == (4, 5) and np.allclose(lum, 0.7152)


def test_parse_hex_accepts_short_and_long_forms():
    assert parse_hex("#1a2B3c") == (0x1A, 0x2B, 0x3C)
    assert parse_hex("#fa0") == (255, 170, 0)
    assert parse_hex("  0a6cff ") == (10, 108, 255)
    assert to_hex((10, 108, 255)) == "#0a6cff"
    assert to_hex(parse_hex("#ABC")) == "#aabbcc"


@pytest.mark.parametrize("bad", ["zzz", "#12", "#1234567", "", "#ggg000", "blue", "#12345"])
def test_parse_hex_rejects_with_one_clear_line(bad):
    with pytest.raises(BadRequest) as err:
        parse_hex(bad)
    assert str(err.value) == f"brand colour '{bad}' is not a hex colour like #1a2b3c"


def test_percentiles_match_numpy():
    v = np.random.default_rng(0).random(1001)
    assert np.allclose(percentiles(v, (10, 90, 50)), np.percentile(v, (10, 90, 50)))


def test_worst_case_uses_both_ends_of_the_background():
    half = np.concatenate([np.full((50, 3), 255), np.full((50, 3), 0)])
    assert worst_case_contrast((255, 255, 255), half) == pytest.approx(1.0)
    assert worst_case_contrast((0, 0, 0), np.full((10, 3), 255)) == pytest.approx(21.0)


def _render(text_rgb, bg, size):
    img = bg.copy()
    cover = Image.new("L", img.size, 0)
    from PIL import ImageFont
    font = ImageFont.truetype(str(font_path("bold")), size)
    ImageDraw.Draw(img).text((10, img.height // 2), "Shop now Light", font=font, fill=text_rgb, anchor="lm")
    ImageDraw.Draw(cover).text((10, img.height // 2), "Shop now Light", font=font, fill=255, anchor="lm")
    return img, np.asarray(cover) >= 128


@pytest.mark.parametrize("size", [10, 14, 40])
def test_measured_contrast_reads_the_ink_not_the_antialiasing(size):
    img, mask = _render((0, 0, 0), Image.new("RGB", (400, 80), (255, 255, 255)), size)
    assert measured_contrast(img, mask, (0, 0, 400, 80)) > 19.5
    img, mask = _render((255, 255, 255), Image.new("RGB", (400, 80), (10, 108, 255)), size)
    assert measured_contrast(img, mask, (0, 0, 400, 80)) == pytest.approx(contrast_ratio("#ffffff", "#0a6cff"),
                                                                           abs=0.15)


def test_measured_contrast_is_the_worst_case_on_a_busy_background():
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 400, 3), dtype=np.uint8))
    img, mask = _render((255, 255, 255), noise, 30)
    assert measured_contrast(img, mask, (0, 0, 400, 80)) < 1.5  # the light half of the noise is as light
