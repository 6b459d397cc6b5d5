"""Product and copy placement: inside margins and safe zones, never overlapping, product grounded."""

from __future__ import annotations

import pytest

from imagesmith.compose.formats import FORMATS
from imagesmith.compose.placement import POSITIONS, place_product
from imagesmith.core.errors import BadRequest

PRODUCTS = [(100, 300), (300, 100), (250, 250), (37, 401), (1200, 90)]


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_and_position_stays_inside_and_apart(name):
    fmt = FORMATS[name]
    m = round(0.06 * min(fmt.width, fmt.height))
    top, bottom = max(m, fmt.safe_top), fmt.height - max(m, fmt.safe_bottom)
    for position in POSITIONS:
        for size in PRODUCTS:
            p = place_product(fmt, size, position=position)
            for box in (p.product_box, p.copy_area):
                x0, y0, x1, y1 = box
                assert m <= x0 < x1 <= fmt.width - m, (name, position, size, box)
                assert top <= y0 < y1 <= bottom, (name, position, size, box)
            assert not _overlap(p.product_box, p.copy_area), (name, position, size)
            pw, ph = p.product_box[2] - p.product_box[0], p.product_box[3] - p.product_box[1]
            # aspect kept to within one pixel of rounding
            assert abs(pw * size[1] / size[0] - ph) <= 1.0 or abs(ph * size[0] / size[1] - pw) <= 1.0
            assert p.product_scale == pytest.approx(pw / size[0], rel=1e-4)
            assert p.floor_y == p.product_box[3]


def test_auto_puts_copy_beside_the_product_on_wide_formats_and_above_it_otherwise():
    for name in ("1.91:1", "728x90", "320x50"):
        p = place_product(FORMATS[name], (100, 300))
        assert p.layout == "side" and p.copy_area[2] <= p.product_box[0]
    for name in ("1:1", "4:5", "9:16", "300x250", "300x600"):
        p = place_product(FORMATS[name], (100, 300))
        assert p.layout == "stack" and p.copy_area[3] <= p.product_box[1]
        # grounded low: the product's base is in the lower part of the canvas
        assert p.product_box[3] > 0.75 * FORMATS[name].height


def test_left_right_and_center():
    fmt = FORMATS["1.91:1"]
    left = place_product(fmt, (100, 300), position="left")
    right = place_product(fmt, (100, 300), position="right")
    assert left.product_box[2] <= left.copy_area[0] and right.copy_area[2] <= right.product_box[0]
    bottom = place_product(FORMATS["1:1"], (300, 100), position="bottom")
    center = place_product(FORMATS["1:1"], (300, 100), position="center")
    assert center.product_box[3] < bottom.product_box[3]
    c = center.product_box
    assert abs((c[0] + c[2]) / 2 - 540) <= 1


def test_scale_and_prominence():
    fmt = FORMATS["1:1"]
    big = place_product(fmt, (200, 400))
    small = place_product(fmt, (200, 400), scale=0.4)
    assert small.product_box[3] - small.product_box[1] < 0.55 * (big.product_box[3] - big.product_box[1])
    # auto: a prominent product, well over a third of the canvas height
    assert big.product_box[3] - big.product_box[1] > 0.4 * fmt.height


@pytest.mark.parametrize("kwargs", [{"position": "top"}, {"scale": 0.0}, {"scale": 1.5}, {"copy_fraction": 0.95}])
def test_bad_arguments(kwargs):
    with pytest.raises(BadRequest):
        place_product(FORMATS["1:1"], (100, 100), **kwargs)
    with pytest.raises(BadRequest):
        place_product(FORMATS["1:1"], (0, 100))


@pytest.mark.parametrize("name", ["1:1", "9:16", "1.91:1"])
def test_a_small_product_is_never_enlarged_past_max_enlarge(name):
    fmt = FORMATS[name]
    free = place_product(fmt, (40, 90))
    assert free.product_scale > 4  # the layout alone would blow it up
    capped = place_product(fmt, (40, 90), max_enlarge=4.0)
    x0, y0, x1, y1 = capped.product_box
    assert capped.product_scale <= 4.0 and (x1 - x0) <= 160 and (y1 - y0) <= 360
    assert y1 == capped.floor_y and y1 <= fmt.height  # still grounded inside the format
    big = place_product(fmt, (2000, 3000), max_enlarge=4.0)
    assert big.product_box == place_product(fmt, (2000, 3000)).product_box  # a large product: no change
    with pytest.raises(BadRequest, match="max_enlarge"):
        place_product(fmt, (40, 90), max_enlarge=0)
