"""Depth preprocessors on the user's transformers depth models (tiny random DPT and Depth Anything built from
configs here): a real photo becomes a grey depth map of its own size stretched over 0-255; the engine's ControlNet
takes it; a module whose model is missing is one line naming the folder and what to put there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import MissingModelFile
from imagesmith.core.requests import ControlNetSpec, GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.controlnet import depth_folder, preprocess


def _annotators(root):
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
                              DPTForDepthEstimation, DPTImageProcessor)
    torch.manual_seed(0)
    dpt = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                    patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                    backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    DPTForDepthEstimation(dpt).save_pretrained(str(root / "dpt-tiny"))
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(str(root / "dpt-tiny"))
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    da = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                             head_hidden_size=8, reassemble_hidden_size=32)
    DepthAnythingForDepthEstimation(da).save_pretrained(str(root / "depth-anything-tiny"))
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=False).save_pretrained(
        str(root / "depth-anything-tiny"))


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory):
    from fixtures.tiny import home_with_tiny_sd15
    settings = home_with_tiny_sd15(tmp_path_factory.mktemp("depth-home"), tiny_home)
    _annotators(settings.models_dir / "annotators")
    (settings.models_dir / "controlnet").mkdir(exist_ok=True)
    (settings.models_dir / "controlnet" / "tiny-controlnet").symlink_to(
        tiny_home.models_dir / "controlnet" / "tiny-controlnet", target_is_directory=True)
    return settings


def test_depth_maps_of_a_real_photo(home):
    import skimage.data as data
    photo = Image.fromarray(data.astronaut())
    for module, folder in (("depth_midas", "dpt-tiny"), ("depth_anything", "depth-anything-tiny")):
        assert depth_folder(home, module).name == folder
        out = preprocess(photo, ControlNetSpec(model="-", image="-", preprocessor=module), settings=home)
        arr = np.asarray(out)
        assert out.size == photo.size and out.mode == "RGB"
        assert (arr[..., 0] == arr[..., 1]).all() and arr.min() == 0 and arr.max() == 255  # grey, stretched
        assert len(np.unique(arr)) > 32


def test_a_missing_depth_model_is_named_with_what_to_add(tmp_path):
    empty = Settings(home=tmp_path / "empty")
    empty.ensure_home()
    with pytest.raises(MissingModelFile, match="Depth-Anything-V2-Small-hf.*annotators"):
        preprocess(Image.new("RGB", (32, 32)), ControlNetSpec(model="-", image="-", preprocessor="depth_anything"),
                   settings=empty)


def test_the_engines_controlnet_runs_on_a_depth_map(home, tmp_path):
    from imagesmith.engine.generate import Engine
    import skimage.data as data
    Image.fromarray(data.astronaut()).resize((64, 64)).save(tmp_path / "photo.png")
    engine = Engine(home, device="cpu")
    base = dict(model="tiny-sd15", prompt="a portrait", width=64, height=64, steps=2, seed=2, sampler_name="Euler")
    plain = np.asarray(engine.generate(GenerateRequest(**base)).images[0], np.int16)
    res = engine.generate(GenerateRequest(**base, controlnet=ControlNetSpec(
        model="tiny-controlnet", image=str(tmp_path / "photo.png"), preprocessor="depth_midas")))
    assert np.abs(np.asarray(res.images[0], np.int16) - plain).max() > 0
    assert "tiny-controlnet (depth_midas, 1)" in res.records[0].infotext
