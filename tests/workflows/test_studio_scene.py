"""Studio scenes: the concept's words pick the surface, wall, colours and light; the scene is crisp at the format's
full size; the ad studio uses it for the house model (auto) and on request, and records what it understood."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fixtures.cli import run_cli
from imagesmith.core.requests import AdRequest
from imagesmith.workflows.studio_scene import plan_scene, render_scene
from test_product_ad import product_photo, studio  # noqa: F401  (module fixture)


def _sharpness(img: Image.Image) -> float:
    import cv2
    g = np.asarray(img.convert("L"), np.float32)
    return float(cv2.Laplacian(g, cv2.CV_32F).var())


@pytest.mark.parametrize("concept, surface, wall, warm, glossy", [
    ("a bright bathroom shelf with soft morning light", "marble", "tiles", True, False),
    ("a cozy cafe counter, warm light", "wood", "bokeh", True, False),
    ("white marble, light from the left", "marble", "paper", False, True),
    ("a pale blue linen tablecloth, cool light", "linen", "paper", False, False),
])
def test_concepts_become_different_sets(concept, surface, wall, warm, glossy):
    plan = plan_scene(concept)
    assert (plan.surface, plan.wall, plan.warmth > 0, plan.glossy) == (surface, wall, warm, glossy), plan


def test_colours_and_light_are_read():
    plan = plan_scene("terrazzo against a peach wall, light from the left")
    assert plan.wall_colour == (250, 200, 170) and plan.light_x < 0.3 and plan.surface == "terrazzo"
    assert plan_scene("pale blue backdrop").wall_colour != plan_scene("blue backdrop").wall_colour
    assert plan_scene("anything at all").surface == "plain"  # nothing understood: a clean studio set


def test_two_concepts_the_old_painter_confused_look_different_and_crisp():
    box = (390, 500, 690, 1100)
    bath = render_scene(plan_scene("a bright bathroom shelf with soft morning light"), (1080, 1350), box, seed=1)
    cafe = render_scene(plan_scene("a cozy cafe counter, warm light"), (1080, 1350), box, seed=1)
    assert bath.size == cafe.size == (1080, 1350)
    b, c = np.asarray(bath, np.float32), np.asarray(cafe, np.float32)
    assert b.mean() - c.mean() > 60  # a bright tiled bathroom against a dark cafe wall
    # crisp at full size: far more fine detail than the same scene painted at 128 px and enlarged
    blurred = bath.resize((128, 160), Image.BILINEAR).resize(bath.size, Image.BICUBIC)
    assert _sharpness(bath) > 3 * _sharpness(blurred)
    # the surface is below the product's base, the wall above its top
    assert np.abs(b[1300].mean(axis=0) - b[200].mean(axis=0)).max() > 10
    again = render_scene(plan_scene("a bright bathroom shelf with soft morning light"), (1080, 1350), box, seed=1)
    assert np.array_equal(np.asarray(again), b.astype(np.uint8)) or np.abs(np.asarray(again, np.float32) - b).max() == 0


def test_ads_use_the_studio_scene_for_the_house_model(studio, tmp_path):  # noqa: F811
    photo = product_photo(tmp_path / "p.jpg")
    req = AdRequest(products=[str(photo)], concept="white marble, light from the left", headline="Glow",
                    formats=["1:1", "320x50"], steps=2, upscaler="Lanczos", seed=3)
    result = studio.make(req, tmp_path / "out")
    assert not result.failures, result.failures
    for o in result.outputs:
        assert o.background == "studio" and o.scene["surface"] == "marble" and o.scene["glossy"]
        assert o.product_pixels_preserved and o.cutout_confidence >= 0.5
        assert Image.open(o.path).size == (o.width, o.height)
    manifest = json.loads(open(result.manifest_path).read())
    assert manifest["outputs"][0]["scene"]["light_x"] < 0.3
    painted = studio.make(req.model_copy(update={"background": "paint", "formats": ["1:1"]}), tmp_path / "painted")
    assert painted.outputs[0].background == "paint" and painted.outputs[0].scene is None


def test_ad_cli_guidance_and_background_flags_fail_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    photo = product_photo(tmp_path / "p.jpg")
    base = ["ad", str(photo), "--concept", "marble", "--headline", "Hi", "--formats", "1:1", "-o", str(tmp_path / "o")]
    for extra, says in ((["--product-box", "1,2,3"], "--product-box takes 4"),
                        (["--product-point", "x,y"], "--product-point takes 2"),
                        (["--background", "beach"], "--background takes auto, paint or studio"),
                        (["--product-box", "10,10,900,100"], "product_box 10,10,900,100 lies outside the 480x400")):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code != 0 and says in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not list((tmp_path / "o").glob("*.png"))
