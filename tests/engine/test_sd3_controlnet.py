"""SD3 ControlNets (diffusers' SD3ControlNetModel, as InstantX's SD3 ControlNets ship) on the tiny SD3: the
control image's latent reaches the ControlNet, its block residuals reach the transformer on both sides of CFG,
weight 0 gives the base pixels, and FLUX/SD families are told apart."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import probe


@pytest.fixture(scope="module")
def sd3_home(tiny_home, tmp_path_factory):
    from fixtures.tiny import build_sd3_controlnet, home_with
    settings = home_with(tmp_path_factory.mktemp("sd3-cn"), tiny_home, "checkpoints/tiny-sd3",
                         "controlnet/tiny-controlnet")
    build_sd3_controlnet(settings.models_dir)
    return settings


def _req(tmp_path, unit: dict | None) -> GenerateRequest:
    path = tmp_path / "edges.png"
    im = Image.new("RGB", (64, 64), 0)
    im.paste((255, 255, 255), (30, 4, 40, 60))
    im.save(path)
    extra = {"controlnet": {"image": str(path), "preprocessor": "none", **unit}} if unit else {}
    return GenerateRequest(prompt="a lamp", model="tiny-sd3", width=64, height=64, steps=3, cfg_scale=4, seed=3,
                           **extra)


def test_sd3_controlnet_guides(sd3_home, tmp_path):
    assert probe(sd3_home.models_dir / "controlnet" / "sd3-canny").arch == "sd3"
    engine = Engine(sd3_home, device="cpu")
    base = np.asarray(engine.generate(_req(tmp_path, None)).images[0])
    pipe = engine.pipeline(engine.checkpoint("tiny-sd3")).value
    cn = engine._component("controlnet", "sd3-canny")
    seen, given = [], []
    h1 = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True)
    h2 = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: given.append(kw.get("block_controlnet_hidden_states")), with_kwargs=True)
    try:
        guided = np.asarray(engine.generate(_req(tmp_path, {"model": "sd3-canny"})).images[0])
    finally:
        h1.remove()
        h2.remove()
    latent = engine._vae_encode(pipe.vae, [Image.open(tmp_path / "edges.png").convert("RGB")])
    assert seen[0].shape[0] == 2 and torch.allclose(seen[0][1:], latent, atol=1e-5)  # both halves of CFG
    assert given[0] is not None and len(given[0]) == 1
    assert not np.array_equal(guided, base)
    off = engine.generate(_req(tmp_path, {"model": "sd3-canny", "weight": 0}))
    assert np.array_equal(np.asarray(off.images[0]), base)
    with pytest.raises(BadRequest, match="is an SD ControlNet; tiny-sd3 is SD3"):
        engine.generate(_req(tmp_path, {"model": "tiny-controlnet"}))


def test_sd3_controlnet_in_a_comfyui_graph(sd3_home, tmp_path):
    """ControlNetApplyAdvanced with an SD3 ControlNet and the checkpoint's VAE, through the ComfyUI executor: the
    ControlNet reads the control image's latent, strength 0 gives the plain graph's pixels, and an SD ControlNet
    on the SD3 model is one clear error."""
    from fixtures.graph import controlnet_graph, graph_runner
    engine = Engine(sd3_home, device="cpu")
    _req(tmp_path, {"model": "sd3-canny"})  # writes edges.png, the control image

    def graph(cn: str | None, strength: float = 1.0) -> dict:
        return controlnet_graph("tiny-sd3", "a lamp", cfg=4.0, cn=cn, strength=strength)

    run = graph_runner(engine, tmp_path, ["edges.png"])
    base = run(graph(None))
    cn = engine._component("controlnet", "sd3-canny")
    seen = []
    hook = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].shape), with_kwargs=True)
    try:
        guided = run(graph("sd3-canny"))
    finally:
        hook.remove()
    assert seen and seen[0][1:] == (16, 8, 8)  # the control image's 16-channel latent
    assert not np.array_equal(guided, base)
    assert np.array_equal(run(graph("sd3-canny", strength=0.0)), base)
    from imagesmith.core.errors import ImagesmithError
    with pytest.raises(ImagesmithError, match="is an SD ControlNet"):
        run(graph("tiny-controlnet"))
