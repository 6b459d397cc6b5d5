"""SD inpainting checkpoints (a 9-channel UNet) on an inpaint request: the UNet reads [latent, mask, masked picture's
latent], the masked picture with its hole mid-grey (0 in [-1, 1]) exactly as diffusers' StableDiffusionInpaintPipeline
(a peer we did not write) encodes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine


def test_an_inpainting_unet_reads_the_mask_and_diffusers_masked_latent(tiny_home, tmp_path, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as peer_module
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    engine = Engine(tiny_home, device="cpu")
    base = StableDiffusionPipeline.from_pretrained(engine.checkpoint("tiny-sd15").path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}).eval()
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    engine.adopt("tiny-sd15-inpainting", pipe, "sd1")
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    req = _inpaint_request(tmp_path, "tiny-sd15-inpainting").model_copy(update={"inpaint_full_res": False})
    picture, mask = Image.open(req.init_image), Image.open(req.mask)
    try:
        out = engine.generate(req)
    finally:
        hook.remove()
    assert seen and seen[0].shape[1] == 9 and out.images[0].size == (64, 64)
    original = peer_module.retrieve_latents
    monkeypatch.setattr(peer_module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": original(enc, generator, "argmax"))
    image = pipe.image_processor.preprocess(picture, height=64, width=64)
    mask_t = pipe.mask_processor.preprocess(mask, height=64, width=64)
    want_mask, want_masked = pipe.prepare_mask_latents(mask_t, image * (mask_t < 0.5), 1, 64, 64, torch.float32,
                                                       "cpu", torch.Generator().manual_seed(0), False)
    got_mask, got_masked = seen[0][:1, 4:5], seen[0][:1, 5:]
    assert torch.allclose(got_masked, want_masked, atol=1e-4)
    assert torch.allclose(got_mask, want_mask, atol=1e-6)
    kept = np.asarray(out.images[0], int)[:8, :8] - np.asarray(picture, int)[:8, :8]
    assert np.abs(kept).max() <= 2  # outside the mask the picture stays


def _inpaint_files(tiny_home, home, arch: str):
    """A tiny inpainting checkpoint of ``arch`` (its UNet reads 9 channels), saved as a diffusers folder and as an
    A1111 single file (the layout sd-v1-5-inpainting.ckpt and sd_xl_base_1.0_inpainting_0.1 were converted to)."""
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from imagesmith.models.convert import export_single_file
    name = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}[arch]
    base_cls, inpaint_cls = {"sd1": (StableDiffusionPipeline, StableDiffusionInpaintPipeline),
                             "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLInpaintPipeline)}[arch]
    base = base_cls.from_pretrained(tiny_home.models_dir / "checkpoints" / name)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}).eval()
    pipe = inpaint_cls(**{**base.components, "unet": unet})
    ckpt = home.models_dir / "checkpoints"
    pipe.save_pretrained(ckpt / f"{name}-inpainting", safe_serialization=True)
    export_single_file(pipe, arch, ckpt / f"{name}-inpainting-single.safetensors")


def _inpaint_request(tmp_path, model: str) -> GenerateRequest:
    from fixtures.inpaint import picture_and_mask
    _, _, picture, mask = picture_and_mask(tmp_path)
    return GenerateRequest(prompt="a vase", model=model, init_image=picture, mask=mask, mask_blur=0, width=64,
                           height=64, steps=2, seed=1, denoising_strength=1.0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_inpainting_checkpoints_from_a_folder_and_a_single_file(tiny_home, tmp_path, arch):
    """SD1.5 and SDXL inpainting checkpoints as people have them: the probe names them, and an inpaint request runs
    their 9-channel UNet, from the diffusers folder and from the single file alike (the same pixels)."""
    from imagesmith.core.settings import Settings
    from imagesmith.models.probe import probe
    home = Settings(home=tmp_path / "home")
    home.ensure_home()
    _inpaint_files(tiny_home, home, arch)
    name = {"sd1": "tiny-sd15", "sdxl": "tiny-sdxl"}[arch]
    single = home.models_dir / "checkpoints" / f"{name}-inpainting-single.safetensors"
    found = probe(single)
    assert found.arch == arch and any("inpainting model (9 input channels)" in n for n in found.notes)
    engine = Engine(home, device="cpu")
    pictures = {}
    for model in (f"{name}-inpainting", f"{name}-inpainting-single"):
        unet = engine.pipeline(engine.checkpoint(model)).value.unet
        seen = []
        hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        try:
            pictures[model] = np.asarray(engine.generate(_inpaint_request(tmp_path, model)).images[0], np.int16)
        finally:
            hook.remove()
        assert seen and set(seen) == {9}, (model, seen)
    a, b = pictures.values()
    assert np.abs(a - b).max() <= 2
