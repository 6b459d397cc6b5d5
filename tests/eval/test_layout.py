"""eval.layout: Occ, Rea, Uti on constructed maps; the WCAG helpers are compose's own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesmith.compose import contrast
from imagesmith.eval import layout
from imagesmith.eval.layout import boxes_mask, contrast_ratio, layout_metrics, occ, rea, relative_luminance, uti


def halves(h: int = 40, w: int = 100) -> np.ndarray:
    """Saliency 1 on the left half, 0 on the right half."""
    s = np.zeros((h, w), np.float32)
    s[:, : w // 2] = 1.0
    return s


def test_boxes_mask_rounds_clips_and_unions():
    m = boxes_mask((10, 10), [(2, 2, 5, 5), (4, 4, 6, 6), (-5, 8, 3.4, 20), (7, 7, 7, 9)])
    assert m.sum() == 9 + 4 - 1 + 3 * 2
    assert m[8:10, 0:3].all() and not m[7, 7]
    with pytest.raises(ValueError):
        boxes_mask((10, 10), [(1, 2, 3)])


def test_occ_known_values():
    s = halves()
    assert occ(s, [(0, 0, 50, 40)]) == pytest.approx(1.0)
    assert occ(s, [(50, 0, 100, 40)]) == pytest.approx(0.0)
    assert occ(s, [(25, 0, 75, 40)]) == pytest.approx(0.5)
    # overlapping boxes count once: the union is 30 salient + 10 calm columns
    assert occ(s, [(20, 0, 50, 40), (20, 0, 60, 40)]) == pytest.approx(30 / 40)
    assert occ(s, []) == 0.0 and occ(s, [(200, 0, 300, 40)]) == 0.0
    assert occ((s * 255).astype(np.uint8), [(0, 0, 60, 40)]) == pytest.approx(50 / 60)  # uint8 map = 0..255
    ramp = np.tile(np.linspace(0, 1, 11, dtype=np.float32), (5, 1))
    assert occ(ramp, [(0, 0, 11, 5)]) == pytest.approx(0.5)


def test_uti_known_values():
    s = halves()
    assert uti(s, [(0, 0, 100, 40)]) == pytest.approx(1.0)
    assert uti(s, [(50, 0, 75, 40)]) == pytest.approx(0.5)
    assert uti(s, [(0, 0, 50, 40)]) == 0.0 and uti(s, []) == 0.0


def test_rea_known_values():
    flat = Image.new("RGB", (64, 32), (90, 140, 200))
    assert rea(flat, [(0, 0, 64, 32)]) == 0.0
    # a horizontal gray ramp rising 1/255 per pixel (inside, away from the clamped borders)
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 2, (32, 1))
    assert rea(ramp, [(4, 4, 60, 28)]) == pytest.approx(2 / 255, rel=1e-4)
    assert rea(Image.fromarray(ramp), [(4, 4, 60, 28)]) == pytest.approx(2 / 255, rel=1e-4)
    # a black/white step: the two columns beside it read 0.5 each, everything else 0
    step = np.zeros((32, 64), np.float32)
    step[:, 32:] = 1.0
    assert rea(step, [(31, 0, 33, 32)]) == pytest.approx(0.5)
    assert rea(step, [(28, 0, 36, 32)]) == pytest.approx(0.125)
    assert rea(step, [(0, 0, 20, 32)]) == 0.0 and rea(step, []) == 0.0
    rgb = np.dstack([step * 255] * 3).astype(np.uint8)
    assert rea(rgb, [(31, 0, 33, 32)]) == pytest.approx(0.5)
    # PosterLayout's own scale: divided by the image's largest gradient
    assert rea(ramp, [(4, 4, 60, 28)], normalize="max") == pytest.approx(1.0)
    assert rea(step, [(28, 0, 36, 32)], normalize="max") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        rea(step, [(0, 0, 4, 4)], normalize="bogus")  # type: ignore[arg-type]


def test_text_on_the_calm_side_scores_better():
    rng = np.random.default_rng(0)
    img = np.full((60, 120, 3), 200, np.uint8)
    img[:, 60:] = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    sal = np.zeros((60, 120), np.float32)
    sal[:, 60:] = 0.9
    calm, busy = layout_metrics(img, sal, [(5, 20, 55, 40)]), layout_metrics(img, sal, [(65, 20, 115, 40)])
    assert calm["occ"] < busy["occ"] and calm["rea"] < busy["rea"] and calm["uti"] > busy["uti"]


def test_contrast_helpers_are_compose_s():
    assert layout.contrast_ratio is contrast.contrast_ratio
    assert layout.relative_luminance is contrast.relative_luminance
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert relative_luminance((255, 255, 255)) == pytest.approx(1.0)
