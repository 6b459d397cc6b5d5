"""vision.analyze: saliency, free space, dominant colours, tone/brightness, copy regions, the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.vision.analyze import (Analysis, analyze, brightness, copy_regions, dominant_colors,
                                       free_space_map, gradient_energy_map, saliency_map, save_maps,
                                       sobel_magnitude, tone)


def object_scene(w: int = 320, h: int = 200, box=(200, 50, 280, 150), fg=(220, 60, 30), bg=(205, 208, 214)):
    """A plain backdrop with a gentle vertical falloff and one coloured ellipse (the 'product')."""
    y = np.linspace(0, 1, h)[:, None, None]
    ground = np.asarray(bg, np.float32) * (1 - 0.08 * y) * np.ones((h, w, 3), np.float32)
    img = Image.fromarray(ground.astype(np.uint8))
    ImageDraw.Draw(img).ellipse(box, fill=fg)
    mask = np.zeros((h, w), bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return img, mask


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------------------------ saliency
def test_saliency_is_higher_on_the_object():
    img, obj = object_scene()
    sal = saliency_map(img)
    assert sal.shape == (200, 320) and sal.dtype == np.float32
    assert sal.min() >= 0 and sal.max() == pytest.approx(1.0)
    assert sal[obj].mean() > 4 * sal[~obj].mean()
    assert sal[:, :120].max() < 0.2  # the empty left part of the frame is not salient


def test_saliency_of_a_flat_image_is_zero_and_the_mask_is_merged():
    flat = Image.new("RGB", (64, 48), (120, 130, 140))
    assert not saliency_map(flat).any()
    img, obj = object_scene()
    mask = np.zeros((100, 160), np.float32)  # any size: resized to the image
    mask[10:40, 10:40] = 1.0
    sal = saliency_map(img, mask=mask)
    assert sal[22:78, 22:78].min() > 0.99 and sal.max() <= 1.0
    assert saliency_map(flat, mask=np.ones((48, 64), np.uint8) * 255).min() == 1.0


# ---------------------------------------------------------------------------------------------- free space
def test_free_space_is_high_on_flat_ground_and_low_on_texture_and_object():
    w, h = 320, 200
    img, obj = object_scene(w, h, box=(230, 60, 300, 140))
    arr = np.asarray(img).copy()
    rng = np.random.default_rng(0)
    arr[:, 110:200] = rng.integers(0, 256, (h, 90, 3), dtype=np.uint8)  # a busy stripe in the middle
    img = Image.fromarray(arr)
    free = free_space_map(img)
    assert free.shape == (h, w) and free.dtype == np.float32 and 0 <= free.min() and free.max() <= 1
    assert free[20:180, 10:90].mean() > 0.8
    assert free[20:180, 130:180].mean() < 0.2
    assert free[obj].mean() < 0.5
    busy = gradient_energy_map(img)
    assert busy[20:180, 130:180].mean() > 0.9 and busy[20:180, 10:90].mean() < 0.05


def test_sobel_magnitude_scale():
    ramp = np.tile(np.arange(64, dtype=np.float32) * 0.01, (32, 1))
    assert sobel_magnitude(ramp)[5:-5, 5:-5] == pytest.approx(0.01, abs=1e-5)
    step = np.zeros((16, 16), np.float32)
    step[:, 8:] = 1.0
    g = sobel_magnitude(step)
    assert g[8, 7] == pytest.approx(0.5) and g[8, 8] == pytest.approx(0.5) and g[8, 3] == 0


# ---------------------------------------------------------------------------------------------- colours
def test_dominant_colors_recover_a_70_30_image():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :140] = (30, 80, 200)
    arr[:, 140:] = (240, 200, 40)
    colors = dominant_colors(Image.fromarray(arr))
    assert [c["hex"] for c in colors] == ["#1e50c8", "#f0c828"]
    assert colors[0]["share"] == pytest.approx(0.7, abs=0.03) and colors[1]["share"] == pytest.approx(0.3, abs=0.03)
    # with sensor noise every pixel is a different colour: k-means, merged back to two colours
    noisy = np.clip(arr + np.random.default_rng(0).normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    colors = dominant_colors(Image.fromarray(noisy), k=5)
    assert sum(c["share"] for c in colors) == pytest.approx(1.0)
    assert [c["share"] for c in colors] == sorted((c["share"] for c in colors), reverse=True)
    assert colors[0]["share"] == pytest.approx(0.7, abs=0.04) and colors[1]["share"] == pytest.approx(0.3, abs=0.04)
    first = np.array([int(colors[0]["hex"][i:i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(first - (30, 80, 200)).max() <= 6
    assert dominant_colors(Image.fromarray(noisy), k=5) == colors  # deterministic


def test_dominant_colors_of_the_masked_part_only():
    img, obj = object_scene()
    colors = dominant_colors(img, k=3, mask=obj & (np.asarray(img)[..., 0] > 215))
    assert colors[0]["hex"] == "#dc3c1e" and colors[0]["share"] == pytest.approx(1.0)


@pytest.mark.parametrize("rgb, expected", [((255, 140, 20), "warm"), ((200, 40, 30), "warm"),
                                           ((30, 90, 230), "cool"), ((40, 170, 190), "cool"),
                                           ((128, 128, 128), "neutral"), ((245, 245, 240), "neutral")])
def test_tone(rgb, expected):
    assert tone(Image.new("RGB", (32, 32), rgb)) == expected


def test_brightness():
    assert brightness(Image.new("RGB", (16, 16), (0, 0, 0))) == pytest.approx(0.0, abs=1e-3)
    assert brightness(Image.new("RGB", (16, 16), (255, 255, 255))) == pytest.approx(1.0, abs=1e-3)
    assert 0.45 < brightness(Image.new("RGB", (16, 16), (119, 119, 119))) < 0.55  # L* 50 is sRGB 119


# ------------------------------------------------------------------------------------------ copy regions
def test_copy_regions_avoid_the_object():
    w, h = 400, 300
    img, obj = object_scene(w, h, box=(240, 60, 360, 240))
    regions = copy_regions(img, n=3)
    assert len(regions) == 3
    for r in regions:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) >= 0.04 * w * h * 0.8
        assert obj[y0:y1, x0:x1].mean() < 0.05
        assert 0 <= r["score"] <= 1
    assert regions[0]["score"] > 0.9 and not overlaps(regions[0]["box"], (240, 60, 360, 240))
    boxes = [r["box"] for r in regions]
    assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # a product mask in the saliency pushes text off the product even where the photo itself is calm
    sal = saliency_map(img, mask=np.pad(np.ones((200, 150), np.float32), ((50, 50), (20, 230))))
    for r in copy_regions(img, sal, n=2):
        assert not overlaps(r["box"], (20, 50, 170, 250))


# ----------------------------------------------------------------------------------------------- bundle
def test_analyze_and_save_maps(tmp_path):
    img, obj = object_scene()
    result, maps = analyze(img, mask=obj.astype(np.float32))
    assert isinstance(result, Analysis)
    assert (result.width, result.height) == (320, 200) and result.description is None
    # grey ground with one orange product: the only chroma in the picture is warm
    assert result.tone == "warm" and 0.7 < result.brightness < 0.9
    assert result.dominant_colors[0]["share"] > 0.5 and len(result.copy_regions) == 3
    json.loads(result.model_dump_json())
    assert set(maps) == {"saliency", "free_space"}
    assert all(m.shape == (200, 320) and m.dtype == np.float32 for m in maps.values())
    assert maps["saliency"][obj].min() > 0.99 and maps["free_space"][obj].max() < 0.01
    paths = save_maps(maps, tmp_path / "maps")
    back = Image.open(paths["saliency"])
    assert back.mode == "L" and back.size == (320, 200)
    assert np.abs(np.asarray(back) / 255.0 - maps["saliency"]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError):
        save_maps({"../evil": maps["saliency"]}, tmp_path)
