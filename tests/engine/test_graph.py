"""ComfyUI API-format prompts on the engine (engine.graph): validation in ComfyUI's shapes, execution with the
output cache kept between prompts, and the pictures against the engine's own ComfyUI-noise path."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.engine.graph.executor import GraphContext, GraphError
from imagesmith.engine.graph.nodes import NODES, executor_for, object_info, model_lists

DEFAULT = {  # ComfyUI's default graph in API format (as its "Save (API)" writes it), on the tiny SD1.5 model
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 3, "cfg": 8.0,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                               "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle landscape",
                                                     "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


@pytest.fixture(scope="module")
def graph(tiny_home, tmp_path_factory):
    engine = Engine(tiny_home, device="cpu")
    root = tmp_path_factory.mktemp("graph")
    events = []

    def ctx(prompt, **kw):
        return GraphContext(engine=engine, output_dir=root / "output", temp_dir=root / "temp",
                            input_dir=root / "input", prompt=prompt, prompt_id="p",
                            event=lambda name, data: events.append((name, data)), **kw)
    return engine, executor_for(engine), ctx, root, events


def run(graph, prompt):
    engine, ex, ctx, root, events = graph
    events.clear()
    checked = ex.validate(prompt)
    return ex.run(prompt, ctx(prompt, extra_pnginfo={"workflow": {"nodes": []}}), checked.outputs)


def test_default_graph_runs_caches_and_reruns_only_what_changed(graph):
    engine, ex, ctx, root, events = graph
    first = run(graph, DEFAULT)
    assert sorted(first.executed) == ["3", "4", "5", "6", "7", "8", "9"]
    name = first.outputs["9"]["images"][0]
    assert name["type"] == "output" and name["subfolder"] == "" and name["filename"].startswith("ComfyUI_")
    path = root / "output" / name["filename"]
    with Image.open(path) as im:
        assert im.size == (64, 64)
        assert json.loads(im.info["prompt"]) == DEFAULT  # drags back into ComfyUI
        assert json.loads(im.info["workflow"]) == {"nodes": []}
        assert "Seed: 156680208700286" in im.info["parameters"] and "Sampler: Euler" in im.info["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 1  # a picture, not a flat fill
    names = [n for n, _ in events]
    assert names[0] == "execution_cached" and names.count("executing") == 7 and "progress" in names
    assert [d["value"] for n, d in events if n == "progress"] == [1, 2, 3]

    again = run(graph, DEFAULT)  # identical: nothing computed, the result re-sent
    assert again.executed == [] and again.outputs == first.outputs
    assert sorted(events[0][1]["nodes"]) == sorted(first.executed)
    assert ("executed", {"node": "9", "display_node": "9", "output": first.outputs["9"], "prompt_id": "p"}) in events

    reseeded = copy.deepcopy(DEFAULT)
    reseeded["3"]["inputs"]["seed"] = 7
    third = run(graph, reseeded)
    assert third.executed == ["3", "8", "9"]  # the loaders and prompts came from the cache
    other = third.outputs["9"]["images"][0]["filename"]
    assert other != name["filename"] and int(other.split("_")[1]) == int(name["filename"].split("_")[1]) + 1


def test_same_pixels_as_the_engines_comfy_path(graph):
    """The graph's KSampler and the engine's request path (noise 'comfy') are one sampling layer: the same seed,
    sampler, schedule and prompts give the same pixels."""
    engine, ex, ctx, root, events = graph
    prompt = copy.deepcopy(DEFAULT)
    prompt["3"]["inputs"].update(seed=42, sampler_name="dpmpp_2m", scheduler="karras", cfg=6.0)
    out = run(graph, prompt).outputs["9"]["images"][0]
    with Image.open(root / "output" / out["filename"]) as im:
        mine = np.asarray(im.convert("RGB"), np.int16)
    ref = engine.generate(GenerateRequest(prompt=DEFAULT["6"]["inputs"]["text"], negative_prompt="text, watermark",
                                          model="tiny-sd15", width=64, height=64, steps=3, cfg_scale=6.0, seed=42,
                                          sampler_name="dpmpp_2m", scheduler="karras", noise="comfy"))
    assert np.abs(mine - np.asarray(ref.images[0], np.int16)).max() <= 1


def test_validation_answers_in_comfyuis_shapes(graph):
    engine, ex, ctx, root, events = graph
    with pytest.raises(GraphError) as err:
        ex.validate({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert err.value.payload["error"]["type"] == "missing_node_type"
    with pytest.raises(GraphError) as err:
        ex.validate({k: v for k, v in DEFAULT.items() if k != "9"})
    assert err.value.payload["error"]["type"] == "prompt_no_outputs"
    bad = copy.deepcopy(DEFAULT)
    bad["3"]["inputs"]["sampler_name"] = "nope"
    bad["3"]["inputs"]["steps"] = 0
    del bad["6"]["inputs"]["text"]
    bad["8"]["inputs"]["vae"] = ["4", 1]  # a CLIP where a VAE goes
    with pytest.raises(GraphError) as err:
        ex.validate(bad)
    body = err.value.payload
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    kinds = {n: sorted(e["type"] for e in v["errors"]) for n, v in body["node_errors"].items()}
    assert kinds == {"3": ["value_not_in_list", "value_smaller_than_min"], "6": ["required_input_missing"],
                     "8": ["return_type_mismatch"]}
    assert body["node_errors"]["3"]["dependent_outputs"] == ["9"] and body["node_errors"]["3"]["class_type"] == "KSampler"
    # one good output and one bad: accepted, the bad one named
    mixed = copy.deepcopy(DEFAULT)
    mixed["10"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["99", 0]}}
    checked = ex.validate(mixed)
    assert checked.outputs == ["9"] and list(checked.node_errors) == ["10"]
    assert checked.node_errors["10"]["errors"][0]["type"] == "exception_during_inner_validation"
    for value in (["4"], "x", [1, 0], ["4", 0, 1]):
        broken = copy.deepcopy(DEFAULT)
        broken["8"]["inputs"]["samples"] = value
        with pytest.raises(GraphError):
            ex.validate(broken)


def test_object_info_has_comfyuis_schemas(graph):
    engine = graph[0]
    info = object_info(model_lists(engine.registry, engine.upscalers().names()))
    ks = info["KSampler"]
    assert ks["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 2 ** 64 - 1, "step": 1,
                                                       "control_after_generate": True}]
    assert "euler" in ks["input"]["required"]["sampler_name"][0] and "karras" in ks["input"]["required"]["scheduler"][0]
    assert ks["output"] == ["LATENT"] and ks["output_node"] is False and ks["category"] == "sampling"
    ckpt = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "tiny-sd15" in ckpt and "tiny-sd15-single.safetensors" in ckpt  # files with extensions, as ComfyUI
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    assert set(NODES) >= {"CheckpointLoaderSimple", "CLIPTextEncode", "CLIPSetLastLayer", "EmptyLatentImage",
                          "EmptySD3LatentImage", "KSampler", "KSamplerAdvanced", "VAEDecode", "VAEEncode",
                          "VAEEncodeForInpaint", "SetLatentNoiseMask", "VAELoader", "LoraLoader",
                          "LoraLoaderModelOnly", "LoadImage", "LoadImageMask", "SaveImage", "PreviewImage",
                          "LatentUpscale", "LatentUpscaleBy", "ImageScale", "ImageScaleBy", "UpscaleModelLoader",
                          "ImageUpscaleWithModel", "ControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced",
                          "ConditioningCombine", "ConditioningSetArea", "ConditioningSetMask",
                          "ConditioningZeroOut", "FluxGuidance", "ModelSamplingDiscrete", "ModelSamplingSD3",
                          "ModelSamplingFlux", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader",
                          "SetUnionControlNetType", "UnetLoaderGGUF"}


def test_saved_pixels_are_truncated_as_comfyui_saves_them():
    """ComfyUI's SaveImage writes clip(255 x) cast to uint8 (truncation): 0.5 is 127, not 128."""
    import torch
    from imagesmith.engine.graph.nodes import to_image
    row = torch.tensor([[[0.5, 0.999, 1.2]], [[-0.1, 0.002, 0.75]]])
    assert np.asarray(to_image(row)).tolist() == [[[127, 254, 255]], [[0, 0, 191]]]


def test_split_files_unet_and_dual_clip_loaders_match_the_checkpoint(tiny_home, tmp_path):
    """ComfyUI's split FLUX layout: the transformer alone (UNETLoader, models/diffusion_models) and the two text
    encoders as files (DualCLIPLoader, models/text_encoders), the VAE from elsewhere. With the same weights as the
    diffusers folder, the picture is the folder's, pixel for pixel."""
    from fixtures.tiny import flux_split_files
    from imagesmith.core.settings import Settings
    settings = Settings(home=tmp_path)
    settings.ensure_home()
    src = tiny_home.models_dir / "checkpoints"
    (settings.models_dir / "checkpoints" / "tiny-flux").symlink_to(src / "tiny-flux", target_is_directory=True)
    flux_split_files(settings.models_dir, tiny_home)
    engine = Engine(settings, device="cpu")
    ex = executor_for(engine)
    lists = model_lists(engine.registry, [])
    assert lists["diffusion_models"] == ["flux-t.safetensors"]
    assert lists["text_encoders"] == ["clip_l.safetensors", "t5.safetensors"]

    def graph(split: bool) -> dict:
        p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
             "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                                        "scheduler": "simple", "denoise": 1.0, "model": ["1", 0],
                                                        "positive": ["2", 0], "negative": ["2", 0],
                                                        "latent_image": ["3", 0]}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
        if split:  # t5 first: the loader tells the files apart by their tensors, not their order
            p["7"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-t.safetensors",
                                                             "weight_dtype": "default"}}
            p["8"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5.safetensors",
                                                                 "clip_name2": "clip_l.safetensors", "type": "flux"}}
            p["4"]["inputs"]["model"] = ["7", 0]
            p["2"]["inputs"]["clip"] = ["8", 0]
        return p

    pictures = []
    for split in (False, True):
        prompt = graph(split)
        root = tmp_path / f"out{split}"
        run = ex.run(prompt, GraphContext(engine=engine, output_dir=root, temp_dir=root, input_dir=root,
                                          prompt=prompt), ex.validate(prompt).outputs)
        image = run.outputs["6"]["images"][0]
        with Image.open(root / image["filename"]) as im:
            pictures.append(np.asarray(im.convert("RGB")))
    assert np.array_equal(pictures[0], pictures[1])
    wrong = graph(True)
    wrong["8"]["inputs"].update(clip_name1="clip_l.safetensors", clip_name2="clip_l.safetensors")
    with pytest.raises(Exception, match="does not fit|leave"):
        ex.run(wrong, GraphContext(engine=engine, output_dir=tmp_path, temp_dir=tmp_path, input_dir=tmp_path,
                                   prompt=wrong), ex.validate(wrong).outputs)


def test_inpainting_checkpoints_get_the_mask_and_the_masked_latent(graph, tmp_path):
    """An inpainting UNet (9 input channels) behind CheckpointLoaderSimple + VAEEncodeForInpaint, as ComfyUI's
    inpaint_model_outpainting template uses one: the sampler feeds [latent, mask, masked-image latent]."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    engine, ex, ctx, root, events = graph
    base = StableDiffusionPipeline.from_pretrained(engine.checkpoint("tiny-sd15").path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    engine.adopt("tiny-inpaint", pipe, "sd1")
    (root / "input").mkdir(exist_ok=True)
    photo = Image.new("RGBA", (64, 64), (200, 120, 40, 255))
    photo.paste((0, 0, 0, 0), (16, 16, 48, 48))  # the hole to repaint (ComfyUI's mask = 1 - alpha)
    photo.save(root / "input" / "hole.png")
    prompt = copy.deepcopy(DEFAULT)
    prompt["4"]["inputs"]["ckpt_name"] = "tiny-inpaint"
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "hole.png"}}
    prompt["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["10", 0], "vae": ["4", 2],
                                                                     "mask": ["10", 1], "grow_mask_by": 6}}
    prompt["3"]["inputs"]["latent_image"] = ["11", 0]
    checked = ex.validate(prompt, lists={"input": ["hole.png"], "checkpoints": ["tiny-inpaint"]})
    out = ex.run(prompt, ctx(prompt), checked.outputs).outputs["9"]["images"][0]
    with Image.open(root / "output" / out["filename"]) as im:
        assert im.size == (64, 64)
    assert seen and set(seen) == {9}


def test_upscale_model_loader_takes_a_users_pth_by_its_file_name(graph):
    """ComfyUI's UpscaleModelLoader lists upscale_models by file name (4x-Tiny.pth): a spandrel network read from
    a .pth without unpickling, run by ImageUpscaleWithModel on a loaded image."""
    import torch
    pytest.importorskip("spandrel")
    from spandrel.architectures.ESRGAN import ESRGAN
    engine, ex, ctx, root, events = graph
    torch.manual_seed(0)
    folder = engine.settings.models_dir / "upscalers"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict()}, folder / "2x-Tiny.pth")
    (root / "input").mkdir(exist_ok=True)
    Image.new("RGB", (24, 16), (90, 140, 200)).save(root / "input" / "small.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
              "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x-Tiny.pth"}},
              "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    from imagesmith.engine.upscale import UpscalerSet
    lists = model_lists(engine.registry, UpscalerSet(engine.settings).names(files=True))
    assert "2x-Tiny.pth" in lists["upscale_models"]
    checked = ex.validate(prompt, lists={"input": ["small.png"], "upscale_models": lists["upscale_models"]})
    out = ex.run(prompt, ctx(prompt), checked.outputs).outputs["4"]["images"][0]
    with Image.open(root / "output" / out["filename"]) as im:
        got = np.asarray(im.convert("RGB"), np.int16)
    assert got.shape == (32, 48, 3)
    with Image.open(root / "input" / "small.png") as small:
        want = np.asarray(UpscalerSet(engine.settings).get("2x-Tiny").upscale(small.convert("RGB"), 2), np.int16)
    assert np.abs(got - want).max() <= 1  # the network's own pixels (ComfyUI's SaveImage truncates: off by <= 1)
    folder.joinpath("2x-Tiny.pth").unlink()


def test_canny_node_is_kornias_canny():
    """ComfyUI's Canny node runs kornia's canny; imagesmith's (OpenCV) finds the same edge pixels on real photos: at
    ComfyUI's default thresholds and two others, the two edge maps overlap with IoU >= 0.98 (0.993-0.999 measured),
    and within 1 px at least 99% of each side's edges lie on the other's."""
    import cv2
    import skimage.data as data
    import torch

    import kornia

    from imagesmith.engine.graph.nodes import _canny
    for name in ("astronaut", "coffee", "chelsea"):
        img = torch.from_numpy(getattr(data, name)().astype(np.float32) / 255)[None]
        for lo, hi in ((0.4, 0.8), (0.1, 0.2), (0.2, 0.5)):
            ours = _canny(None, img, lo, hi)[0]
            assert ours.shape == img.shape and set(torch.unique(ours).tolist()) <= {0.0, 1.0}
            ours = ours[0, ..., 0].numpy() > 0.5
            theirs = kornia.filters.canny(img.movedim(-1, 1), lo, hi)[1][0, 0].numpy() > 0.5
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.98, (name, lo, hi)
            to_theirs = cv2.distanceTransform((~theirs).astype(np.uint8), cv2.DIST_L2, 3)
            to_ours = cv2.distanceTransform((~ours).astype(np.uint8), cv2.DIST_L2, 3)
            assert (to_theirs[ours] <= 1).mean() >= 0.99 and (to_ours[theirs] <= 1).mean() >= 0.99, (name, lo, hi)


def test_image_scale_to_max_dimension_as_comfyui():
    """ComfyUI's ImageScaleToMaxDimension: the longer side to largest_size, the other in proportion, rounded."""
    import torch
    from imagesmith.engine.graph.nodes import NODES
    run = NODES["ImageScaleToMaxDimension"].run
    tall = torch.rand(1, 128, 96, 3)
    assert tuple(run(None, tall, "area", 64)[0].shape) == (1, 64, 48, 3)
    wide = torch.rand(1, 90, 200, 3)
    assert tuple(run(None, wide, "bilinear", 100)[0].shape) == (1, 45, 100, 3)
    square = torch.full((1, 40, 40, 3), 0.25)
    out = run(None, square, "lanczos", 80)[0]
    assert tuple(out.shape) == (1, 80, 80, 3) and torch.allclose(out, torch.tensor(0.25), atol=1.5 / 255)  # lanczos: 8-bit PIL, as ComfyUI
