"""Qwen-Image ControlNets (InstantX's, diffusers' QwenImageControlNetModel) on a tiny Qwen-Image: the same pixels as
diffusers' own QwenImageControlNetPipeline (a peer we did not write), weight 0 gives the plain picture, the
ComfyUI single file without a config is read off its shapes, and a ControlNet of the wrong family is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.tiny import build_qwen_image
from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import ControlNetSpec, GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine

QWEN = "tiny-qwen-image"


def _controlnet(transformer, seed: int = 1, extra: int = 0):
    """A tiny ControlNet made from the tiny transformer as InstantX made theirs (from_transformer), its zero-initialised
    input and output layers given weights so it acts (``extra``: 4 for the inpainting one, whose input reads the
    mask's channel beside the latent's 16)."""
    from diffusers import QwenImageControlNetModel
    cn = QwenImageControlNetModel.from_transformer(transformer, num_layers=2, attention_head_dim=16,
                                                   num_attention_heads=2, extra_condition_channels=extra)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [cn.controlnet_x_embedder, *cn.controlnet_blocks]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.02)
    return cn.eval()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from safetensors.torch import save_file
    settings = Settings(home=tmp_path_factory.mktemp("qwen-cn-home"))
    settings.ensure_home()
    pipe = build_qwen_image(0)
    pipe.save_pretrained(settings.models_dir / "checkpoints" / QWEN, safe_serialization=True)
    cn = _controlnet(pipe.transformer)
    folder = settings.models_dir / "controlnet"
    cn.save_pretrained(folder / "tiny-qwen-union", safe_serialization=True)
    # as ComfyUI keeps it: one file, no config beside it
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(folder / "tiny-qwen-union-file.safetensors"))
    _controlnet(pipe.transformer, seed=2, extra=4).save_pretrained(folder / "tiny-qwen-inpaint", safe_serialization=True)
    return settings


@pytest.fixture(scope="module")
def engine(home):
    return Engine(home, device="cpu")


def _control(tmp_path) -> str:
    im = Image.new("RGB", (64, 48), (10, 10, 10))
    im.paste((240, 240, 240), (12, 8, 30, 40))
    im.paste((120, 200, 60), (36, 20, 58, 30))
    path = tmp_path / "control.png"
    im.save(path)
    return str(path)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.float32)


def test_a_qwen_controlnet_draws_diffusers_pipelines_pixels(engine, tmp_path, monkeypatch):
    """Euler on the simple schedule with true CFG: the ControlNet's residuals (from the positive prompt) in both
    passes, the control image VAE-encoded, normalised and packed: diffusers' QwenImageControlNetPipeline gives the
    same picture (it draws the control latent from the VAE's posterior; imagesmith takes its mode, as ComfyUI does,
    so the peer is run with the mode too)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet as peer_module
    from diffusers import QwenImageControlNetPipeline
    control = _control(tmp_path)
    req = GenerateRequest(prompt="a red apple on a wooden table", negative_prompt="blurry", model=QWEN, width=64,
                          height=48, steps=4, cfg_scale=4.0, seed=7, sampler_name="euler", scheduler="simple",
                          noise="comfy", controlnet=ControlNetSpec(model="tiny-qwen-union", image=control,
                                                                   preprocessor="none", weight=0.8))
    ours = _pixels(engine.generate(req))
    plain = _pixels(engine.generate(req.model_copy(update={"controlnet": None})))
    assert np.abs(ours - plain).max() > 8  # the ControlNet acts
    pipe = engine.pipeline(engine.checkpoint(QWEN)).value
    cn = engine._component("controlnet", "tiny-qwen-union")
    original = peer_module.retrieve_latents
    monkeypatch.setattr(peer_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))
    peer = QwenImageControlNetPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                       tokenizer=pipe.tokenizer, transformer=pipe.transformer, controlnet=cn)
    theirs = peer(req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=4.0, width=64, height=48,
                  num_inference_steps=4, control_image=Image.open(control), controlnet_conditioning_scale=0.8,
                  generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    theirs = np.round(theirs * 255)
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()


def test_weight_zero_and_the_step_window(engine, tmp_path):
    control = _control(tmp_path)
    base = dict(prompt="a teapot", model=QWEN, width=64, height=48, steps=4, seed=3, cfg_scale=1.0)
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    zero = _pixels(engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union", image=control, preprocessor="none", weight=0.0))))
    assert np.abs(zero - plain).max() <= 1
    full = _pixels(engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union", image=control, preprocessor="none"))))
    late = _pixels(engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union", image=control, preprocessor="none", guidance_start=0.5))))
    assert np.abs(full - plain).max() > 4 and not np.array_equal(late, full) and not np.array_equal(late, plain)
    info = engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union", image=control, preprocessor="none"))).records[0].infotext
    assert 'ControlNet: "tiny-qwen-union (none, 1)"' in info


def test_the_comfyui_single_file_is_read_off_its_shapes(engine, home, tmp_path):
    """InstantX's ControlNet as ComfyUI keeps it (one .safetensors, no config): the probe names it, its config is read
    off the tensors (the real 5-block, 24x128-head union's on an empty model of it), and it draws the folder's
    pixels."""
    from diffusers import QwenImageControlNetModel
    from imagesmith.models.loaders import qwen_controlnet_config
    from imagesmith.models.probe import probe
    single = home.models_dir / "controlnet" / "tiny-qwen-union-file.safetensors"
    result = probe(single)
    assert (result.kind, result.arch) == ("controlnet", "qwen") and "Qwen-Image ControlNet" in result.notes[0]
    control = _control(tmp_path)
    base = dict(prompt="a teapot", model=QWEN, width=64, height=48, steps=2, seed=3, cfg_scale=1.0)
    a = _pixels(engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union", image=control, preprocessor="none"))))
    b = _pixels(engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-qwen-union-file", image=control, preprocessor="none"))))
    assert np.abs(a - b).max() <= 1
    with torch.device("meta"):
        real = QwenImageControlNetModel(num_layers=5)  # InstantX's union: 5 blocks of Qwen-Image's 24x128 width
    shapes = {k: list(v.shape) for k, v in real.state_dict().items()}
    derived = qwen_controlnet_config(shapes)
    for key in ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "extra_condition_channels"):
        assert derived[key] == real.config[key], key
    assert list(derived["axes_dims_rope"]) == list(real.config.axes_dims_rope)


def test_a_controlnet_of_another_family_is_one_line(engine, tmp_path, tiny_home):
    import os
    link = engine.settings.models_dir / "controlnet" / "tiny-cn"
    if not link.exists():
        src = next(p for p in (tiny_home.models_dir / "controlnet").iterdir() if p.is_dir())
        os.symlink(src, link, target_is_directory=True)
        engine.registry.scan()
    with pytest.raises(BadRequest, match="is an SD ControlNet; tiny-qwen-image is Qwen-Image"):
        engine.generate(GenerateRequest(prompt="x", model=QWEN, width=32, height=32, steps=1, controlnet=ControlNetSpec(
            model="tiny-cn", image=_control(tmp_path), preprocessor="none")))


def _mask(tmp_path) -> str:
    m = Image.new("L", (64, 48), 0)
    m.paste(255, (20, 12, 48, 36))  # repaint the middle
    path = tmp_path / "mask.png"
    m.save(path)
    return str(path)


def test_the_inpainting_controlnet_draws_diffusers_pipelines_pixels(engine, tmp_path, monkeypatch):
    """InstantX's Qwen-Image-ControlNet-Inpainting (17 latent channels in: the picture with its hole black, and the
    mask of what to keep): imagesmith with the unit's mask gives the pixels of diffusers'
    QwenImageControlNetInpaintPipeline (run with the posterior's mode, as imagesmith encodes)."""
    from diffusers import QwenImageControlNetInpaintPipeline
    control, mask = _control(tmp_path), _mask(tmp_path)
    req = GenerateRequest(prompt="a green taxi on the road", negative_prompt="blurry", model=QWEN, width=64,
                          height=48, steps=4, cfg_scale=4.0, seed=9, sampler_name="euler", scheduler="simple",
                          noise="comfy", controlnet=ControlNetSpec(model="tiny-qwen-inpaint", image=control,
                                                                   mask=mask, preprocessor="none", weight=0.9))
    ours = _pixels(engine.generate(req))
    pipe = engine.pipeline(engine.checkpoint(QWEN)).value
    cn = engine._component("controlnet", "tiny-qwen-inpaint")
    assert cn.config.extra_condition_channels == 4

    class Mode:  # the peer draws image_latents from latent_dist.sample(): give it the mode
        def __init__(self, dist):
            self.dist = dist

        def sample(self, generator=None):
            return self.dist.mode()

        def mode(self):
            return self.dist.mode()
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: type("Out", (), {"latent_dist": Mode(
        encode(x, *a, **k).latent_dist)})())
    peer = QwenImageControlNetInpaintPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                              tokenizer=pipe.tokenizer, transformer=pipe.transformer, controlnet=cn)
    theirs = peer(req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=4.0, width=64, height=48,
                  num_inference_steps=4, control_image=Image.open(control), control_mask=Image.open(mask),
                  controlnet_conditioning_scale=0.9, generator=torch.Generator().manual_seed(9),
                  output_type="np").images[0]
    theirs = np.round(theirs * 255)
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()
    # the mask is read: another mask, another picture
    other = tmp_path / "other-mask.png"
    Image.new("L", (64, 48), 255).save(other)
    moved = _pixels(engine.generate(req.model_copy(update={"controlnet": req.controlnet.model_copy(
        update={"mask": str(other)})})))
    assert np.abs(moved - ours).max() > 4


def test_the_inpainting_controlnet_takes_the_requests_mask_and_needs_one(engine, tmp_path):
    """In an inpainting request the unit reads the request's mask when it has none of its own; with no mask anywhere
    it is one line naming the field; a mask on a ControlNet that reads none is refused too."""
    control, mask = _control(tmp_path), _mask(tmp_path)
    base = dict(prompt="a teapot", model=QWEN, width=64, height=48, steps=2, seed=3, cfg_scale=1.0)
    unit = ControlNetSpec(model="tiny-qwen-inpaint", image=control, preprocessor="none")
    inpaint = dict(base, init_image=control, mask=mask, denoising_strength=1.0)
    own = _pixels(engine.generate(GenerateRequest(**inpaint, controlnet=unit.model_copy(update={"mask": mask}))))
    shared = _pixels(engine.generate(GenerateRequest(**inpaint, controlnet=unit)))
    assert np.array_equal(own, shared)
    with pytest.raises(BadRequest, match="inpainting ControlNet: give the unit a mask"):
        engine.generate(GenerateRequest(**base, controlnet=unit))
    with pytest.raises(BadRequest, match="control_mode prompt is A1111's, for SD1/SDXL ControlNets"):
        engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
            model="tiny-qwen-union", image=control, preprocessor="none", control_mode="prompt")))
    with pytest.raises(BadRequest, match="a unit's mask is read only by the inpaint preprocessors"):
        engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
            model="tiny-qwen-union", image=control, preprocessor="none", mask=mask)))
