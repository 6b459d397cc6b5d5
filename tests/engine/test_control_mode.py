"""A1111's ControlNet Control Mode on SD ControlNets: 'My prompt is more important' scales the UNet's residuals by
the extension's soft-injection factors (0.825 ** (12 - i), down blocks then the middle); 'ControlNet is more
important' also keeps them off the unconditional half of CFG. Checked on the residuals the UNet receives, on the
picture, in the infotext, through webuiapi's units, and refused where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import ControlNetSpec, GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.engine.sampling.denoisers import soft_scales


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def _control(tmp_path) -> str:
    im = Image.new("RGB", (64, 64), "white")
    im.paste((0, 0, 0), (16, 16, 48, 48))
    im.save(tmp_path / "c.png")
    return str(tmp_path / "c.png")


def _residuals(engine, req):
    """Each UNet call's ControlNet residuals (down list, middle) and its batch size."""
    pipe = engine.pipeline(engine.checkpoint(req.model)).value
    seen = []

    def hook(module, args, kwargs):
        if kwargs.get("down_block_additional_residuals") is not None:
            seen.append(([d.detach().clone() for d in kwargs["down_block_additional_residuals"]],
                         kwargs["mid_block_additional_residual"].detach().clone()))
    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = engine.generate(req)
    finally:
        handle.remove()
    return result, seen


def test_the_extensions_soft_injection_factors():
    scales = soft_scales(13)  # an SD1 UNet: 12 down residuals and the middle
    assert scales[0] == pytest.approx(0.825 ** 12) and scales[-1] == 1.0 and scales[11] == pytest.approx(0.825)
    assert soft_scales(10) == scales[:10]  # SDXL's 9 + 1: the first ten, as the extension's zip takes them


def test_control_modes_shape_the_residuals_the_unet_receives(engine, tmp_path):
    kw = dict(prompt="a box", negative_prompt="blur", model="tiny-sd15", width=64, height=64, steps=2, seed=1,
              sampler_name="Euler", cfg_scale=5.0)
    unit = ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path), preprocessor="none")
    balanced, base = _residuals(engine, GenerateRequest(**kw, controlnet=unit))
    prompt, soft = _residuals(engine, GenerateRequest(**kw, controlnet=unit.model_copy(update={"control_mode": "prompt"})))
    control, cond_only = _residuals(engine, GenerateRequest(**kw, controlnet=unit.model_copy(
        update={"control_mode": "controlnet"})))
    assert len(base) == len(soft) == len(cond_only) == 2  # one batched CFG call a step
    (down, mid), (sdown, smid), (cdown, cmid) = base[0], soft[0], cond_only[0]
    factors = soft_scales(len(down) + 1)
    for d, s, f in zip(down, sdown, factors):
        assert torch.allclose(s, d * f, atol=1e-5)
    assert torch.allclose(smid, mid * factors[-1], atol=1e-5)
    rows = mid.shape[0] // 2  # [uncond, cond]
    assert all(float(c[:rows].abs().max()) == 0.0 for c in [*cdown, cmid])  # nothing on the negative's half
    assert torch.allclose(cdown[0][rows:], sdown[0][rows:], atol=1e-5)
    pictures = [np.asarray(r.images[0], np.int16) for r in (balanced, prompt, control)]
    assert np.abs(pictures[0] - pictures[1]).max() > 0 and np.abs(pictures[1] - pictures[2]).max() > 0
    assert 'tiny-controlnet (none, 1, My prompt is more important)' in prompt.records[0].infotext
    assert 'tiny-controlnet (none, 1)"' in balanced.records[0].infotext or \
        "ControlNet: tiny-controlnet (none, 1)" in balanced.records[0].infotext


def test_without_cfg_controlnet_mode_keeps_every_row(engine, tmp_path):
    """cfg 1 makes no unconditional rows: 'ControlNet is more important' is then the soft factors alone (a batch of
    two pictures keeps its control on both)."""
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=1, seed=1, sampler_name="Euler",
              cfg_scale=1.0, batch_size=2)
    unit = ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path), preprocessor="none")
    _, soft = _residuals(engine, GenerateRequest(**kw, controlnet=unit.model_copy(update={"control_mode": "prompt"})))
    _, both = _residuals(engine, GenerateRequest(**kw, controlnet=unit.model_copy(update={"control_mode": "controlnet"})))
    assert soft[0][1].shape[0] == 2 and float(both[0][1][0].abs().max()) > 0
    assert torch.allclose(soft[0][1], both[0][1])


def test_an_unknown_control_mode_is_refused(tmp_path):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="control_mode"):
        ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path), control_mode="loud")


def test_a1111_units_carry_the_control_mode():
    """webuiapi sends control_mode as 0, 1, 2; other clients send the UI's names."""
    import webuiapi
    from imagesmith.serve.api.a1111_controlnet import _unit
    picture = Image.new("RGB", (8, 8))
    for value, want in ((0, "balanced"), (1, "prompt"), (2, "controlnet"), ("My prompt is more important", "prompt"),
                        ("ControlNet is more important", "controlnet"), ("Balanced", "balanced")):
        unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="m", control_mode=value).to_dict()
        assert _unit(unit, lambda data: "upload")["control_mode"] == want
    with pytest.raises(BadRequest, match="control_mode 'Loud' is not one of the extension's"):
        _unit(webuiapi.ControlNetUnit(image=picture, module="canny", model="m", control_mode="Loud").to_dict(),
              lambda data: "upload")


def test_the_hires_pass_gets_the_map_at_its_size_and_soft_weights(engine, tmp_path):
    """Hires fix with a ControlNet (it used to fail: the control image stayed at the first pass's size): the second
    pass's ControlNet reads the map at the hires size, and, as the extension does in hires fix, its residuals carry
    the soft-injection factors whatever the control mode."""
    from imagesmith.core.requests import HiresSpec
    pipe = engine.pipeline(engine.checkpoint("tiny-sd15")).value
    cn = engine._component("controlnet", "tiny-controlnet")
    conds, residuals = [], []
    h1 = cn.register_forward_pre_hook(lambda m, a, kw: conds.append(tuple(kw["controlnet_cond"].shape)),
                                      with_kwargs=True)
    raw = []
    h3 = cn.register_forward_hook(lambda m, a, out: raw.append((len(out[0]), out[1].clone())))
    h2 = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: residuals.append(kw["mid_block_additional_residual"].clone())
        if kw.get("mid_block_additional_residual") is not None else None, with_kwargs=True)
    try:
        out = engine.generate(GenerateRequest(
            prompt="a box", model="tiny-sd15", width=64, height=64, steps=2, seed=1, sampler_name="Euler",
            cfg_scale=1.0, hires=HiresSpec(hr_scale=2, hr_upscaler="Lanczos", hr_denoising_strength=0.5),
            controlnet=ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path), preprocessor="none")))
    finally:
        h1.remove()
        h2.remove()
        h3.remove()
    assert out.images[0].size == (128, 128)
    assert conds[0][-2:] == (64, 64) and conds[-1][-2:] == (128, 128)
    assert len(residuals) == len(conds) == len(raw)
    downs, first_mid = raw[0]
    factor = soft_scales(downs + 1)[-1]
    assert factor < 1 and torch.allclose(residuals[0], first_mid)  # balanced in the first pass
    assert torch.allclose(residuals[-1], raw[-1][1] * factor, atol=1e-6)  # soft in the hires pass


def test_a_controlnet_for_another_unet_is_one_line(engine, tmp_path):
    """An SD1.5 ControlNet on an SDXL model used to fail deep in a matrix product; it is one line naming both."""
    with pytest.raises(BadRequest, match="tiny-controlnet is a ControlNet for .* models .*tiny-sdxl is SDXL") as err:
        engine.generate(GenerateRequest(prompt="a box", model="tiny-sdxl", width=64, height=64, steps=1,
                                        controlnet=ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path))))
    assert len(str(err.value).splitlines()) == 1


def test_an_sd_controlnets_weight_and_step_window(engine, tmp_path):
    """A plain SD1.5 ControlNet (diffusers' ControlNetModel): weight 0 gives the base picture exactly; a window over
    the second half of the steps feeds residuals to those steps only (none before), and its picture lies between
    the base and the full unit's."""
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=4, seed=3, sampler_name="Euler",
              cfg_scale=5.0)
    unit = ControlNetSpec(model="tiny-controlnet", image=_control(tmp_path), preprocessor="none")
    base = np.asarray(engine.generate(GenerateRequest(**kw)).images[0], np.int16)
    zero = np.asarray(engine.generate(GenerateRequest(**kw, controlnet=unit.model_copy(
        update={"weight": 0.0}))).images[0], np.int16)
    assert np.array_equal(zero, base)
    full, full_seen = _residuals(engine, GenerateRequest(**kw, controlnet=unit))
    late, late_seen = _residuals(engine, GenerateRequest(**kw, controlnet=unit.model_copy(
        update={"guidance_start": 0.5})))
    assert len(full_seen) == 4 and len(late_seen) == 2  # steps 3 and 4 only
    full, late = (np.asarray(r.images[0], np.int16) for r in (full, late))
    assert np.abs(late - base).max() > 0 and np.abs(late - full).max() > 0


def test_an_unknown_or_pickled_controlnet_is_one_line(tiny_home, tmp_path):
    """A ControlNet that is not there is a ModelNotFound naming it; a pickle checkpoint (.pth with a global that runs
    a shell command) is refused without being unpickled, naming the file; neither leaves anything in the cache."""
    import pickle

    from fixtures.tiny import home_with
    from imagesmith.core.errors import ImagesmithError
    settings = home_with(tmp_path / "home", tiny_home, "checkpoints/tiny-sd15")
    folder = settings.models_dir / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {ran}",))
    (folder / "control_v11p_sd15_canny.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
    engine = Engine(settings, device="cpu")
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=1, seed=1)
    for name, says in (("nope", "nope"), ("control_v11p_sd15_canny", "control_v11p_sd15_canny.pth")):
        keys = set(engine.cache.keys())
        with pytest.raises(ImagesmithError) as err:
            engine.generate(GenerateRequest(**kw, controlnet=ControlNetSpec(model=name, image=_control(tmp_path))))
        assert says in str(err.value) and "\n" not in str(err.value)
        assert not [k for k in engine.cache.keys() if k not in keys and "controlnet" in str(k).lower()]
    assert not ran.exists()  # never unpickled


def test_a_pth_controlnet_as_a1111_folders_hold_them(tiny_home, tmp_path):
    """lllyasviel's ControlNet 1.1 releases are .pth files (control_v11p_sd15_canny.pth, no control_model. prefix):
    listed as an SD1 ControlNet, its tensors read as data (never unpickled), converted once to safetensors in the
    cache, and the same pixels as the same weights in a .safetensors file (the tiny network's config.json beside
    it; a real SD1.5 one needs none)."""
    import torch
    from safetensors.torch import load_file

    from fixtures.tiny import home_with
    settings = home_with(tmp_path / "home", tiny_home, "checkpoints/tiny-sd15",
                         "controlnet/tiny-controlnet-single.safetensors")
    state = load_file(str(tiny_home.models_dir / "controlnet" / "tiny-controlnet-single.safetensors"))
    torch.save({k.removeprefix("control_model."): v for k, v in state.items()},
               settings.models_dir / "controlnet" / "control_v11p_sd15_tiny.pth")
    import json

    from imagesmith.models.probe import embedded_configs, read_header  # the tiny network's shape (real: SD1.5's)
    config = embedded_configs(read_header(tiny_home.models_dir / "controlnet" / "tiny-controlnet-single.safetensors"))
    (settings.models_dir / "controlnet" / "config.json").write_text(json.dumps(config["controlnet"]))
    engine = Engine(settings, device="cpu")
    entry = engine.registry.get("control_v11p_sd15_tiny", "controlnet")
    assert entry.kind == "controlnet" and entry.arch == "sd1" and entry.format == "torch-file"
    assert any("never unpickled" in n for n in entry.notes)
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=2, seed=1, sampler_name="Euler")
    image = _control(tmp_path)
    a, b = (np.asarray(engine.generate(GenerateRequest(**kw, controlnet=ControlNetSpec(
        model=name, image=image, preprocessor="none"))).images[0]) for name in ("control_v11p_sd15_tiny",
                                                                              "tiny-controlnet-single"))
    assert np.array_equal(a, b)
    assert len(list((settings.home / "cache" / "models").glob("control_v11p_sd15_tiny-*.safetensors"))) == 1
