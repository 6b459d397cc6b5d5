"""Every architecture and format through the same engine: SD1.5 (folder and single file), SDXL, SD3,
FLUX; VAE override and ControlNet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.requests import ControlNetSpec, GenerateRequest, LoraSpec
from imagesmith.engine.generate import Engine


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def px(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model,sampler", [
    ("tiny-sd15", "Euler a"), ("tiny-sd15-single", "Euler a"), ("tiny-sdxl", "DPM++ 2M"),
    ("tiny-sd3", "Euler"), ("tiny-flux", "Euler"),
])
def test_each_architecture_generates(engine, model, sampler):
    r = engine.generate(GenerateRequest(prompt="a (teapot:1.2) on a table", negative_prompt="blurry", model=model,
                                        width=64, height=64, steps=2, seed=3, sampler_name=sampler))
    image = r.images[0]
    assert image.size == (64, 64)
    assert px(image).std() > 1  # not a blank image
    again = engine.generate(r.request)
    assert np.array_equal(px(image), px(again.images[0]))


def test_single_file_equals_folder(engine):
    kw = dict(prompt="an apple", width=64, height=64, steps=2, seed=1, sampler_name="Euler")
    a = engine.generate(GenerateRequest(model="tiny-sd15", **kw)).images[0]
    b = engine.generate(GenerateRequest(model="tiny-sd15-single", **kw)).images[0]
    assert np.abs(px(a) - px(b)).max() <= 1


def test_sdxl_img2img_and_lora(engine, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")

    def run(weight: float | None):
        loras = [] if weight is None else [LoraSpec(name="tiny-lora-sdxl-peft", weight=weight)]
        return engine.generate(GenerateRequest(prompt="x", model="tiny-sdxl", init_image=str(tmp_path / "red.png"),
                                               denoising_strength=0.5, steps=4, seed=1, sampler_name="Euler",
                                               loras=loras))
    plain, zero, one = run(None), run(0.0), run(1.0)
    assert plain.images[0].size == (64, 64)
    assert np.array_equal(px(plain.images[0]), px(zero.images[0]))  # weight 0: exactly the base model
    assert np.abs(px(one.images[0]) - px(plain.images[0])).mean() > 1  # the SDXL LoRA acts on img2img
    assert "Lora hashes: \"tiny-lora-sdxl-peft: " in one.records[0].infotext
    # img2img at strength 0.5 keeps some of the init image's red (the tiny random VAE is a poor painter)
    assert px(plain.images[0])[..., 0].mean() > px(plain.images[0])[..., 2].mean() + 8


def test_flow_models_run_every_sampler_but_refuse_what_cannot_work(engine):
    from imagesmith.core.errors import BadRequest
    for sampler, schedule in (("LMS", "karras"), ("DPM++ 2M SDE", "exponential"), ("uni_pc", "beta")):
        image = engine.generate(GenerateRequest(prompt="x", model="tiny-flux", width=64, height=64, steps=3, seed=1,
                                                sampler_name=sampler, scheduler=schedule)).images[0]
        assert np.asarray(image).std() > 1
    with pytest.raises(BadRequest, match="epsilon/v-prediction models only"):
        engine.generate(GenerateRequest(prompt="x", model="tiny-flux", width=64, height=64, steps=2,
                                        sampler_name="PLMS"))
    with pytest.raises(BadRequest, match="SD1.5/SDXL only"):
        engine.generate(GenerateRequest(prompt="x", model="tiny-sd3", width=64, height=64, steps=2,
                                        scheduler="Align Your Steps"))


def test_vae_override(engine):
    kw = dict(prompt="an apple", model="tiny-sd15", width=64, height=64, steps=2, seed=1, sampler_name="Euler")
    a = engine.generate(GenerateRequest(**kw)).images[0]
    b = engine.generate(GenerateRequest(vae="tiny-vae", **kw))
    assert not np.array_equal(px(a), px(b.images[0]))
    assert "VAE: tiny-vae" in b.records[0].infotext
    c = engine.generate(GenerateRequest(**kw)).images[0]
    assert np.array_equal(px(a), px(c))  # the override did not stick to the shared pipeline


def test_controlnet_canny(engine, tmp_path):
    im = Image.new("RGB", (64, 64), "white")
    im.paste((0, 0, 0), (16, 16, 48, 48))
    im.save(tmp_path / "c.png")
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=2, seed=1, sampler_name="Euler")
    plain = engine.generate(GenerateRequest(**kw)).images[0]
    ctrl = engine.generate(GenerateRequest(controlnet=ControlNetSpec(model="tiny-controlnet", image=str(tmp_path / "c.png")), **kw))
    assert ctrl.images[0].size == (64, 64)
    assert not np.array_equal(px(plain), px(ctrl.images[0]))
