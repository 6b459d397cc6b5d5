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


def _controlnet(transformer, seed: int = 1):
    """A tiny ControlNet made from the tiny transformer as InstantX made theirs (from_transformer), its zero-initialised
    input and output layers given weights so it acts."""
    from diffusers import QwenImageControlNetModel
    cn = QwenImageControlNetModel.from_transformer(transformer, num_layers=2, attention_head_dim=16,
                                                   num_attention_heads=2)
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
