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


def _diffusers_tokens(home, ref: str):
    """The reference's tokens as diffusers' FluxPriorReduxPipeline (a peer we did not write) computes them."""
    from diffusers import FluxPriorReduxPipeline

    from imagesmith.engine.redux import load_redux, load_siglip
    m = home.models_dir
    vision = load_siglip(m / "clip_vision" / "sigclip-tiny.safetensors", dtype=torch.float32, device="cpu")
    peer = FluxPriorReduxPipeline(image_encoder=vision.model, feature_extractor=vision.processor,
                                  image_embedder=load_redux(m / "style_models" / "flux1-redux-tiny.safetensors"))
    with torch.no_grad():
        return peer.image_embedder(peer.encode_image(Image.open(ref), "cpu", 1)).image_embeds


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
    want = _diffusers_tokens(redux_home, ref)
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


def _style_graph(strength_type="multiply", strength=0.7, *, redux=True) -> dict:
    """ComfyUI's Redux graph on the tiny FLUX (without ``redux``: the same prompt alone)."""
    return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cabin", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "sigclip-tiny.safetensors"}},
            "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
            "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["3", 0], "image": ["4", 0],
                                                               "crop": "none"}},
            "6": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "flux1-redux-tiny.safetensors"}},
            "7": {"class_type": "StyleModelApply", "inputs": {
                "conditioning": ["2", 0], "style_model": ["6", 0], "clip_vision_output": ["5", 0],
                "strength": strength, "strength_type": strength_type}},
            "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "11": {"class_type": "KSampler", "inputs": {
                "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "model": ["1", 0], "positive": ["7", 0] if redux else ["2", 0], "negative": ["2", 0],
                "latent_image": ["10", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "redux"}}}


def test_comfyui_style_model_nodes_add_diffusers_tokens(redux_home, tmp_path):
    """ComfyUI's CLIPVisionLoader, CLIPVisionEncode (crop none), StyleModelLoader and StyleModelApply: the prompt's
    tokens, then the reference's at strength x diffusers' FluxPriorReduxPipeline's."""
    from fixtures.graph import graph_runner
    engine = Engine(redux_home, device="cpu")
    ref = _reference(tmp_path)
    Image.open(ref).save(tmp_path / "ref.png")
    run = graph_runner(engine, tmp_path, ["ref.png"], save_node="9")
    seen, hook = _texts(engine)
    try:
        run(_style_graph())
    finally:
        hook.remove()
    want = _diffusers_tokens(redux_home, ref)
    tokens = seen[0]
    assert tokens.shape[1] > 16 and torch.allclose(tokens[:, -16:], want * 0.7, atol=1e-5)


def test_style_model_apply_attn_bias_weighs_the_attention_as_comfyui(redux_home, tmp_path):
    """strength_type attn_bias: the reference's tokens unscaled, the attention every other token pays them biased
    by log(strength), in ComfyUI's mask layout. Strength 1 is exactly multiply's 1 (no mask); 0 gives the picture
    without the reference (nobody reads its tokens), where multiply's 0 does not (zeroed tokens are still read);
    0.3 lies between; the mask the transformer gets has log(0.3) on the reference's columns, 0 elsewhere."""
    from fixtures.graph import graph_runner
    engine = Engine(redux_home, device="cpu")
    Image.open(_reference(tmp_path)).save(tmp_path / "ref.png")
    run = graph_runner(engine, tmp_path, ["ref.png"], save_node="9")
    pipe = engine.pipeline(engine.checkpoint("tiny-flux")).value

    def pixels(*a, **k):
        return np.asarray(run(_style_graph(*a, **k))).astype(int)

    def velocity(*a, **k):  # the transformer's first answer (the tiny model's pixels move little)
        out = []
        hook = pipe.transformer.register_forward_hook(lambda m, args, result: out.append(result[0].clone()))
        try:
            run(_style_graph(*a, **k))
        finally:
            hook.remove()
        return out[0]
    plain = pixels(redux=False)
    assert np.array_equal(pixels("attn_bias", 1.0), pixels("multiply", 1.0))
    bare, muted, zeroed = velocity(redux=False), velocity("attn_bias", 0.0), velocity("multiply", 0.0)
    change = (zeroed - bare).abs().max()
    assert change > 1e-3 and (muted - bare).abs().max() < change / 100
    masks = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: masks.append((kw["encoder_hidden_states"].shape[1], kw["hidden_states"].shape[1],
                                       (kw.get("joint_attention_kwargs") or {}).get("attention_mask"))),
        with_kwargs=True)
    try:
        between = pixels("attn_bias", 0.3)
    finally:
        hook.remove()
    assert not np.array_equal(between, plain) and not np.array_equal(between, pixels("attn_bias", 1.0))
    n_text, n_image, mask = masks[0]
    t = n_text - 16  # the prompt's tokens; the reference's 16 follow
    assert mask.shape == (1, 1, n_text + n_image, n_text + n_image)
    mask = mask[0, 0]
    bias = torch.log(torch.tensor(0.3)).item()
    ref_cols = mask[:, t:n_text]
    assert torch.allclose(ref_cols[:t], torch.tensor(bias)) and torch.allclose(ref_cols[n_text:], torch.tensor(bias))
    assert (ref_cols[t:n_text] == 0).all() and (mask[:, :t] == 0).all() and (mask[:, n_text:] == 0).all()
    for bad, says in ((("attn_bias", -0.5), "smaller than min"), (("sum", 1.0), "sum")):  # a 4xx, nothing run
        with pytest.raises(BadRequest, match=says):
            run(_style_graph(*bad))


def test_chained_redux_biases_keep_comfyuis_mask_layout():
    """Two StyleModelApply in a row: the first's bias stays on its tokens' columns, moved past the second's; a
    later multiply (its factor 1) adds columns of 0; the new tokens' own rows read everything freely."""
    from imagesmith.engine.graph.nodes import redux_attention_bias
    first = redux_attention_bias(None, 5, 3, 0.5)
    assert first.shape == (9, 9)
    both = redux_attention_bias(first, 8, 2, 1.0)
    half = torch.log(torch.tensor(0.5))
    assert both.shape == (11, 11)
    rows = [*range(5), 10]  # the prompt's tokens and the image's place
    assert torch.allclose(both[rows][:, 5:8], half) and (both[5:8] == 0).all() and (both[:, 8:10] == 0).all()
    assert (both[:, :5] == 0).all() and (both[:, 10] == 0).all()
    assert torch.isinf(redux_attention_bias(None, 4, 2, 0.0)[:4, 4:6]).all()


def test_comfyuis_flux_redux_template_runs(redux_home, tiny_home, tmp_path):
    """ComfyUI's own flux_redux_model_example (comfyui-workflow-templates) through the UI converter and the
    executor: split FLUX files (UNETLoader, DualCLIPLoader, VAELoader), the Redux nodes, and the custom sampling
    nodes it samples with (RandomNoise, KSamplerSelect, BasicScheduler, BasicGuider, SamplerCustomAdvanced)."""
    pytest.importorskip("comfyui_workflow_templates")
    from fixtures.comfy_templates import on_split_flux, run_template, shrink, template
    from fixtures.tiny import flux_split_files
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    flux_split_files(redux_home.models_dir, tiny_home)
    engine = Engine(redux_home, device="cpu")
    prompt = on_split_flux(shrink("flux_redux_model_example", ui_to_api(template("flux_redux_model_example"), NODES),
                                  "Lanczos"), "flux-t.safetensors", steps=2, clip_name="sigclip-tiny.safetensors",
                           style_model_name="flux1-redux-tiny.safetensors")
    inputs = tmp_path / "input"
    inputs.mkdir()
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    for image in names:
        Image.open(_reference(tmp_path)).save(inputs / image)
    sizes = run_template(engine, "flux_redux_model_example", prompt, tmp_path, inputs, names)
    assert list(sizes.values()) == [[(256, 256)]]


def test_the_diffusers_redux_folder_brings_its_own_siglip(redux_home, tmp_path):
    """black-forest-labs/FLUX.1-Redux-dev as diffusers keeps it (FluxPriorReduxPipeline: image_embedder/,
    image_encoder/, feature_extractor/): listed as a FLUX reference model, not a checkpoint; its own SigLIP is
    used without naming one; the tokens, so the picture, are the single file's with the same SigLIP."""
    from diffusers import FluxPriorReduxPipeline

    from imagesmith.engine.redux import load_redux, load_siglip
    m = redux_home.models_dir
    vision = load_siglip(m / "clip_vision" / "sigclip-tiny.safetensors", dtype=torch.float32, device="cpu")
    folder = m / "style_models" / "FLUX.1-Redux-tiny"
    FluxPriorReduxPipeline(image_encoder=vision.model, feature_extractor=vision.processor,
                           image_embedder=load_redux(m / "style_models" / "flux1-redux-tiny.safetensors")
                           ).save_pretrained(folder, safe_serialization=True)
    found = probe(folder)
    assert (found.kind, found.arch) == ("ipadapter", "flux") and "diffusers folder" in found.notes[0]
    engine = Engine(redux_home, device="cpu")
    entry = engine.registry.get("FLUX.1-Redux-tiny", "ipadapter")
    assert entry.kind == "ipadapter" and "FLUX.1-Redux-tiny" not in {e.name for e in engine.registry.list("checkpoint")}
    ref = _reference(tmp_path)
    single = engine.generate(_req(ref, weight=0.8))
    bundled = engine.generate(GenerateRequest(prompt="a cabin", model="tiny-flux", width=64, height=64, steps=4, seed=2,
                                              ip_adapter={"model": "FLUX.1-Redux-tiny", "image": ref, "weight": 0.8}))
    assert np.abs(np.asarray(single.images[0], np.int16) - np.asarray(bundled.images[0], np.int16)).max() <= 1
