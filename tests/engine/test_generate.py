"""The engine on tiny random models: modes, seeds, samplers, LoRA, hires fix, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.errors import BadRequest, Cancelled, ModelNotFound
from imagesmith.core.progress import CancelToken
from imagesmith.core.requests import GenerateRequest, HiresSpec, LoraSpec
from imagesmith.engine.generate import Engine


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def req(**kw) -> GenerateRequest:
    base = dict(prompt="a red apple on a wooden table", model="tiny-sd15", width=64, height=64, steps=4, seed=7,
                sampler_name="Euler")
    base.update(kw)
    return GenerateRequest(**base)


def test_txt2img_size_count_and_seeds(engine):
    r = engine.generate(req(batch_size=2, batch_count=2, seed=100))
    assert len(r.images) == 4
    assert all(im.size == (64, 64) for im in r.images)
    assert [x.seed for x in r.records] == [100, 101, 102, 103]
    assert "Seed: 101" in r.records[1].infotext and "Steps: 4" in r.records[0].infotext
    # different seeds give different pictures
    assert np.abs(px(r.images[0]) - px(r.images[1])).mean() > 1


def test_same_seed_same_pixels_and_batch_position_independent(engine):
    a = engine.generate(req(seed=5))
    b = engine.generate(req(seed=5))
    assert np.array_equal(px(a.images[0]), px(b.images[0]))
    batch = engine.generate(req(seed=4, batch_size=2))
    # image 2 of a batch starting at seed 4 has seed 5: same noise as the single image
    assert batch.records[1].seed == 5
    assert np.abs(px(batch.images[1]) - px(a.images[0])).max() <= 2


def test_variation_seed(engine):
    base = engine.generate(req(seed=9)).images[0]
    zero = engine.generate(req(seed=9, variation_seed=77, variation_strength=0.0)).images[0]
    some = engine.generate(req(seed=9, variation_seed=77, variation_strength=0.3)).images[0]
    full = engine.generate(req(seed=9, variation_seed=77, variation_strength=1.0)).images[0]
    other = engine.generate(req(seed=77)).images[0]
    assert np.array_equal(px(base), px(zero))
    assert np.abs(px(some) - px(base)).mean() > 0.5
    assert np.abs(px(full) - px(other)).max() <= 2  # strength 1 is the variation seed's own noise


def test_resize_seed_from_lays_the_seeds_noise_in_the_middle():
    """A1111's 'resize seed from': the seed's noise as drawn for another size, centred in the image's own."""
    import torch

    from imagesmith.engine.generate import image_noise
    full = image_noise((4, 8, 12), 5, None, 0.0)
    assert torch.equal(image_noise((4, 8, 12), 5, None, 0.0, resize_from=(8, 12)), full)  # same size: no change
    small = image_noise((4, 4, 6), 5, None, 0.0)
    grown = image_noise((4, 8, 12), 5, None, 0.0, resize_from=(4, 6))
    assert torch.equal(grown[:, 2:6, 3:9], small)  # the small field in the middle
    outside = torch.ones_like(grown, dtype=torch.bool)
    outside[:, 2:6, 3:9] = False
    assert torch.equal(grown[outside], full[outside])  # the rest: the full-size draw of the same seed
    big = image_noise((4, 16, 20), 5, None, 0.0)
    assert torch.equal(image_noise((4, 8, 12), 5, None, 0.0, resize_from=(16, 20)), big[:, 4:12, 4:16])  # cropped
    varied = image_noise((4, 8, 12), 5, 9, 0.5, resize_from=(4, 6))  # the variation seed is drawn small too
    assert torch.equal(varied[:, 2:6, 3:9], image_noise((4, 4, 6), 5, 9, 0.5))


def test_resize_seed_keeps_a_composition_across_sizes(engine):
    """Widening a 64x64 picture with its seed resized from 64x64 keeps the middle close to the original; without
    it, the same seed at 96x64 is another picture."""
    small = px(engine.generate(req(seed=12)).images[0])
    wide = engine.generate(req(seed=12, width=96, seed_resize_from_w=64, seed_resize_from_h=64))
    plain = px(engine.generate(req(seed=12, width=96)).images[0])
    resized = px(wide.images[0])
    middle = lambda a: a[:, 16:80]  # noqa: E731
    assert np.abs(middle(resized) - small).mean() < 0.6 * np.abs(middle(plain) - small).mean()
    assert "Seed resize from: 64x64" in wide.records[0].infotext
    with pytest.raises(ValueError):
        req(noise="comfy", seed_resize_from_w=64, seed_resize_from_h=64)


def test_schedules_change_the_result(engine):
    normal = engine.generate(req(sampler_name="DPM++ 2M", scheduler="normal", steps=5)).images[0]
    karras = engine.generate(req(sampler_name="DPM++ 2M", scheduler="karras", steps=5)).images[0]
    assert np.abs(px(normal) - px(karras)).mean() > 0.1


def test_img2img_strength(engine, tmp_path):
    """Low strength keeps the output tied to the init image; high strength frees it. Measured as how
    much two different init images still differ after img2img (a random VAE cannot reconstruct, so
    distance to the input itself is not meaningful on tiny models)."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "a.png")
    Image.fromarray(255 - ramp.transpose(1, 0, 2)).save(tmp_path / "b.png")

    def spread(strength):
        a = engine.generate(req(init_image=str(tmp_path / "a.png"), denoising_strength=strength, steps=10)).images[0]
        b = engine.generate(req(init_image=str(tmp_path / "b.png"), denoising_strength=strength, steps=10)).images[0]
        return np.abs(px(a) - px(b)).mean()
    low, high = spread(0.2), spread(0.95)
    assert low > 2 * high, (low, high)


def test_tiny_strength_still_runs_one_step(engine, tmp_path):
    """steps x strength below one (0.05 x 4) ran zero steps in diffusers and crashed; WebUI runs one."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "a.png")
    steps = []
    out = engine.generate(req(init_image=str(tmp_path / "a.png"), denoising_strength=0.05, steps=4),
                          progress=lambda e: steps.append(e.step))
    assert out.images[0].size == (64, 64) and max(steps) == 1


def test_inpaint_keeps_unmasked_pixels(engine, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    init.save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = engine.generate(req(init_image=str(tmp_path / "i.png"), mask=str(tmp_path / "m.png"),
                              denoising_strength=1.0, mask_blur=2)).images[0]
    o, i = px(out), px(init)
    outside = np.ones((64, 64), bool)
    outside[10:54, 10:54] = False  # mask plus its blur radius
    assert np.array_equal(o[outside], i[outside])
    assert np.abs(o[20:44, 20:44] - i[20:44, 20:44]).mean() > 5  # the masked area was repainted


def _inpaint_inputs(tmp_path, size=64):
    yy, xx = np.indices((size, size))
    init = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    init[26:38, 30:42] = (250, 250, 20)  # an object under the mask, unlike its surroundings
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((size, size), np.uint8)
    mask[24:40, 28:44] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return init.astype(np.int16), mask > 0


def test_masked_content_choices_start_differently_and_never_touch_the_rest(engine, tmp_path):
    init, inside = _inpaint_inputs(tmp_path)
    kw = dict(init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"), mask_blur=0,
              denoising_strength=0.5, seed=3)  # a tiny random model ignores its start at full strength
    outs = {fill: px(engine.generate(req(inpainting_fill=fill, **kw)).images[0])
            for fill in ("original", "fill", "latent noise", "latent nothing")}
    for fill, out in outs.items():
        assert np.array_equal(out[~inside], init[~inside]), fill  # outside the mask: the input, exactly
    fills = list(outs)
    for i, a in enumerate(fills):
        for b in fills[i + 1:]:
            assert np.abs(outs[a][inside] - outs[b][inside]).mean() > 1, (a, b)
    flipped = px(engine.generate(req(inpainting_mask_invert=True, **kw)).images[0])
    assert np.array_equal(flipped[inside], init[inside]) and np.abs(flipped[~inside] - init[~inside]).mean() > 1


def test_fill_paints_the_hole_from_its_surroundings():
    from imagesmith.engine.generate import fill_masked
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (200, 30, 30)
    img[24:40, 24:40] = (20, 20, 220)  # the object to replace
    mask = np.zeros((64, 64), np.uint8)
    mask[22:42, 22:42] = 255
    out = np.asarray(fill_masked(Image.fromarray(img), Image.fromarray(mask)), np.int16)
    assert np.abs(out[32, 32] - np.array([200, 30, 30])).max() < 30  # red from around, not the blue object


def test_only_masked_repaints_a_crop_at_full_size(engine, tmp_path):
    from imagesmith.engine.generate import masked_crop
    init, inside = _inpaint_inputs(tmp_path)
    box = masked_crop(Image.open(tmp_path / "mask.png"), 4, (64, 64))
    assert box == (24, 20, 48, 44)  # 16x16 mask + 4 px each side, squared to the working aspect
    assert masked_crop(Image.new("L", (64, 64), 0), 4, (64, 64)) is None
    wide = masked_crop(Image.open(tmp_path / "mask.png"), 0, (128, 64))
    assert (wide[2] - wide[0]) == 2 * (wide[3] - wide[1])  # widened to the aspect, not stretched
    kw = dict(init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"), mask_blur=0,
              denoising_strength=0.8, seed=3)
    whole = px(engine.generate(req(**kw)).images[0])
    only = engine.generate(req(inpaint_full_res=True, inpaint_full_res_padding=4, **kw)).images[0]
    assert only.size == (64, 64)
    only = px(only)
    assert np.array_equal(only[~inside], init[~inside])
    assert np.abs(only[inside] - whole[inside]).mean() > 1  # repainted at 4x the detail, not the same picture


def test_outpaint_grows_canvas_and_keeps_original(engine, tmp_path):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    init.save(tmp_path / "o.png")
    out = engine.generate(req(init_image=str(tmp_path / "o.png"), outpaint=(16, 0, 16, 0), width=None,
                              height=None, mask_blur=0, denoising_strength=1.0)).images[0]
    assert out.size == (80, 48)
    assert np.array_equal(px(out)[:, 16:64], px(init))


def test_mask_size_mismatch_is_an_error(engine, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "b.png")
    with pytest.raises(BadRequest, match="mask is 32x32"):
        engine.generate(req(init_image=str(tmp_path / "a.png"), mask=str(tmp_path / "b.png")))


@pytest.mark.parametrize("lora", ["tiny-lora-peft", "tiny-lora-kohya"])
def test_lora_effect_and_weight_zero_identity(engine, lora):
    base = engine.generate(req()).images[0]
    zero = engine.generate(req(loras=[LoraSpec(name=lora, weight=0.0)])).images[0]
    one = engine.generate(req(loras=[LoraSpec(name=lora, weight=1.0)])).images[0]
    again = engine.generate(req()).images[0]
    assert np.array_equal(px(base), px(zero))
    assert np.abs(px(one) - px(base)).mean() > 0.5
    assert np.array_equal(px(base), px(again))  # switching the LoRA off restores the base


def test_lora_prompt_tag_and_reweight_without_reload(engine):
    loads = engine.cache.stats.loads
    a = engine.generate(req(prompt="an apple <lora:tiny-lora-peft:0.5>")).images[0]
    b = engine.generate(req(prompt="an apple", loras=[LoraSpec(name="tiny-lora-peft", weight=0.5)])).images[0]
    c = engine.generate(req(prompt="an apple", loras=[LoraSpec(name="tiny-lora-peft", weight=1.5)])).images[0]
    assert np.array_equal(px(a), px(b))
    assert not np.array_equal(px(b), px(c))
    assert engine.cache.stats.loads == loads  # same base model, no reload


def test_lora_stack_mixes(engine):
    base = engine.generate(req()).images[0]
    one = engine.generate(req(loras=[LoraSpec(name="tiny-lora-peft", weight=0.7)])).images[0]
    two = engine.generate(req(loras=[LoraSpec(name="tiny-lora-peft", weight=0.7),
                                     LoraSpec(name="tiny-lora-kohya", weight=0.5)])).images[0]
    assert not np.array_equal(px(one), px(two))
    assert not np.array_equal(px(base), px(two))
    r = engine.generate(req(loras=[LoraSpec(name="tiny-lora-peft", weight=0.7),
                                   LoraSpec(name="tiny-lora-kohya", weight=0.5)]))
    assert "Lora hashes:" in r.records[0].infotext and set(r.lora_hashes) == {"tiny-lora-peft", "tiny-lora-kohya"}
    assert all(len(h) == 12 for h in r.lora_hashes.values())


def test_prompt_encodings_are_reused_but_not_across_loras(engine):
    engine.generate(req(prompt="a unique pear prompt", batch_count=3))
    hits = engine.prompt_encoder.hits
    assert hits >= 2  # runs 2 and 3 reused run 1's encoding
    base = engine.generate(req(prompt="a unique pear prompt")).images[0]
    misses = engine.prompt_encoder.misses
    engine.generate(req(prompt="a unique pear prompt", loras=[LoraSpec(name="tiny-lora-peft", weight=1.0)]))
    assert engine.prompt_encoder.misses > misses  # LoRA on the text encoder: a new encoding, not the cached one
    misses = engine.prompt_encoder.misses
    again = engine.generate(req(prompt="a unique pear prompt")).images[0]
    assert engine.prompt_encoder.misses == misses  # back to the base: served from the cache
    assert np.array_equal(px(base), px(again))


def test_second_job_does_not_reload(engine):
    engine.generate(req())
    loads = engine.cache.stats.loads
    engine.generate(req(seed=3))
    assert engine.cache.stats.loads == loads
    assert engine.cache.stats.hits >= 1


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "R-ESRGAN 4x+"])
def test_hires_fix(engine, upscaler):
    r = engine.generate(req(hires=HiresSpec(hr_scale=2.0, hr_upscaler=upscaler, hr_second_pass_steps=2,
                                            hr_denoising_strength=0.5)))
    assert r.images[0].size == (128, 128)
    assert "Hires upscale: 2" in r.records[0].infotext



def test_hires_with_zero_strength_only_upscales(engine):
    first = engine.generate(req()).images[0]
    events = []
    r = engine.generate(req(hires=HiresSpec(hr_scale=2.0, hr_upscaler="Lanczos", hr_denoising_strength=0.0)),
                        progress=events.append)
    assert r.images[0].size == (128, 128)
    assert events[-1].total == 4  # no second diffusion pass counted or run
    expected = np.asarray(first.resize((128, 128), Image.LANCZOS), np.int16)
    assert np.abs(np.asarray(r.images[0], np.int16) - expected).max() <= 1
    with pytest.raises(BadRequest, match="denoising strength"):
        engine.generate(req(hires=HiresSpec(hr_scale=2.0, hr_upscaler="Latent", hr_denoising_strength=0.0)))

def test_progress_and_cancel(engine):
    events = []
    engine.generate(req(steps=4, batch_count=2), progress=events.append)
    assert [e.step for e in events] == list(range(1, 9))
    assert events[-1].total == 8
    token = CancelToken()

    def cancel_after_two(ev):
        if ev.step == 2:
            token.cancel()
    seen = []
    with pytest.raises(Cancelled):
        engine.generate(req(steps=10), progress=lambda e: (seen.append(e), cancel_after_two(e)), cancel=token)
    assert len(seen) == 2  # stopped at the next step boundary


def test_clip_skip_changes_output(engine):
    a = engine.generate(req(clip_skip=1)).images[0]
    b = engine.generate(req(clip_skip=2)).images[0]
    assert not np.array_equal(px(a), px(b))


def test_long_prompt_is_not_truncated(engine):
    words = ", ".join(["red apple"] * 60)
    a = engine.generate(req(prompt=words)).images[0]
    b = engine.generate(req(prompt=words + ", " + ", ".join(["blue sky"] * 40))).images[0]
    assert not np.array_equal(px(a), px(b))  # tokens past 77 still matter


def test_unknown_model_and_lora(engine):
    with pytest.raises(ModelNotFound):
        engine.generate(req(model="no-such-model"))
    with pytest.raises(ModelNotFound):
        engine.generate(req(loras=[LoraSpec(name="nope", weight=1)]))


def test_pixel_cap(engine, tiny_home):
    capped = Engine(tiny_home.model_copy(update={"max_pixels": 64 * 64}), device="cpu", cache=engine.cache)
    with pytest.raises(BadRequest, match="pixel cap"):
        capped.generate(req(width=128, height=128))


def test_midjourney_parameters_in_the_prompt_set_size_seed_and_negative(engine):
    r = engine.generate(req(prompt="a red apple --ar 2:1 --seed 77 --no blur", width=None, height=None, seed=-1))
    w, h = r.images[0].size
    assert abs(w / h - 2) < 0.2 and w % 8 == 0 and h % 8 == 0 and 0.7 < w * h / 64 ** 2 < 1.3  # tiny: 64 px native
    assert r.records[0].seed == 77
    info = r.records[0].infotext
    assert info.startswith("a red apple\nNegative prompt: blur") and "--ar" not in info
    explicit = engine.generate(req(prompt="a red apple --seed 77", seed=5))
    assert explicit.records[0].seed == 5  # a seed the request names wins over the prompt's
