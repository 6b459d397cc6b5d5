"""Every ComfyUI template of the issue's list, from ComfyUI's own package (``comfyui-workflow-templates``), through
imagesmith's UI-to-API converter, validated and run on tiny models of the template's architecture: each output
node gives images of the size and count the graph asks for."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from PIL import Image

pytest.importorskip("comfyui_workflow_templates")

from fixtures.comfy_templates import FLUX, SD3, SD15, SDXL, run_template, shrink, template  # noqa: E402
from imagesmith.engine.generate import Engine  # noqa: E402
from imagesmith.engine.graph.executor import GraphContext  # noqa: E402
from imagesmith.engine.graph.nodes import NODES, executor_for  # noqa: E402
from imagesmith.engine.graph.ui import ui_to_api  # noqa: E402

INPUT = (128, 96)  # the photo every LoadImage gets, with a transparent hole (ComfyUI's mask = 1 - alpha)
EXPECTED = {  # output node -> sizes, at a quarter of the template's own sizes (fixtures.comfy_templates.shrink)
    "default": {"9": [(128, 128)]},
    "lora": {"9": [(192, 192)]},
    "lora_multiple": {"9": [(256, 256)]},
    "image2image": {"9": [(144, 104)]},  # 128x96 scaled to 0.25/16 MP (148x111), cropped to multiples of 8
    "inpaint_example": {"9": [(144, 104)]},
    "inpaint_model_outpainting": {"9": [(160, 144)]},  # 148x111 padded 8, 8, 8, 32, then multiples of 8
    "esrgan_example": {"9": [(512, 512)], "16": [(128, 128)]},  # the 4x model's output, and the preview
    "hiresfix_latent_workflow": {"18": [(128, 128)], "12": [(192, 192)]},
    "hiresfix_esrgan_workflow": {"28": [(128, 128)], "12": [(256, 256)]},
    "latent_upscale_different_prompt_model": {"10": [(128, 128)], "12": [(192, 192)]},
    "embedding_example": {"9": [(192, 192)]},
    "area_composition": {"9": [(176, 320)], "32": [(272, 480)]},
    "sdxl_simple_example": {"19": [(256, 256)]},
    "sdxl_refiner_prompt_example": {"19": [(256, 256)]},
    "sd3.5_simple_example": {"9": [(256, 256)]},
    "flux_schnell": {"9": [(256, 256)]},
    "flux_dev_checkpoint_example": {"9": [(256, 256)]},
}


@pytest.fixture(scope="module")
def runner(tiny_home, tmp_path_factory):
    engine = Engine(tiny_home, device="cpu")
    ups = [n for n in engine.upscalers().names() if n != "Lanczos"]
    return engine, executor_for(engine), tmp_path_factory.mktemp("templates"), (ups or ["Lanczos"])[0]


@pytest.mark.parametrize("name", SD15 + SDXL + SD3 + FLUX)
def test_template_converts_validates_and_runs(runner, name):
    engine, ex, root, upscaler = runner
    prompt = shrink(name, ui_to_api(template(name), NODES), upscaler)
    assert not any(n["class_type"] in ("Note", "MarkdownNote", "PrimitiveNode", "Reroute") for n in prompt.values())
    inputs = root / "input"
    inputs.mkdir(exist_ok=True)
    photo = Image.fromarray((np.indices(INPUT[::-1]).sum(0) * 2 % 255).astype(np.uint8)).convert("RGBA")
    alpha = Image.new("L", INPUT, 255)
    alpha.paste(0, (40, 30, 88, 66))
    photo.putalpha(alpha)
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    for image in names:
        photo.save(inputs / image)
    sizes = run_template(engine, name, prompt, root, inputs, names)
    assert sizes == EXPECTED[name]


def test_subgraphs_flatten_as_the_frontend_queues_them():
    """Real templates with subgraphs: inner nodes get ids 'outer:inner', links into the subgraph reach the inner
    nodes they feed, widget inputs shown on the instance become values, outputs start at the inner producer."""
    from imagesmith.engine.graph.ui import flatten_subgraphs
    wf = flatten_subgraphs(template("image_flux.1_fill_dev_OneReward"))
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}

    def src(node, name):
        link = next(i["link"] for i in nodes[node]["inputs"] if i["name"] == name)
        return str(links[link][1]), links[link][2]
    assert "48" not in nodes and {"48:199", "48:251", "48:252", "48:253"} <= set(nodes)
    assert src("48:199", "mask") == ("17", 1)  # the instance's input, from outside
    assert nodes[src("48:199", "expand")[0]]["widgets_values"] == [0]  # the instance's widget values
    assert nodes[src("48:252", "blur_radius")[0]]["widgets_values"] == [31]
    assert src("49", "mask") == ("48:253", 0) and src("50", "mask") == ("48:253", 0)  # the output's producer
    chained = {str(n["id"]): n for n in flatten_subgraphs(template("flux1_dev_uso_reference_image_gen"))["nodes"]}
    assert not any(n["type"] not in NODES and len(n["type"]) == 36 for n in chained.values())  # no instance left


def test_a_real_subgraph_runs(runner):
    """The grow-and-blur mask subgraph of ComfyUI's OneReward template, fed a drawn mask: flattened, converted,
    validated and run, the mask comes out grown by the instance's widget value and blurred."""
    engine, ex, root, _ = runner
    source = template("image_flux.1_fill_dev_OneReward")
    sg = source["definitions"]["subgraphs"][0]
    wf = {"nodes": [  # a drawn mask -> the template's subgraph (expand 4, blur radius 3) -> an image
        {"id": 7, "type": "LoadImageMask", "mode": 0, "inputs": [], "widgets_values": ["square.png", "red", "image"]},
        {"id": 48, "type": sg["id"], "mode": 0, "inputs": [{"name": "mask", "type": "MASK", "link": 10}],
         "outputs": [{"name": "MASK", "links": [11]}], "widgets_values": [4, 3]},
        {"id": 5, "type": "MaskToImage", "mode": 0, "inputs": [{"name": "mask", "link": 11}]},
        {"id": 6, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "link": 12}],
         "widgets_values": ["mask"]}],
        "links": [[10, 7, 0, 48, 0, "MASK"], [11, 48, 0, 5, 0, "MASK"], [12, 5, 0, 6, 0, "IMAGE"]],
        "definitions": {"subgraphs": [sg]}}
    square = Image.new("RGB", (64, 64), 0)
    square.paste((255, 255, 255), (24, 24, 40, 40))
    (root / "input").mkdir(exist_ok=True)
    square.save(root / "input" / "square.png")
    prompt = ui_to_api(wf, NODES)
    assert {"48:199", "48:251", "48:252", "48:253"} <= set(prompt)
    checked = ex.validate(prompt, lists={"input": ["square.png"]})
    result = ex.run(prompt, GraphContext(engine=engine, output_dir=root / "output", temp_dir=root / "temp",
                                         input_dir=root / "input", prompt=prompt), checked.outputs)
    out = result.outputs["6"]["images"][0]
    with Image.open(root / "output" / out["filename"]) as im:
        a = np.asarray(im.convert("L"), np.float32) / 255
    assert a[32, 32] > 0.95 and a[0, 0] < 0.05  # the square stays, the far corner stays empty
    assert a[32, 21] > 0.3 and a[32, 18] < a[32, 21]  # grown by 4 (to x = 20), then blurred outwards


CONTROLNET_TEMPLATES = {  # template -> (checkpoint, ControlNet on the tiny models, output node -> sizes)
    "depth_controlnet": ("tiny-sd15-single.safetensors", "tiny-controlnet", {"9": [(256, 256)]}),
    "controlnet_example": ("tiny-sd15-single.safetensors", "tiny-controlnet",
                           {"9": [(256, 256)], "35": [(128, 96)]}),  # and the scribble previewed as loaded
    # a pose pass at 256, then a latent upscale to 384 through a second checkpoint (both the tiny SD1.5 here)
    "2_pass_pose_worship": ("tiny-sd15-single.safetensors", "tiny-controlnet",
                            {"48": [(256, 256)], "51": [(384, 384)]}),
    "mixing_controlnets": ("tiny-sd15-single.safetensors", "tiny-controlnet", {"9": [(256, 256)]}),
    "area_composition_square_area_for_subject": ("tiny-sd15-single.safetensors", None,
                                                 {"9": [(128, 128)], "32": [(256, 256)]}),
    "sd3.5_large_blur": ("tiny-sd3", "sd3-canny", {"9": [(256, 256)]}),
    "sd3.5_large_depth": ("tiny-sd3", "sd3-canny", {"9": [(256, 256)]}),
    # its Canny map of the photo scaled to 1024 / 4 is previewed (node 49)
    "sd3.5_large_canny_controlnet_example": ("tiny-sd3", "sd3-canny", {"9": [(256, 256)], "49": [(256, 256)]}),
}


@pytest.fixture(scope="module")
def controlnet_runner(tiny_home, tmp_path_factory):
    from fixtures.tiny import build_sd3_controlnet, home_with
    settings = home_with(tmp_path_factory.mktemp("cn-templates"), tiny_home, "checkpoints/tiny-sd3",
                         "checkpoints/tiny-sd15-single.safetensors", "controlnet/tiny-controlnet",
                         "vae/tiny-vae-single.safetensors")
    build_sd3_controlnet(settings.models_dir)
    return Engine(settings, device="cpu"), tmp_path_factory.mktemp("cn-run")


@pytest.mark.parametrize("name", sorted(CONTROLNET_TEMPLATES))
def test_controlnet_templates_run(controlnet_runner, name):
    """ComfyUI's ControlNet templates (SD1.5 depth, scribble, pose with two passes, two ControlNets mixed; SD3.5
    Canny through ComfyUI's Canny node, blur, depth) and the square-area composition run unchanged but for the tiny
    models' names and sizes."""
    engine, root = controlnet_runner
    checkpoint, controlnet, expected = CONTROLNET_TEMPLATES[name]
    prompt = shrink(name, ui_to_api(template(name), NODES), "Lanczos")
    for node in prompt.values():
        kind, i = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            i["ckpt_name"] = checkpoint
        elif kind == "ControlNetLoader":
            i["control_net_name"] = controlnet
    inputs = root / name
    inputs.mkdir()
    photo = Image.fromarray((np.indices(INPUT[::-1]).sum(0) * 2 % 255).astype(np.uint8)).convert("RGB")
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    for image in names:
        (inputs / image).parent.mkdir(parents=True, exist_ok=True)  # "pasted/image (2).png": the frontend's folder
        photo.save(inputs / image)
    assert run_template(engine, name, prompt, root, inputs, names) == expected


@pytest.mark.parametrize("name", ["flux_dev_full_text_to_image", "flux_schnell_full_text_to_image"])
def test_flux_split_file_templates_run(tiny_home, tmp_path, name):
    """ComfyUI's FLUX text-to-image templates on the split files: UNETLoader, DualCLIPLoader, VAELoader,
    CLIPTextEncodeFlux (its CLIP-L and T5 prompts and guidance), ConditioningZeroOut; 1024 px quartered."""
    from fixtures.comfy_templates import on_split_flux
    from fixtures.tiny import split_flux_home
    engine = Engine(split_flux_home(tmp_path / "home", tiny_home), device="cpu")
    prompt = on_split_flux(shrink(name, ui_to_api(template(name), NODES), "Lanczos"), "flux-t.safetensors")
    assert any(n["class_type"] == "CLIPTextEncodeFlux" for n in prompt.values())
    inputs = tmp_path / "input"
    inputs.mkdir()
    assert list(run_template(engine, name, prompt, tmp_path, inputs, []).values()) == [[(256, 256)]]


def test_sdxl_turbo_template_runs(runner):
    """ComfyUI's sdxlturbo_example: SamplerCustom with SDTurboScheduler's one step (timestep 999) and
    KSamplerSelect's euler_ancestral, on the tiny SDXL."""
    engine, ex, root, upscaler = runner
    prompt = shrink("sdxlturbo_example", ui_to_api(template("sdxlturbo_example"), NODES), upscaler)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "tiny-sdxl-single.safetensors"
    inputs = root / "turbo-input"
    inputs.mkdir()
    assert run_template(engine, "sdxlturbo_example", prompt, root, inputs, []) == {"27": [(128, 128)]}


def test_sd_turbo_scheduler_is_turbos_timesteps(runner):
    from imagesmith.engine.graph.nodes import _sd_turbo_scheduler
    from imagesmith.engine.graph.values import ModelValue
    engine = runner[0]

    class Ctx:
        pass
    ctx = Ctx()
    ctx.engine = engine
    model = ModelValue(engine.checkpoint("tiny-sdxl-single.safetensors"))
    one = _sd_turbo_scheduler(ctx, model, 1, 1.0)[0]
    four = _sd_turbo_scheduler(ctx, model, 4, 1.0)[0]
    half = _sd_turbo_scheduler(ctx, model, 2, 0.5)[0]
    pipe = engine.pipeline(model.entry).value
    ms = engine.model_sampling(pipe, "sdxl", 512, 512)
    assert torch.allclose(one, torch.stack([ms.sigma(torch.tensor(999.0)), torch.tensor(0.0)]).float())
    assert len(four) == 5 and torch.allclose(four[:4], ms.sigma(torch.tensor([999.0, 899.0, 799.0, 699.0])).float())
    assert torch.allclose(half[:2], ms.sigma(torch.tensor([499.0, 399.0])).float())  # the last half of the ten
