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


def _lines(tmp_path) -> str:
    path = tmp_path / "lines.png"
    im = Image.new("RGB", (64, 64), 0)
    im.paste((255, 255, 255), (10, 0, 20, 64))
    im.save(path)
    return str(path)


def _req(tmp_path, unit: dict | None) -> GenerateRequest:
    extra = {"controlnet": {"image": _lines(tmp_path), "preprocessor": "none", **unit}} if unit else {}
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
    with pytest.raises(BadRequest, match="union ControlNet: give union_type or union_mode"):
        engine.generate(_req(tmp_path, {"model": "union-folder"}))  # preprocessor none: nothing tells the type
    with pytest.raises(BadRequest, match="union type 6 is not one it has"):
        engine.generate(_req(tmp_path, {"model": "union-folder", "union_mode": 6}))
    with pytest.raises(BadRequest, match="union type tile is not one it has"):  # 6 types: tile (6) is ProMax's
        engine.generate(_req(tmp_path, {"model": "union-folder", "union_type": "tile"}))
    # by name (xinsir's order, as A1111's extension names them: hard edge is 3) and from the preprocessor's kind
    named = engine.generate(_req(tmp_path, {"model": "union-folder", "union_type": "hardedge"}))
    assert np.array_equal(np.asarray(named.images[0]), images["union-folder", 3])
    canny = {"model": "union-folder", "preprocessor": "canny"}
    assert np.array_equal(np.asarray(engine.generate(_req(tmp_path, canny)).images[0]),
                          np.asarray(engine.generate(_req(tmp_path, {**canny, "union_mode": 3})).images[0]))


def test_a1111_extension_union_control_type_maps_to_the_kind():
    """A1111's ControlNet extension names a union unit's type (union_control_type: its ControlNetUnionControlType
    values); Unknown leaves it to the module, as the extension does; anything else is a 400."""
    from imagesmith.serve.api.a1111_controlnet import controlnet_unit

    def unit(**kw):
        body = {"alwayson_scripts": {"ControlNet": {"args": [{"model": "union-folder [0123abcd]", "image": "aGk=",
                                                              "module": "canny", **kw}]}}}
        return controlnet_unit(body, lambda data: "uploaded")
    assert unit(union_control_type="Hard Edge")["union_type"] == "hardedge"
    assert unit(union_control_type="OpenPose")["union_type"] == "openpose"
    assert unit(union_control_type="Normal Map")["union_type"] == "normal"
    assert "union_type" not in unit(union_control_type="Unknown") and "union_type" not in unit()
    with pytest.raises(BadRequest, match="union_control_type"):
        unit(union_control_type="Sketchy")


def test_comfyui_set_union_controlnet_type(union_home, tmp_path):
    """ComfyUI's core SetUnionControlNetType node on the same union model, through imagesmith's ComfyUI executor:
    the type chosen is the one the model reads; "auto" (which diffusers' union model has no form of) is refused."""
    from fixtures.graph import run_to_image
    from imagesmith.engine.graph.nodes import model_lists
    engine = Engine(union_home, device="cpu")
    _lines(tmp_path)

    def run(kind: str):
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bridge", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "union-folder"}},
            "5": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["4", 0], "type": kind}},
            "6": {"class_type": "LoadImage", "inputs": {"image": "lines.png"}},
            "7": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["2", 0], "negative": ["3", 0], "control_net": ["5", 0], "image": ["6", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
            "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "9": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                       "positive": ["7", 0], "negative": ["7", 1],
                                                       "latent_image": ["8", 0]}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
            "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": kind[:5]}}}
        lists = {**model_lists(engine.registry, ["Lanczos"], tmp_path), "input": ["lines.png"]}
        return run_to_image(engine, prompt, tmp_path, lists=lists, save_node="11", prompt_id=kind)

    assert not np.array_equal(run("openpose"), run("canny/lineart/anime_lineart/mlsd"))
    with pytest.raises(Exception, match="set its type with SetUnionControlNetType"):
        run("auto")
