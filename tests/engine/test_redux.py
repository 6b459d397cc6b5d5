"""FLUX.1 Redux on the tiny FLUX: a SigLIP vision tower and a Redux embedder of the real classes (transformers'
SiglipVisionModel, diffusers' ReduxImageEncoder) as ComfyUI keeps them; the reference's tokens reach the
transformer after the prompt's, exactly as diffusers' FluxPriorReduxPipeline computes them; weight 0 and the step
window behave; the wrong model family is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagesmith.core.errors import BadRequest, UnsupportedModel
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from fixtures.tiny import home_with
from imagesmith.models.probe import probe


@pytest.fixture(scope="module")
def redux_home(tiny_home, tmp_path_factory):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    settings = home_with(tmp_path_factory.mktemp("redux"), tiny_home, "checkpoints/tiny-flux",
                         "checkpoints/tiny-sd15")
    m = settings.models_dir
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    vision = SiglipVisionModel(cfg).eval()
    (m / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file({"vision_model." + k.removeprefix("vision_model."): v.contiguous()  # ComfyUI's file names them so
               for k, v in vision.state_dict().items()},
              str(m / "clip_vision" / "sigclip-tiny.safetensors"),
              metadata={"imagesmith.configs": json.dumps({"vision_model": cfg.to_dict()})})
    redux = ReduxImageEncoder(redux_dim=16, txt_in_features=32).eval()
    with torch.no_grad():
        for p in redux.parameters():
            p.normal_(0, 0.5)
    (m / "style_models").mkdir()
    save_file({k: v.contiguous() for k, v in redux.state_dict().items()},
              str(m / "style_models" / "flux1-redux-tiny.safetensors"))
    return settings


def _reference(tmp_path, colour=(220, 40, 30)) -> str:
    path = tmp_path / f"ref-{colour[0]}.png"
    im = Image.new("RGB", (48, 40), colour)
    im.paste((10, 10, 240), (0, 20, 48, 40))
    im.save(path)
    return str(path)


def _req(ref: str | None, **unit) -> GenerateRequest:
    units = {"ip_adapter": {"model": "flux1-redux-tiny", "image": ref, **unit}} if ref else {}
    return GenerateRequest(prompt="a cabin", model="tiny-flux", width=64, height=64, steps=4, seed=2, **units)


def _texts(engine):
    pipe = engine.pipeline(engine.checkpoint("tiny-flux")).value
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    return seen, hook


def test_probe_names_redux_and_siglip(redux_home):
    m = redux_home.models_dir
    r = probe(m / "style_models" / "flux1-redux-tiny.safetensors")
    assert (r.kind, r.arch) == ("ipadapter", "flux") and "FLUX.1 Redux" in r.notes[0]
    assert probe(m / "clip_vision" / "sigclip-tiny.safetensors").notes == ["SigLIP vision encoder, width 16"]


def test_reference_tokens_follow_the_prompt_as_diffusers_computes_them(redux_home, tmp_path):
    from diffusers import FluxPriorReduxPipeline

    from imagesmith.engine.redux import load_redux, load_siglip
    engine = Engine(redux_home, device="cpu")
    seen, hook = _texts(engine)
    try:
        base = engine.generate(_req(None))
        ref = _reference(tmp_path)
        got = engine.generate(_req(ref, weight=0.7))
    finally:
        hook.remove()
    prompt_len = seen[0].shape[1]
    assert all(t.shape[1] == prompt_len for t in seen[:4]) and all(t.shape[1] == prompt_len + 16 for t in seen[4:])
    assert torch.equal(seen[4][:, :prompt_len], seen[0])  # the prompt's tokens unchanged, the reference's after
    m = redux_home.models_dir
    vision = load_siglip(m / "clip_vision" / "sigclip-tiny.safetensors", dtype=torch.float32, device="cpu")
    peer = FluxPriorReduxPipeline(image_encoder=vision.model, feature_extractor=vision.processor,
                                  image_embedder=load_redux(m / "style_models" / "flux1-redux-tiny.safetensors"))
    with torch.no_grad():
        want = peer.image_embedder(peer.encode_image(Image.open(ref), "cpu", 1)).image_embeds
    assert torch.allclose(seen[4][:, prompt_len:], want * 0.7, atol=1e-5)
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(got.images[0]))
    assert 'IP-Adapter: "flux1-redux-tiny (0.7, 0-1)"' in got.records[0].infotext


def test_weight_zero_and_the_step_window(redux_home, tmp_path):
    engine = Engine(redux_home, device="cpu")
    ref = _reference(tmp_path)
    base = np.asarray(engine.generate(_req(None)).images[0])
    assert np.array_equal(np.asarray(engine.generate(_req(ref, weight=0)).images[0]), base)
    seen, hook = _texts(engine)
    try:
        engine.generate(_req(ref, guidance_start=0.5))
    finally:
        hook.remove()
    lengths = [t.shape[1] for t in seen]
    assert lengths[:2] == [lengths[0]] * 2 and lengths[2:] == [lengths[0] + 16] * 2  # the last half of 4 steps


def test_wrong_family_and_masks_are_refused(redux_home, tmp_path):
    engine = Engine(redux_home, device="cpu")
    ref = _reference(tmp_path)
    with pytest.raises(UnsupportedModel, match="FLUX Redux reference model; tiny-sd15 is sd1"):
        engine.generate(_req(ref).model_copy(update={"model": "tiny-sd15"}))
    with pytest.raises(BadRequest, match="takes no mask"):
        engine.generate(_req(ref, mask=ref))
