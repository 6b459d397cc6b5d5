"""SDXL Union ControlNets (xinsir's Union/ProMax as diffusers' ControlNetUnionModel) on the tiny SDXL: one model,
several control types chosen by union_mode; from a folder and from a single file with its config.json beside it."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import probe


@pytest.fixture(scope="module")
def union_home(tiny_home, tmp_path_factory):
    from diffusers import ControlNetUnionModel, UNet2DConditionModel
    from safetensors.torch import save_file

    from fixtures.tiny import _randomise_, home_with
    settings = home_with(tmp_path_factory.mktemp("union"), tiny_home, "checkpoints/tiny-sdxl")
    m = settings.models_dir
    unet = UNet2DConditionModel.from_pretrained(str(m / "checkpoints" / "tiny-sdxl" / "unet"))
    cfg = dict(ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32)).config)
    width = unet.config.block_out_channels[0]  # the real ones: 320 wide as SDXL's first block
    torch.manual_seed(3)
    params = inspect.signature(ControlNetUnionModel.__init__).parameters  # (from_config drops these overrides)
    net = ControlNetUnionModel(**{**{k: v for k, v in cfg.items() if k in params},
                                  "num_trans_channel": width, "num_proj_channel": width, "num_trans_head": 2}).eval()
    _randomise_(net, seed=3, scale=0.1)
    net.save_pretrained(m / "controlnet" / "union-folder", safe_serialization=True)
    promax = m / "controlnet" / "union-promax"  # as xinsir's release folder: config.json + a renamed weights file
    promax.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(promax / "diffusion_pytorch_model_promax.safetensors"))
    shutil.copy(m / "controlnet" / "union-folder" / "config.json", promax / "config.json")
    return settings


def _req(tmp_path, unit: dict | None) -> GenerateRequest:
    path = tmp_path / "lines.png"
    im = Image.new("RGB", (64, 64), 0)
    im.paste((255, 255, 255), (10, 0, 20, 64))
    im.save(path)
    extra = {"controlnet": {"image": str(path), "preprocessor": "none", **unit}} if unit else {}
    return GenerateRequest(prompt="a bridge", model="tiny-sdxl", width=64, height=64, steps=3, seed=8, **extra)


def test_union_controlnet_modes(union_home, tmp_path):
    weights = union_home.models_dir / "controlnet" / "union-promax" / "diffusion_pytorch_model_promax.safetensors"
    assert any("union ControlNet (6 control types" in n for n in probe(weights).notes)
    assert probe(weights.parent).kind == "controlnet"
    engine = Engine(union_home, device="cpu")
    base = np.asarray(engine.generate(_req(tmp_path, None)).images[0])
    images = {}
    for model in ("union-folder", "union-promax"):
        for mode in (0, 3):
            images[model, mode] = np.asarray(engine.generate(_req(tmp_path, {"model": model, "union_mode": mode}))
                                             .images[0])
    assert not np.array_equal(images["union-folder", 0], base)
    assert not np.array_equal(images["union-folder", 0], images["union-folder", 3])  # the type is read
    assert np.array_equal(images["union-folder", 3], images["union-promax", 3])  # renamed weights == folder
    off = engine.generate(_req(tmp_path, {"model": "union-folder", "union_mode": 3, "weight": 0}))
    assert np.array_equal(np.asarray(off.images[0]), base)
    with pytest.raises(BadRequest, match="union ControlNet: give union_mode"):
        engine.generate(_req(tmp_path, {"model": "union-folder"}))
    with pytest.raises(BadRequest, match="union_mode 6 is not one it has"):
        engine.generate(_req(tmp_path, {"model": "union-folder", "union_mode": 6}))
