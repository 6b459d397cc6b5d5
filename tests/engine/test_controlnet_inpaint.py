"""The inpaint ControlNets (lllyasviel's control_v11p_sd15_inpaint; A1111's inpaint_only and
inpaint_global_harmonious): the control image is the picture with its hole set to -1, below the picture's 0..1,
as diffusers' documentation builds it; the hole is the unit's mask, else the inpainting request's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.inpaint import picture_and_mask
from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import ControlNetSpec, GenerateRequest
from imagesmith.engine.controlnet import inpaint_hint
from imagesmith.engine.generate import Engine


def test_the_hint_is_the_picture_with_its_hole_at_minus_one(tmp_path):
    picture, mask, _, _ = picture_and_mask(tmp_path)
    hint = inpaint_hint(picture, mask, (64, 64))
    want = torch.from_numpy(np.asarray(picture, np.float32) / 255.0).permute(2, 0, 1)[None]
    hole = torch.from_numpy(np.asarray(mask) > 127)[None, None].expand_as(want)
    assert torch.equal(hint[hole], torch.full_like(hint[hole], -1.0)) and torch.equal(hint[~hole], want[~hole])


@pytest.mark.parametrize("module", ["inpaint_only", "inpaint_global_harmonious"])
def test_the_controlnet_sees_the_hole_from_the_unit_or_the_request(tiny_home, tmp_path, module):
    picture, mask, pic_path, mask_path = picture_and_mask(tmp_path)
    engine = Engine(tiny_home, device="cpu")
    cn = engine._component("controlnet", "tiny-controlnet")
    seen = []
    hook = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True)
    base = dict(prompt="a vase", model="tiny-sd15", width=64, height=64, steps=1, seed=1, sampler_name="Euler",
                cfg_scale=1.0)
    try:
        engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
            model="tiny-controlnet", image=pic_path, mask=mask_path, preprocessor=module)))
        from_unit = seen[-1]
        engine.generate(GenerateRequest(**base, init_image=pic_path, mask=mask_path, denoising_strength=1.0,
                                        controlnet=ControlNetSpec(model="tiny-controlnet", image=pic_path,
                                                                  preprocessor=module)))
        from_request = seen[-1]
    finally:
        hook.remove()
    want = inpaint_hint(picture, mask, (64, 64))
    assert torch.allclose(from_unit[:1].float(), want) and torch.allclose(from_request[:1].float(), want)
    with pytest.raises(BadRequest, match="marks the hole to repaint: give the unit a mask"):
        engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(model="tiny-controlnet", image=pic_path,
                                                                          preprocessor=module)))


def test_only_masked_inpainting_crops_the_control_image_and_its_hole_alike(tiny_home, tmp_path):
    """A1111's "Inpaint area: Only masked" repaints a box around the mask at the full working size; the ControlNet
    then sees the same box of its control image (and of the hole), not the whole image squeezed into it."""
    from imagesmith.engine.generate import masked_crop
    from fixtures.inpaint import picture_and_mask
    picture, mask, pic_path, mask_path = picture_and_mask(tmp_path)
    control = Image.fromarray((np.indices((64, 64)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    control.save(tmp_path / "control.png")
    engine = Engine(tiny_home, device="cpu")
    cn = engine._component("controlnet", "tiny-controlnet")
    seen = []
    hook = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True)
    req = GenerateRequest(prompt="a vase", model="tiny-sd15", width=64, height=64, steps=1, seed=1,
                          sampler_name="Euler", cfg_scale=1.0, init_image=pic_path, mask=mask_path, mask_blur=0,
                          denoising_strength=1.0, inpaint_full_res=True, inpaint_full_res_padding=4,
                          controlnet=[ControlNetSpec(model="tiny-controlnet", image=str(tmp_path / "control.png"),
                                                     preprocessor="none"),
                                      ControlNetSpec(model="tiny-controlnet", image=pic_path, preprocessor="inpaint_only")])
    try:
        engine.generate(req)
    finally:
        hook.remove()
    box = masked_crop(mask, 4, (64, 64))
    assert box is not None and box != (0, 0, 64, 64)
    want = np.asarray(control.crop(box).resize((64, 64), Image.LANCZOS), np.float32) / 255.0
    got = seen[0][0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() < 1e-5  # the box of the control image, at the working size
    hint = inpaint_hint(picture.crop(box).resize((64, 64), Image.LANCZOS), mask.crop(box).resize((64, 64), Image.NEAREST),
                        (64, 64))
    assert torch.allclose(seen[1][:1].float(), hint)  # the hole cropped alike
