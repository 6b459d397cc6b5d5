"""Regional prompting: a prompt for a box or a mask, blended with the base prompt by weight (ComfyUI's mask
semantics). A region's prompt changes its region far more than the rest of the picture."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest, RegionSpec


@pytest.fixture(scope="module")
def engine(tiny_home):
    from imagesmith.engine.generate import Engine
    return Engine(tiny_home, device="cpu")


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-flux"])
def test_a_region_changes_its_region(engine, model):
    base = dict(prompt="a green field", model=model, width=128, height=64, steps=3, cfg_scale=5, seed=9,
                sampler_name="Euler")
    plain = np.asarray(engine.generate(GenerateRequest(**base)).images[0], np.float32)
    region = RegionSpec(prompt="a red car, chrome, night", box=(0.0, 0.0, 0.4, 1.0), weight=3.0, feather=0)
    r = engine.generate(GenerateRequest(**base, regions=[region]))
    moved = np.abs(np.asarray(r.images[0], np.float32) - plain).mean(axis=2)
    inside, outside = moved[:, :40].mean(), moved[:, 88:].mean()  # the box, and past its edge
    assert inside > 2 * outside and inside > 0.25, (inside, outside)  # tiny FLUX reacts little to prompts
    assert "Regions: " in r.records[0].infotext and "a red car" in r.records[0].infotext


def test_regions_are_checked(engine, tmp_path):
    with pytest.raises(ValidationError):
        RegionSpec(prompt="x", box=(0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ValidationError):
        RegionSpec(prompt="x", box=(0.0, 0.0, 1.5, 1.0))
    with pytest.raises(ValidationError):
        RegionSpec(prompt="x")  # neither a box nor a mask
    from PIL import Image
    Image.new("L", (64, 64), 0).save(tmp_path / "empty.png")
    with pytest.raises(BadRequest, match="covers nothing"):
        engine.generate(GenerateRequest(prompt="a", model="tiny-sd15", width=64, height=64, steps=1,
                                        regions=[RegionSpec(prompt="b", mask=str(tmp_path / "empty.png"))]))


def test_regions_with_prompt_editing_and_and(engine):
    """A region's prompt may itself switch at a step ([from:to:when]) or compose (AND), and so may the base: each
    is scheduled on its own. The switch shows inside the region: a region that changes prompt after a step differs there
    from one that keeps its first prompt, and far less outside it."""
    base = dict(prompt="a green field", model="tiny-sd15", width=128, height=64, steps=4, cfg_scale=5, seed=9,
                sampler_name="Euler")

    def run(region_prompt: str, **extra) -> np.ndarray:
        region = RegionSpec(prompt=region_prompt, box=(0.0, 0.0, 0.4, 1.0), weight=3.0, feather=0)
        return np.asarray(engine.generate(GenerateRequest(**{**base, **extra}, regions=[region])).images[0],
                          np.float32)
    kept = run("a red car, chrome, night")
    switched = run("[a red car, chrome, night:a blue boat, sunny day:1]")  # from step 2 on
    moved = np.abs(switched - kept).mean(axis=2)
    assert moved[:, :40].mean() > 2 * moved[:, 88:].mean() and moved[:, :40].mean() > 0.05  # tiny SD: small
    composed = run("a red car AND a blue boat :0.7", prompt="[a green field:a snowy field:2]")
    assert composed.shape == kept.shape and np.abs(composed - kept).mean() > 0.25


def test_region_prompts_draw_wildcards_and_are_checked_like_the_prompt(engine, tiny_home):
    """A region's prompt draws its wildcards and {a|b} choices from the seed (the same seed, the same drawn region
    prompt, recorded in the infotext) and a malformed prompt edit in it is one error naming the region."""
    folder = tiny_home.home / "wildcards"
    folder.mkdir(exist_ok=True)
    (folder / "vehicle.txt").write_text("red car\nblue boat\ngreen tractor\n", encoding="utf-8")
    base = dict(prompt="a field", model="tiny-sd15", width=64, height=64, steps=2, sampler_name="Euler")

    def run(seed: int, text: str = "a __vehicle__, {night|noon}"):
        r = engine.generate(GenerateRequest(**base, seed=seed, regions=[RegionSpec(prompt=text, box=(0, 0, .5, 1))]))
        return r.records[0].infotext
    drawn = {run(seed) for seed in range(6)}
    assert all("__" not in t and "{" not in t for t in drawn) and len(drawn) > 1
    assert run(3) == run(3)
    with pytest.raises(BadRequest, match=r"region 1 prompt: \[car:boat:x\] is not prompt editing"):
        run(1, "a [car:boat:x]")
