"""Compositing: the product's own pixels survive exactly; shadow grounds it; harmonise recolours."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.compose.composite import ShadowSpec, composite, fit_product
from imagesmith.core.errors import BadImage


def cutout(size=(300, 400), pad=40, seed=0) -> Image.Image:
    """A textured bottle-ish RGBA cutout with soft edges and transparent margins."""
    w, h = size
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array([220, 110, 40]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    alpha = Image.new("L", size, 0)
    ImageDraw.Draw(alpha).rounded_rectangle((pad, pad, w - pad, h - pad), radius=40, fill=255)
    alpha = alpha.resize((w // 2, h // 2), Image.LANCZOS).resize(size, Image.BILINEAR)  # soft rim
    img = Image.fromarray(rgb).convert("RGBA")
    img.putalpha(alpha)
    return img


def scene(size=(600, 500)) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([120 + 60 * xx / w, 150 + 40 * yy / h, 190 - 50 * yy / h], -1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def core_of(fitted: Image.Image) -> np.ndarray:
    alpha = np.asarray(fitted.getchannel("A")) >= 128
    return cv2.erode(alpha.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def test_fit_product_crops_keeps_aspect_and_is_idempotent():
    cut = cutout()
    bbox = cut.getchannel("A").getbbox()
    bw, bh = bbox[2] - bbox[0], bbox[3] - bbox[1]
    fitted = fit_product(cut, (150, 150))
    assert fitted.mode == "RGBA" and max(fitted.size) == 150
    assert abs(fitted.width / fitted.height - bw / bh) < 0.02
    again = fit_product(cut, fitted.size)
    assert again.size == fitted.size and np.array_equal(np.asarray(again), np.asarray(fitted))
    # a box with the product's aspect (to the pixel) is filled exactly
    assert fit_product(cut, (bw // 2, round(bh / 2))).size == (bw // 2, round(bh / 2))
    with pytest.raises(BadImage):
        fit_product(Image.new("RGBA", (10, 10)), (5, 5))


def test_fit_product_has_no_dark_fringe():
    """Transparent pixels hold black RGB; a straight-alpha resize would drag it into the edge colour."""
    img = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((20, 20, 180, 180), fill=(250, 250, 250, 255))
    small = np.asarray(fit_product(img, (37, 37))).astype(int)
    edge = (small[..., 3] > 10) & (small[..., 3] < 245)
    assert edge.any() and small[edge][:, :3].min() >= 235


def test_product_pixels_are_preserved_exactly():
    bg = scene()
    fitted = fit_product(cutout(), (180, 240))
    box = (200, 200, 200 + fitted.width, 200 + fitted.height)
    res = composite(bg, fitted, box, shadow=ShadowSpec(), reflection=True)
    out = np.asarray(res.image)
    want = np.asarray(fitted.convert("RGB"))
    core = core_of(fitted)
    assert res.preserved and res.harmonized == "off"
    assert res.protected_mask.shape == (bg.height, bg.width)
    assert np.array_equal(res.protected_mask[box[1]:box[3], box[0]:box[2]], core)
    assert not res.protected_mask[:box[1]].any() and not res.protected_mask[:, :box[0]].any()
    assert np.array_equal(out[box[1]:box[3], box[0]:box[2]][core], want[core])
    # outside the box and away from shadow/reflection the scene is untouched
    assert np.array_equal(out[:150], np.asarray(bg)[:150])


def test_full_harmonize_recolours_and_says_so():
    bg = scene()
    fitted = fit_product(cutout(), (180, 240))
    box = (200, 200, 200 + fitted.width, 200 + fitted.height)
    core = core_of(fitted)
    want = np.asarray(fitted.convert("RGB")).astype(int)
    full = composite(bg, fitted, box, harmonize="full")
    edge = composite(bg, fitted, box, harmonize="edge")
    got_full = np.asarray(full.image)[box[1]:box[3], box[0]:box[2]].astype(int)
    got_edge = np.asarray(edge.image)[box[1]:box[3], box[0]:box[2]].astype(int)
    assert not full.preserved and full.harmonized == "full"
    assert np.abs(got_full[core] - want[core]).mean() > 5
    # moved toward the scene: the orange product's mean colour approaches the blue-grey backdrop
    scene_mean = np.asarray(bg).reshape(-1, 3).mean(0)
    assert np.abs(got_full[core].mean(0) - scene_mean).sum() < np.abs(want[core].mean(0) - scene_mean).sum()
    # edge mode: the deep inside stays, the rim moves
    deep = cv2.erode(core.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    assert deep.any() and np.array_equal(got_edge[deep], want[deep])
    assert edge.harmonized == "edge" and not np.array_equal(got_edge[core], want[core])


def test_contact_shadow_darkens_the_ground_just_below():
    bg = Image.new("RGB", (600, 500), (200, 200, 200))
    fitted = fit_product(cutout(), (180, 240))
    box = (200, 150, 200 + fitted.width, 150 + fitted.height)
    lit = np.asarray(composite(bg, fitted, box, shadow=None).image).astype(int)
    shaded = np.asarray(composite(bg, fitted, box, shadow=ShadowSpec(opacity=0.6)).image).astype(int)
    cx = (box[0] + box[2]) // 2
    below = slice(box[3] + 1, box[3] + 6)
    assert np.array_equal(lit[below, cx - 40:cx + 40], np.full((5, 80, 3), 200))
    assert shaded[below, cx - 40:cx + 40].mean() < 185
    # far from the product nothing changes
    assert np.array_equal(shaded[:, :40], lit[:, :40])
    # light from the right casts the shadow to the left
    side = np.asarray(composite(bg, fitted, box, shadow=ShadowSpec(direction_deg=0, opacity=0.6)).image).astype(int)
    row = side[box[3] - 3: box[3] + 4].mean(axis=(0, 2))
    assert row[box[0] - 40:box[0]].mean() < row[box[2]:box[2] + 40].mean()


def test_reflection_mirrors_below():
    bg = Image.new("RGB", (600, 700), (40, 40, 40))
    fitted = fit_product(cutout(), (180, 240))
    box = (200, 150, 200 + fitted.width, 150 + fitted.height)
    plain = np.asarray(composite(bg, fitted, box, shadow=None).image).astype(int)
    mirrored = np.asarray(composite(bg, fitted, box, shadow=None, reflection=True).image).astype(int)
    below = mirrored[box[3] + 2:box[3] + 20, box[0]:box[2]]
    assert (below[..., 0] - below[..., 2]).mean() > 5  # the orange shows in the floor
    assert np.array_equal(plain[box[3] + 2:box[3] + 20, box[0]:box[2]], np.full_like(below, 40))


def test_size_mismatch_is_a_bug_not_a_silent_resize():
    with pytest.raises(ValueError):
        composite(scene(), fit_product(cutout(), (100, 100)), (0, 0, 50, 50))


def test_calm_region_defocuses_only_the_copy_area():
    from imagesmith.compose.composite import calm_region
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = np.asarray(calm_region(noisy, (20, 20, 140, 100))).astype(float)
    src = np.asarray(noisy).astype(float)
    inside = (slice(30, 90), slice(30, 130))
    assert np.abs(np.diff(out[inside], axis=1)).mean() < 0.3 * np.abs(np.diff(src[inside], axis=1)).mean()
    assert np.array_equal(out[150:, 200:], src[150:, 200:])  # far away: untouched


def test_clearing_fills_a_large_hole_from_all_around_not_from_a_trace_on_its_rim():
    """A cleared object leaves a trace of its colour on the hole's rim (the matte's fringe). The fill takes the
    colours around the hole, weighted, so the backdrop closes over it; Telea's rim-marching fill drew the trace
    across the hole as a faint copy of the object."""
    from imagesmith.compose.composite import clear_footprint
    teal, green = (80, 200, 210), (40, 170, 90)
    im = Image.new("RGB", (200, 200), teal)
    d = ImageDraw.Draw(im)
    d.rectangle((60, 42, 140, 47), fill=green)            # the trace, just outside the top rim of the hole
    d.rectangle((60, 54, 140, 150), fill=(230, 40, 200))  # the object being cleared
    alpha = np.zeros((200, 200), np.float32)
    alpha[54:151, 60:141] = 1.0
    out = np.asarray(clear_footprint(im, alpha), np.float32)
    inside = out[70:140, 75:125].reshape(-1, 3)
    assert np.abs(inside - np.array(teal)).max() < 40, inside.mean(0)  # backdrop (Telea: 118 off, green)
    assert np.array_equal(out[:, :20], np.asarray(im)[:, :20])  # far from the hole nothing changes
