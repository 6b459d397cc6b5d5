"""FLUX.1 Fill (inpainting that reads the masked picture and the mask) and FLUX.1 Kontext (instruction editing:
the picture to edit enters as reference tokens) on tiny FLUX models of the real classes: what reaches the
transformer, what comes out, how the probe names them, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import probe


@pytest.fixture(scope="module")
def edit_home(tiny_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-edit")
    settings = Settings(home=root)
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    shutil.copytree(tiny_home.models_dir / "checkpoints" / "tiny-flux", ckpt / "tiny-flux-kontext")
    flux_variant(tiny_home, ckpt / "tiny-flux-fill", 384, "FluxFillPipeline", seed=4)
    return settings


def flux_variant(tiny_home, folder, in_channels: int, pipeline: str, *, seed: int):
    """The tiny FLUX folder with a transformer reading ``in_channels`` features a token (FLUX Fill 384, Canny/Depth
    dev 128), random weights, under diffusers' ``pipeline`` class."""
    from diffusers import FluxTransformer2DModel
    src = tiny_home.models_dir / "checkpoints" / "tiny-flux"
    shutil.copytree(src, folder)
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    torch.manual_seed(seed)
    t = FluxTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}
                               | {"in_channels": in_channels, "out_channels": 64}).eval()
    shutil.rmtree(folder / "transformer")
    t.save_pretrained(folder / "transformer", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))


def _picture(colour=(200, 60, 40)) -> Image.Image:
    im = Image.new("RGB", (64, 64), colour)
    im.paste((20, 90, 200), (8, 40, 56, 60))
    return im


def _file(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def _capture(engine, name):
    pipe = engine.pipeline(engine.checkpoint(name)).value
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append({k: kwargs[k].clone() for k in ("hidden_states", "img_ids")}),
        with_kwargs=True)
    return seen, hook


def test_probe_names_fill_and_kontext(edit_home):
    ckpt = edit_home.models_dir / "checkpoints"
    assert any("FLUX.1 Fill" in n for n in probe(ckpt / "tiny-flux-fill").notes)
    assert any("FLUX.1 Kontext" in n for n in probe(ckpt / "tiny-flux-kontext").notes)


def test_fill_reads_masked_picture_and_mask_and_keeps_the_rest(edit_home, tmp_path):
    engine = Engine(edit_home, device="cpu")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # a 32 px square: 4x4 latent cells, 2x2 packed tokens
    seen, hook = _capture(engine, "tiny-flux-fill")
    try:
        result = engine.generate(GenerateRequest(prompt="a vase", model="tiny-flux-fill",
                                                 init_image=_file(tmp_path, _picture(), "in.png"),
                                                 mask=_file(tmp_path, mask, "mask.png"), mask_blur=0, denoising_strength=1.0, width=64,
                                                 height=64, steps=2, seed=1))
    finally:
        hook.remove()
    h = seen[0]["hidden_states"]
    assert h.shape == (1, 16, 384)  # 4x4 tokens: latent 64 + masked picture 64 + mask 256
    cells = h[0, :, 128:].reshape(4, 4, 256)  # token grid of 16 px squares
    assert torch.all(cells[1:3, 1:3] == 1) and torch.all(cells[0] == 0) and torch.all(cells[:, 3] == 0)
    out = np.asarray(result.images[0], np.int16)
    keep = np.asarray(_picture(), np.int16)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(out[outside], keep[outside])  # only the masked square is repainted


def test_kontext_reads_the_picture_as_reference_tokens(edit_home, tmp_path):
    engine = Engine(edit_home, device="cpu")
    req = GenerateRequest(prompt="make it blue", model="tiny-flux-kontext",
                          init_image=_file(tmp_path, _picture(), "in.png"), width=64,
                          height=64, steps=2, seed=3, cfg_scale=2.5)
    seen, hook = _capture(engine, "tiny-flux-kontext")
    try:
        first = engine.generate(req)
    finally:
        hook.remove()
    h, ids = seen[0]["hidden_states"], seen[0]["img_ids"]
    assert h.shape == (1, 32, 64)  # 16 latent tokens, then the picture's 16
    assert torch.all(ids[:16, 0] == 0) and torch.all(ids[16:, 0] == 1)  # the reference on its own first axis
    assert torch.equal(ids[:16, 1:], ids[16:, 1:])  # at the same places
    other = engine.generate(req.model_copy(update={"init_image": _file(tmp_path, _picture((30, 160, 60)), "b.png")}))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))  # the picture matters
    with pytest.raises(BadRequest, match="Kontext"):
        engine.generate(req.model_copy(update={"mask": _file(tmp_path, Image.new("L", (64, 64), 255), "m.png")}))


def test_fill_mask_features_are_laid_out_as_diffusers_fill_pipeline_lays_them(edit_home, tmp_path, monkeypatch):
    """A mask that cuts through tokens: its 8x8-pixel cells must reach the transformer in the order FLUX Fill was
    trained with, beside the masked picture's latent (the hole mid-grey in [-1, 1]: 0); diffusers' FluxFillPipeline
    (a peer we did not write) computes both for comparison (its latent taken at the posterior's mode, as
    imagesmith's)."""
    import diffusers.pipelines.flux.pipeline_flux_fill as peer_module
    from diffusers import FluxFillPipeline
    original = peer_module.retrieve_latents
    monkeypatch.setattr(peer_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))
    engine = Engine(edit_home, device="cpu")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 12, 44, 52))
    seen, hook = _capture(engine, "tiny-flux-fill")
    try:
        engine.generate(GenerateRequest(prompt="a vase", model="tiny-flux-fill",
                                        init_image=_file(tmp_path, _picture(), "in.png"),
                                        mask=_file(tmp_path, mask, "mask.png"), mask_blur=0, width=64, height=64,
                                        steps=1, seed=1))
    finally:
        hook.remove()
    pipe = engine.pipeline(engine.checkpoint("tiny-flux-fill")).value
    peer = FluxFillPipeline(**{k: getattr(pipe, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                             "text_encoder_2", "tokenizer_2", "transformer")})
    image = peer.image_processor.preprocess(_picture(), height=64, width=64)
    mask_t = peer.mask_processor.preprocess(mask, height=64, width=64)
    packed_mask, masked = peer.prepare_mask_latents(mask_t, image * (1 - mask_t), 1, 16, 1, 64, 64, torch.float32,
                                                    "cpu", torch.Generator().manual_seed(0))
    assert packed_mask.shape == (1, 16, 256)
    assert 0 < float(packed_mask.mean()) < 1 and torch.equal(seen[0]["hidden_states"][:, :, 128:], packed_mask)
    assert torch.allclose(seen[0]["hidden_states"][:, :, 64:128], masked, atol=1e-4)


def _kontext_graph(image: str, *, second: str | None = None, steps: int = 2) -> dict:
    """FLUX Kontext the ComfyUI way: the picture VAE-encoded and given to ReferenceLatent, FluxGuidance, a KSampler
    starting from that latent at denoise 1."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux-kontext"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "make it blue", "clip": ["1", 1]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["4", 0]}},
        "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 2.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "8": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "model": ["1", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["4", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "kontext"}},
    }
    if second:
        prompt["12"] = {"class_type": "LoadImage", "inputs": {"image": second}}
        prompt["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["1", 2]}}
        prompt["14"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["5", 0], "latent": ["13", 0]}}
        prompt["6"]["inputs"]["conditioning"] = ["14", 0]
    return prompt


def test_kontext_in_a_comfyui_graph_is_the_native_edit(edit_home, tmp_path):
    """ReferenceLatent on FLUX Kontext: the picture's tokens after the output's on frame 1, exactly as the native
    edit puts them, so the same seed and guidance give the native edit's pixels; a second reference is placed below
    the first (ComfyUI's offset placement: below for square pictures) and changes the picture."""
    from fixtures.graph import graph_runner
    engine = Engine(edit_home, device="cpu")
    _file(tmp_path, _picture(), "in.png")
    _file(tmp_path, _picture((30, 200, 60)), "second.png")
    run = graph_runner(engine, tmp_path, ["in.png", "second.png"])
    seen, hook = _capture(engine, "tiny-flux-kontext")
    try:
        ours = run(_kontext_graph("in.png")).astype(int)
        ids_one = seen[0]["img_ids"]
        seen.clear()
        two = run(_kontext_graph("in.png", second="second.png")).astype(int)
        ids_two = seen[0]["img_ids"]
    finally:
        hook.remove()
    native = engine.generate(GenerateRequest(prompt="make it blue", model="tiny-flux-kontext", init_image=str(
        tmp_path / "in.png"), width=64, height=64, steps=2, cfg_scale=2.5, seed=5, sampler_name="euler",
        scheduler="simple", noise="comfy"))
    assert np.abs(ours - np.asarray(native.images[0], int)).max() <= 1
    assert ids_one.shape[0] == 2 * 16 and (ids_one[16:, 0] == 1).all()  # 4x4 output tokens, 4x4 reference tokens
    second = ids_two[32:]  # the second picture's positions: below the first (rows 4-7), frame 1
    assert (second[:, 0] == 1).all() and second[:, 1].min() == 4 and second[:, 2].max() == 3
    assert not np.array_equal(two, ours)  # (the tiny random transformer attends to it only weakly)


def test_comfyuis_flux_kontext_template_runs(tiny_home, tmp_path):
    """ComfyUI's own flux_kontext_dev_basic (comfyui-workflow-templates) on ComfyUI's split files: LoadImageOutput
    (a saved image), ImageStitch (its second picture bypassed), FluxKontextImageScale (to Kontext's 1024x1024 for a
    square picture), VAEEncode, ReferenceLatent, FluxGuidance, ConditioningZeroOut, KSampler."""
    pytest.importorskip("comfyui_workflow_templates")
    from fixtures.comfy_templates import on_split_flux, run_template, template
    from fixtures.tiny import split_flux_home
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    engine = Engine(split_flux_home(tmp_path / "home", tiny_home, "flux1-dev-kontext-tiny.safetensors"), device="cpu")
    prompt = on_split_flux(ui_to_api(template("flux_kontext_dev_basic"), NODES), "flux1-dev-kontext-tiny.safetensors")
    saved = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImageOutput"]
    assert saved and all(s.endswith(" [output]") for s in saved)
    (tmp_path / "output").mkdir()
    for name in saved:  # a picture the user made before, in their output folder
        _picture().save(tmp_path / "output" / name.removesuffix(" [output]"))
    inputs = tmp_path / "input"
    inputs.mkdir()
    sizes = run_template(engine, "flux_kontext_dev_basic", prompt, tmp_path, inputs, [])
    assert sizes == {"136": [(1024, 1024)], "173": [(1024, 1024)]}


def test_fill_in_a_comfyui_graph_reads_what_the_native_fill_reads(edit_home, tmp_path):
    """InpaintModelConditioning (noise_mask off, as ComfyUI's Fill templates set it) on FLUX Fill: the transformer's
    first input, the noised latent with the masked picture's latent and the mask cells beside it, is the native
    Fill request's (which matches diffusers' FluxFillPipeline, above)."""
    from fixtures.graph import graph_runner
    engine = Engine(edit_home, device="cpu")
    photo = _picture().convert("RGBA")
    hole = Image.new("L", (64, 64), 255)
    hole.paste(0, (16, 16, 48, 48))  # ComfyUI's mask = 1 - alpha: the hole to repaint
    photo.putalpha(hole)
    photo.save(tmp_path / "hole.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux-fill"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a vase", "clip": ["1", 1]}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 30.0}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "hole.png"}},
        "5": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["3", 0], "negative": ["2", 0], "vae": ["1", 2], "pixels": ["4", 0], "mask": ["4", 1],
            "noise_mask": False}},
        "6": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0]}},
        "7": {"class_type": "KSampler", "inputs": {
            "seed": 4, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["6", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fill"}},
    }
    seen, hook = _capture(engine, "tiny-flux-fill")
    try:
        graph_runner(engine, tmp_path, ["hole.png"])(prompt)
        engine.generate(GenerateRequest(prompt="a vase", model="tiny-flux-fill", init_image=_file(
            tmp_path, _picture(), "in.png"), mask=_file(tmp_path, mask, "mask.png"), mask_blur=0, width=64,
            height=64, steps=1, seed=4, cfg_scale=30.0, sampler_name="euler", scheduler="normal", noise="comfy",
            inpaint_full_res=False))
    finally:
        hook.remove()
    graph, native = seen[0]["hidden_states"], seen[-1]["hidden_states"]
    assert graph.shape == native.shape == (1, 16, 384)
    assert torch.allclose(graph[:, :, 64:], native[:, :, 64:], atol=1e-4)  # the masked picture and the mask
    assert torch.allclose(graph[:, :, :64], native[:, :, :64], atol=1e-4)  # the same noised start


def test_differential_diffusion_grows_the_repainted_part_step_by_step():
    """ComfyUI's DifferentialDiffusion: a soft mask repaints a pixel from the step whose time has fallen to its
    value: at the first sigma only the fully masked pixels, at the last every pixel above 0."""
    from imagesmith.engine.sampling.ksampler import _Inpaint
    from imagesmith.engine.sampling.model_sampling import FlowModelSampling
    ms = FlowModelSampling(shift=1.0, multiplier=1.0, timesteps=1000)
    mask = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).view(1, 1, 1, 5)
    inpaint = _Inpaint(lambda x, s: x, ms, torch.zeros(1, 1, 1, 5), torch.zeros(1, 1, 1, 5), mask,
                       differential=(1.0, 0.1))
    assert inpaint.mask_at(torch.tensor([1.0])).flatten().tolist() == [0, 0, 0, 0, 1]
    assert inpaint.mask_at(torch.tensor([0.55])).flatten().tolist() == [0, 0, 1, 1, 1]
    assert inpaint.mask_at(torch.tensor([0.1])).flatten().tolist() == [1, 1, 1, 1, 1]
    plain = _Inpaint(lambda x, s: x, ms, torch.zeros(1, 1, 1, 5), torch.zeros(1, 1, 1, 5), mask)
    assert torch.equal(plain.mask_at(torch.tensor([1.0])), mask)


def _fill_split_home(edit_home, tiny_home, tmp_path) -> Settings:
    """ComfyUI's split FLUX files with the tiny Fill transformer as a file of its own (its config embedded)."""
    from safetensors.torch import load_file, save_file

    from fixtures.tiny import split_flux_home
    from imagesmith.models.convert import META_CONFIGS
    settings = split_flux_home(tmp_path / "home", tiny_home)
    src = edit_home.models_dir / "checkpoints" / "tiny-flux-fill" / "transformer"
    cfg = json.loads((src / "config.json").read_text())
    save_file(load_file(str(src / "diffusion_pytorch_model.safetensors")),
              str(settings.models_dir / "diffusion_models" / "flux1-fill-tiny.safetensors"),
              metadata={META_CONFIGS: json.dumps({"transformer": {k: v for k, v in cfg.items()
                                                                  if not k.startswith("_")}})})
    return settings


@pytest.mark.parametrize("name, size", [("flux_fill_inpaint_example", (64, 64)),
                                        ("flux_fill_outpaint_example", (256, 64))])
def test_comfyuis_flux_fill_templates_run(edit_home, tiny_home, tmp_path, name, size):
    """ComfyUI's own FLUX Fill templates (inpaint, and outpaint through ImagePadForOutpaint) on ComfyUI's split
    files: UNETLoader with a Fill transformer file, DualCLIPLoader, VAELoader, InpaintModelConditioning,
    DifferentialDiffusion, FluxGuidance."""
    pytest.importorskip("comfyui_workflow_templates")
    from fixtures.comfy_templates import on_split_flux, run_template, template
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    settings = _fill_split_home(edit_home, tiny_home, tmp_path)
    engine = Engine(settings, device="cpu")
    prompt = on_split_flux(ui_to_api(template(name), NODES), "flux1-fill-tiny.safetensors")
    for node in prompt.values():
        if node["class_type"] == "ImagePadForOutpaint":  # the template pads 400 px left and right: 96 here
            node["inputs"].update(left=96, right=96, top=0, bottom=0, feathering=8)
    inputs = tmp_path / "input"
    inputs.mkdir()
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    photo = _picture().convert("RGBA")
    hole = Image.new("L", (64, 64), 255)
    hole.paste(0, (16, 16, 48, 48))
    photo.putalpha(hole)
    for image in names:
        photo.save(inputs / image)
    sizes = run_template(engine, name, prompt, tmp_path, inputs, names)
    assert list(sizes.values()) == [[size]]


def test_comfyuis_flux_canny_model_template_runs(tiny_home, tmp_path):
    """ComfyUI's own flux_canny_model_example: a FLUX Canny dev transformer (it reads the control map's latent beside
    its own: 128 input features) through Canny and InstructPixToPixConditioning; the control latent reaches the
    transformer as its second 64 features. Natively such a model is one clear line."""
    pytest.importorskip("comfyui_workflow_templates")
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from fixtures.comfy_templates import on_split_flux, run_template, template
    from fixtures.tiny import split_flux_home
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    from imagesmith.models.convert import META_CONFIGS
    settings = split_flux_home(tmp_path / "home", tiny_home)
    cfg = json.loads((tiny_home.models_dir / "checkpoints" / "tiny-flux" / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")} | {"in_channels": 128, "out_channels": 64}
    torch.manual_seed(6)
    canny = FluxTransformer2DModel(**cfg).eval()
    save_file({k: v.contiguous() for k, v in canny.state_dict().items()},
              str(settings.models_dir / "diffusion_models" / "flux1-canny-dev-tiny.safetensors"),
              metadata={META_CONFIGS: json.dumps({"transformer": cfg})})
    engine = Engine(settings, device="cpu")
    prompt = on_split_flux(ui_to_api(template("flux_canny_model_example"), NODES), "flux1-canny-dev-tiny.safetensors")
    inputs = tmp_path / "input"
    inputs.mkdir()
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    for image in names:  # strong edges for the template's thresholds (0.15, 0.3)
        _picture((250, 250, 250)).point(lambda v: 255 if v > 128 else 0).save(inputs / image)
    pipe = engine.pipeline(engine.checkpoint("flux1-canny-dev-tiny.safetensors")).value
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        sizes = run_template(engine, "flux_canny_model_example", prompt, tmp_path, inputs, names)
    finally:
        hook.remove()
    assert sizes == {"9": [(64, 64)], "19": [(64, 64)]}  # the picture, and its Canny map previewed
    assert seen[0].shape == (1, 16, 128) and seen[0][:, :, 64:].abs().sum() > 0
    with pytest.raises(BadRequest, match="FLUX Canny/Depth dev model"):
        engine.generate(GenerateRequest(prompt="x", model="flux1-canny-dev-tiny.safetensors", width=64, height=64,
                                        steps=1))


def test_comfyuis_onereward_fill_template_runs(edit_home, tiny_home, tmp_path):
    """ComfyUI's image_flux.1_fill_dev_OneReward: FLUX Fill with a removal LoRA, InpaintModelConditioning with its
    noise mask on and DifferentialDiffusion over a mask grown and blurred by a subgraph (a soft mask: repainted
    step by step), then ImageCompositeMasked puts the result back on the photo through that mask; MaskPreview."""
    pytest.importorskip("comfyui_workflow_templates")
    from safetensors.torch import save_file

    from fixtures.comfy_templates import on_split_flux, run_template, template
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    settings = _fill_split_home(edit_home, tiny_home, tmp_path)
    g = torch.Generator().manual_seed(5)  # a rank-2 LoRA on the tiny transformer's attention (diffusers' layout)
    save_file({f"transformer.transformer_blocks.0.attn.{m}.lora_{ab}.weight":
               torch.randn((2, 16) if ab == "A" else (16, 2), generator=g) * 0.3
               for m in ("to_q", "to_v") for ab in ("A", "B")},
              str(settings.models_dir / "loras" / "removal-tiny.safetensors"))
    engine = Engine(settings, device="cpu")
    prompt = on_split_flux(ui_to_api(template("image_flux.1_fill_dev_OneReward"), NODES),
                           "flux1-fill-tiny.safetensors", lora_name="removal-tiny.safetensors")
    assert any(n["class_type"] == "DifferentialDiffusion" for n in prompt.values())
    inputs = tmp_path / "input"
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    photo = _picture().convert("RGBA")
    hole = Image.new("L", (64, 64), 255)
    hole.paste(0, (16, 16, 48, 48))
    photo.putalpha(hole)
    for image in names:  # "clipspace/...png [input]": the frontend's mask-editor folder
        path = inputs / image.removesuffix(" [input]")
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path)
    sizes = run_template(engine, "image_flux.1_fill_dev_OneReward", prompt, tmp_path, inputs,
                         [n.removesuffix(" [input]") for n in names])
    assert sizes == {"9": [(64, 64)], "49": [(64, 64)], "105": [(64, 64)]}


def test_flux_canny_dev_natively_draws_diffusers_control_pipelines_pixels(tiny_home, tmp_path, monkeypatch):
    """FLUX Canny/Depth dev natively: the model is its own ControlNet (the unit names the checkpoint); the control
    map's latent rides beside the latent as diffusers' FluxControlPipeline (a peer we did not write) feeds it, and the
    pictures agree (its control latent taken at the posterior's mode, as imagesmith's)."""
    from diffusers import FluxControlPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    flux_variant(tiny_home, settings.models_dir / "checkpoints" / "tiny-flux-canny", 128, "FluxControlPipeline",
                 seed=6)
    engine = Engine(settings, device="cpu")
    edges = Image.new("RGB", (64, 64), 0)
    edges.paste((255, 255, 255), (20, 8, 28, 56))
    control = _file(tmp_path, edges, "edges.png")
    req = GenerateRequest(prompt="a lamp", model="tiny-flux-canny", width=64, height=64, steps=3, cfg_scale=30.0,
                          seed=2, sampler_name="euler", scheduler="simple", noise="comfy",
                          controlnet={"model": "tiny-flux-canny", "image": control, "preprocessor": "none"})
    ours = np.asarray(engine.generate(req).images[0], np.float32)
    pipe = engine.pipeline(engine.checkpoint("tiny-flux-canny")).value
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    peer = FluxControlPipeline(**{k: getattr(pipe, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                "text_encoder_2", "tokenizer_2", "transformer")})
    theirs = peer("a lamp", control_image=edges, width=64, height=64, num_inference_steps=3, guidance_scale=30.0,
                  generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2, np.abs(ours - np.round(theirs * 255)).max()
    with pytest.raises(BadRequest, match="give one controlnet unit"):
        engine.generate(GenerateRequest(**{**req.model_dump(), "controlnet": None}))
    with pytest.raises(BadRequest, match="its own ControlNet"):
        engine.generate(GenerateRequest(**{**req.model_dump(), "controlnet": {
            "model": "other", "image": control, "preprocessor": "none"}}))
