"""SD inpainting checkpoints (a 9-channel UNet) on an inpaint request: the UNet reads [latent, mask, masked picture's
latent], the masked picture with its hole mid-grey (0 in [-1, 1]) exactly as diffusers' StableDiffusionInpaintPipeline
(a peer we did not write) encodes it."""

from __future__ import annotations

import numpy as np
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
    picture = Image.new("RGB", (64, 64), (200, 120, 40))
    picture.paste((30, 60, 220), (0, 40, 64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    try:
        out = engine.generate(GenerateRequest(prompt="a vase", model="tiny-sd15-inpainting",
                                              init_image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"),
                                              mask_blur=0, width=64, height=64, steps=2, seed=1,
                                              denoising_strength=1.0, inpaint_full_res=False))
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
