"""Every ComfyUI template of the issue's list, from ComfyUI's own package (``comfyui-workflow-templates``), through
imagesmith's UI-to-API converter, validated and run on tiny models of the template's architecture: each output
node gives images of the size and count the graph asks for."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("comfyui_workflow_templates")

from fixtures.comfy_templates import FLUX, SD3, SD15, SDXL, shrink, template  # noqa: E402
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
    checked = ex.validate(prompt, lists={"input": names})
    assert checked.node_errors == {}
    ctx = GraphContext(engine=engine, output_dir=root / "output", temp_dir=root / "temp", input_dir=inputs,
                       prompt=prompt, extra_pnginfo={"workflow": template(name)})
    result = ex.run(prompt, ctx, checked.outputs)
    sizes = {}
    for node, ui in result.outputs.items():
        sizes[node] = []
        for image in ui["images"]:
            with Image.open(root / image["type"] / image["subfolder"] / image["filename"]) as im:
                sizes[node].append(im.size)
                assert np.asarray(im.convert("L")).std() > 0.5  # not a flat fill
    assert sizes == EXPECTED[name]
