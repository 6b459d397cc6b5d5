"""FLUX ControlNets (diffusers' FluxControlNetModel, plain and union) on the tiny FLUX: the control image reaches
the ControlNet as packed VAE tokens, its residuals reach the transformer, weight 0 gives the base pixels, a union
model needs its mode, and an SD ControlNet on FLUX (or the reverse) is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import probe


@pytest.fixture(scope="module")
def cn_home(tiny_home, tmp_path_factory):
    from diffusers import FluxControlNetModel

    from fixtures.tiny import _randomise_, home_with
    settings = home_with(tmp_path_factory.mktemp("flux-cn"), tiny_home, "checkpoints/tiny-flux",
                         "controlnet/tiny-controlnet")
    m = settings.models_dir
    src = tiny_home.models_dir / "checkpoints" / "tiny-flux"
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("out_channels",)}
    for name, extra in (("flux-cn-canny", {}), ("flux-cn-union", {"num_mode": 4})):
        torch.manual_seed(5)
        net = FluxControlNetModel(**{**cfg, "num_layers": 1, "num_single_layers": 1, **extra}).eval()
        _randomise_(net, seed=6, scale=0.2)  # ControlNets start with zeroed output layers: give them an effect
        net.save_pretrained(m / "controlnet" / name, safe_serialization=True)
    return settings


def _control(tmp_path) -> str:
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (16, 8, 30, 56))
    path = tmp_path / "edges.png"
    im.save(path)
    return str(path)


def _req(unit: dict | None) -> GenerateRequest:
    return GenerateRequest(prompt="a tower", model="tiny-flux", width=64, height=64, steps=3, seed=4,
                           **({"controlnet": unit} if unit else {}))


def test_probe_names_flux_controlnets(cn_home):
    assert probe(cn_home.models_dir / "controlnet" / "flux-cn-union").arch == "flux"


def test_flux_controlnet_guides_and_weight_zero_does_nothing(cn_home, tmp_path):
    engine = Engine(cn_home, device="cpu")
    base = np.asarray(engine.generate(_req(None)).images[0])
    unit = {"model": "flux-cn-canny", "image": _control(tmp_path), "preprocessor": "none"}
    cn = engine._component("controlnet", "flux-cn-canny")
    pipe = engine.pipeline(engine.checkpoint("tiny-flux")).value
    seen, given = [], []
    h1 = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].clone()), with_kwargs=True)
    h2 = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: given.append(kw.get("controlnet_block_samples")), with_kwargs=True)
    try:
        guided = np.asarray(engine.generate(_req(unit)).images[0])
    finally:
        h1.remove()
        h2.remove()
    assert len(seen) == 3 and seen[0].shape == (1, 16, 64)  # packed VAE tokens of the control image
    ref = Image.open(_control(tmp_path)).convert("RGB")
    want = pipe._pack_latents(engine._vae_encode(pipe.vae, [ref]), 1, 16, 8, 8)
    assert torch.allclose(seen[0], want, atol=1e-5)
    assert given[0] is not None and len(given[0]) == 1  # one residual per ControlNet double block
    assert not np.array_equal(guided, base)
    off = np.asarray(engine.generate(_req({**unit, "weight": 0})).images[0])
    assert np.array_equal(off, base)
    # windows are ComfyUI's percents of the model's sigma range (shifted for FLUX), not fractions of the steps
    for window, steps in (({"guidance_start": 0.9}, 1), ({"guidance_end": 0.3}, 1), ({"guidance_end": 0.6}, 2)):
        calls = []
        hook = cn.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
        try:
            engine.generate(_req({**unit, **window}))
        finally:
            hook.remove()
        assert len(calls) == steps, (window, len(calls))


def test_union_mode_and_wrong_families(cn_home, tmp_path):
    engine = Engine(cn_home, device="cpu")
    unit = {"model": "flux-cn-union", "image": _control(tmp_path), "preprocessor": "none"}
    with pytest.raises(BadRequest, match="union ControlNet: give union_type or union_mode"):
        engine.generate(_req(unit))  # preprocessor none: nothing tells the type
    with pytest.raises(BadRequest, match="union type 7 is not one"):
        engine.generate(_req({**unit, "union_mode": 7}))
    with pytest.raises(BadRequest, match="union type normal is not one"):
        engine.generate(_req({**unit, "union_type": "normal"}))  # InstantX's union has no normal maps
    a = np.asarray(engine.generate(_req({**unit, "union_mode": 0})).images[0])
    b = np.asarray(engine.generate(_req({**unit, "union_mode": 2})).images[0])
    assert not np.array_equal(a, b)  # the mode is read
    # by name (InstantX's order: depth is 2) and from the preprocessor's kind (canny draws hard edges: 0)
    assert np.array_equal(np.asarray(engine.generate(_req({**unit, "union_type": "depth"})).images[0]), b)
    canny = {**unit, "preprocessor": "canny"}
    assert np.array_equal(np.asarray(engine.generate(_req(canny)).images[0]),
                          np.asarray(engine.generate(_req({**canny, "union_mode": 0})).images[0]))
    with pytest.raises(BadRequest, match="is an SD ControlNet"):
        engine.generate(_req({"model": "tiny-controlnet", "image": _control(tmp_path), "preprocessor": "none"}))


def test_flux_controlnets_in_comfyui_graphs(cn_home, tmp_path):
    """ComfyUI's ControlNetLoader + ControlNetApplyAdvanced (with the checkpoint's VAE, as ComfyUI wires FLUX
    ControlNets) on the tiny FLUX, through imagesmith's executor: the ControlNet runs on the packed VAE tokens of
    the control image, strength 0 gives the plain graph's pixels, and a union model reads the type
    SetUnionControlNetType names (its InstantX index: depth 2, canny 0)."""
    from fixtures.graph import controlnet_graph, graph_runner
    engine = Engine(cn_home, device="cpu")
    (tmp_path / "edges.png").write_bytes(open(_control(tmp_path), "rb").read())

    def graph(cn: str | None, strength: float = 1.0, kind: str | None = None) -> dict:
        return controlnet_graph("tiny-flux", "a tower", cfg=1.0, cn=cn, strength=strength, kind=kind)

    run = graph_runner(engine, tmp_path, ["edges.png"])
    base = run(graph(None))
    cn = engine._component("controlnet", "flux-cn-canny")
    seen = []
    hook = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].shape), with_kwargs=True)
    try:
        guided = run(graph("flux-cn-canny"))
    finally:
        hook.remove()
    assert seen and seen[0] == (1, 16, 64)  # 4x4 tokens of 2x2x16 latent features
    assert not np.array_equal(guided, base)
    assert np.array_equal(run(graph("flux-cn-canny", strength=0.0)), base)
    union = engine._component("controlnet", "flux-cn-union")
    modes = []
    hook = union.register_forward_pre_hook(lambda m, a, kw: modes.append(int(kw["controlnet_mode"].flatten()[0])),
                                           with_kwargs=True)
    try:
        depth = run(graph("flux-cn-union", kind="depth"))
        canny = run(graph("flux-cn-union", kind="canny/lineart/anime_lineart/mlsd"))
    finally:
        hook.remove()
    assert sorted(set(modes)) == [0, 2] and not np.array_equal(depth, canny)


def test_a_flux_controlnet_in_the_hires_fix_reads_the_map_at_the_hires_size(cn_home, tmp_path):
    """FLUX with a ControlNet and hires fix: the second pass's ControlNet gets the map's latent at the hires size
    (it used to get the first pass's, a shape error)."""
    from imagesmith.core.requests import HiresSpec
    engine = Engine(cn_home, device="cpu")
    cn = engine._component("controlnet", "flux-cn-canny")
    seen = []
    hook = cn.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["controlnet_cond"].shape)),
                                        with_kwargs=True)
    try:
        out = engine.generate(_req({"model": "flux-cn-canny", "image": _control(tmp_path), "preprocessor": "none"})
                              .model_copy(update={"hires": HiresSpec(hr_scale=2, hr_upscaler="Lanczos",
                                                                     hr_denoising_strength=0.5)}))
    finally:
        hook.remove()
    assert out.images[0].size == (128, 128)
    assert seen[0][1] * 4 == seen[-1][1]  # packed tokens: four times as many at twice the size
