"""A1111's SDXL refiner: the base model samples the first part of the steps, the refiner (its own text encoder,
its aesthetic-score size ids) the rest, on the same latents; recorded as A1111 records it; a refiner of another
family or a missing one is refused before any work."""

from __future__ import annotations


import numpy as np
import pytest

from imagesmith.core.errors import BadRequest, ModelNotFound
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from fixtures.tiny import home_with


@pytest.fixture(scope="module")
def refiner_home(tiny_home, tmp_path_factory):
    from fixtures.tiny import build_sdxl_refiner
    settings = home_with(tmp_path_factory.mktemp("refiner"), tiny_home, "checkpoints/tiny-sdxl",
                         "checkpoints/tiny-sd15")
    ckpt = settings.models_dir / "checkpoints"
    build_sdxl_refiner(3).save_pretrained(ckpt / "tiny-sdxl-refiner", safe_serialization=True)
    return settings


def _req(**kw) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "model": "tiny-sdxl",
                              "width": 64, "height": 64, "steps": 6, "cfg_scale": 5, "seed": 9,
                              "sampler_name": "Euler", **kw})


def test_refiner_takes_over_at_the_switch_step(refiner_home):
    engine = Engine(refiner_home, device="cpu")
    base = engine.generate(_req())
    calls = {"base": 0, "refiner": 0}
    refined = None
    hooks = []
    try:
        for name, model in (("base", "tiny-sdxl"), ("refiner", "tiny-sdxl-refiner")):
            pipe = engine.pipeline(engine.checkpoint(model)).value
            hooks.append(pipe.unet.register_forward_pre_hook(
                lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1)))
        refined = engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.5))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"base": 3, "refiner": 3}  # Euler: one evaluation per step (cond and uncond batched)
    a, b = np.asarray(base.images[0], np.int16), np.asarray(refined.images[0], np.int16)
    assert np.abs(a - b).mean() > 1  # the last three steps were the refiner's
    info = refined.records[0].infotext
    assert "Refiner: tiny-sdxl-refiner" in info and "Refiner switch at: 0.5" in info
    same = engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=1.0))
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(base.images[0]))  # 1: the base alone
    assert "Refiner" not in same.records[0].infotext


def test_refiner_reads_aesthetic_scores_in_its_size_ids(refiner_home):
    engine = Engine(refiner_home, device="cpu")
    pipe = engine.pipeline(engine.checkpoint("tiny-sdxl-refiner")).value
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.5))
    finally:
        hook.remove()
    ids = seen[0]
    assert ids.shape[-1] == 5 and sorted(ids[:, 4].tolist()) == [2.5, 6.0]  # uncond 2.5, cond 6 (A1111, diffusers)


def test_wrong_or_missing_refiner_is_refused_before_work(refiner_home):
    engine = Engine(refiner_home, device="cpu")
    with pytest.raises(BadRequest, match="refiner tiny-sd15 is a sd1 model but the base tiny-sdxl is sdxl"):
        engine.generate(_req(refiner_checkpoint="tiny-sd15"))
    with pytest.raises(ModelNotFound):
        engine.generate(_req(refiner_checkpoint="no-such-refiner"))
    assert engine.cache.keys() == []  # refused before any model was loaded


def _hires_with_refiner(home, **kw):
    """A hires-fix request with the refiner switching at half: each UNet's calls by latent size, and the result."""
    engine = Engine(home, device="cpu")
    hires = {"hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_denoising_strength": 0.6, "hr_second_pass_steps": 4}
    calls = {"base": [], "refiner": []}
    hooks = []
    try:
        for name, model in (("base", "tiny-sdxl"), ("refiner", "tiny-sdxl-refiner")):
            pipe = engine.pipeline(engine.checkpoint(model)).value
            hooks.append(pipe.unet.register_forward_pre_hook(
                lambda module, args, name=name: calls[name].append(tuple(args[0].shape[-2:]))))
        result = engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.5, hires=hires,
                                      **kw))
    finally:
        for h in hooks:
            h.remove()
    return calls, result


def test_with_the_hires_fix_the_refiner_takes_the_second_pass(refiner_home):
    """A1111's default ("Hires fix: which pass to enable refiner for: second pass"): the first pass is the base's
    alone, and the refiner takes over at the switch fraction of the hires pass's steps."""
    calls, _ = _hires_with_refiner(refiner_home)
    first, second = (8, 8), (12, 12)  # latent sizes of 64 px and of 96 px
    assert calls["base"].count(first) == 6 and set(calls["refiner"]) == {second}  # no refiner in the first pass
    # the hires pass (A1111: int(0.6 x 4) + 1 = 3 steps) switches at half of them
    assert calls["base"].count(second) >= 1 and len(calls["refiner"]) >= 1
    assert calls["base"].count(second) + len(calls["refiner"]) == 3


@pytest.mark.parametrize("which, first_pass_refined, second_pass_refined", [
    ("first pass", True, False), ("both passes", True, True), ("second pass", False, True)])
def test_the_hires_refiner_pass_is_a1111s_setting(refiner_home, which, first_pass_refined, second_pass_refined):
    """A1111's "Hires fix: which pass to enable refiner for": first, second or both passes; each refined pass hands
    its last steps to the refiner at the switch fraction; the infotext writes "Hires refiner" unless it is the
    default."""
    calls, result = _hires_with_refiner(refiner_home, refiner_pass=which)
    first, second = (8, 8), (12, 12)
    assert (first in calls["refiner"]) == first_pass_refined
    assert (second in calls["refiner"]) == second_pass_refined
    if first_pass_refined:
        assert calls["base"].count(first) == 3 and calls["refiner"].count(first) == 3  # 6 steps, switch at half
    assert calls["base"].count(second) + calls["refiner"].count(second) == 3
    info = result.records[0].infotext
    assert ("Hires refiner: " + which in info) == (which != "second pass")


def test_the_refiner_as_a_single_file(refiner_home):
    """sd_xl_refiner_1.0.safetensors as people download it: one A1111-layout file with the UNet, the VAE and only
    the OpenCLIP bigG encoder. The probe names it the SDXL refiner; as the refiner it gives the folder's pixels."""
    from imagesmith.models.convert import export_single_file
    from imagesmith.models.probe import probe
    engine = Engine(refiner_home, device="cpu")
    ckpt = refiner_home.models_dir / "checkpoints"
    folder = engine.pipeline(engine.checkpoint("tiny-sdxl-refiner")).value
    single = export_single_file(folder, "sdxl", ckpt / "tiny-sdxl-refiner-single.safetensors")
    assert "SDXL refiner (OpenCLIP-bigG only)" in probe(single).notes
    engine.registry.scan()
    a = engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.5))
    b = engine.generate(_req(refiner_checkpoint="tiny-sdxl-refiner-single", refiner_switch_at=0.5))
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max() <= 2
    assert "Refiner: tiny-sdxl-refiner-single" in b.records[0].infotext


def test_a_refiner_file_without_configs_gets_its_unet_from_its_shapes(tmp_path):
    """Stability's sd_xl_refiner_1.0.safetensors carries no diffusers configs, and the shipped SDXL config describes
    the base UNet (320-640-1280, 2048-wide context, 6 size ids). The refiner's UNet config is read off the file's
    tensors instead: a refiner-shaped UNet (another channel ladder, attention in one level only and a deeper middle
    block, its own context, pooled and size-id widths, 32 norm groups and 64-channel heads as SGM's) exported
    without configs gets exactly its config back, loads strictly through diffusers' converter and answers as the
    original. Without an LDM UNet's tensors to read, the shipped config stays as it is."""
    import json

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from fixtures.tiny import _clip, _clip_tokenizer, _vae
    from imagesmith.models.convert import export_single_file
    from imagesmith.models.loaders import CONFIGS_DIR, assemble_config_folder, sdxl_unet_from_shapes
    from imagesmith.models.probe import read_header
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 32,
        transformer_layers_per_block=(1, 3)).eval()
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=unet, vae=_vae(64, scaling_factor=0.13025), text_encoder=None,
        text_encoder_2=_clip(64, with_projection=True, projection_dim=32), tokenizer=None,
        tokenizer_2=_clip_tokenizer(), scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True)
    with_configs = export_single_file(pipe, "sdxl", tmp_path / "with.safetensors")
    bare = tmp_path / "sd_xl_refiner_tiny.safetensors"
    save_file(load_file(str(with_configs)), str(bare))  # as Stability ships it: no imagesmith configs
    header = read_header(bare)
    cfg_dir = assemble_config_folder(tmp_path / "cfg", "sdxl", header)
    got = json.loads((cfg_dir / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim", "norm_num_groups"):
        want = unet.config[key]
        assert (list(got[key]) if isinstance(got[key], (list, tuple)) else got[key]) == (
            list(want) if isinstance(want, (list, tuple)) else want), key
    loaded = UNet2DConditionModel.from_single_file(str(bare), config=str(cfg_dir), subfolder="unet",
                                                   local_files_only=True).eval()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, 64)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 6.0]])}
    with torch.no_grad():
        a = unet(x, t, text, added_cond_kwargs=added).sample
        b = loaded(x, t, text, added_cond_kwargs=added).sample
    assert torch.allclose(a, b, atol=1e-5)
    base = json.loads((CONFIGS_DIR / "sdxl" / "unet" / "config.json").read_text())
    assert sdxl_unet_from_shapes(base, {}) == base  # nothing to read: as shipped


def test_the_real_refiner_and_base_layouts_read_back_at_full_size():
    """At full size, on meta tensors (no memory): the LDM shapes of the refiner's UNet as Stability's SGM config
    describes it (model_channels 384, channel_mult 1-2-4-4, attention at the middle two levels, transformer depth
    4, 64-channel heads, context 1280, adm_in_channels 2560) give back that UNet's diffusers config from the
    shipped base one; the base UNet's own shapes give the shipped config unchanged."""
    import json

    import torch
    from diffusers import UNet2DConditionModel

    from imagesmith.models.convert import unet_to_ldm
    from imagesmith.models.loaders import CONFIGS_DIR, sdxl_unet_from_shapes
    base = json.loads((CONFIGS_DIR / "sdxl" / "unet" / "config.json").read_text())
    refiner = dict(base, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   transformer_layers_per_block=[4, 4, 4, 4], cross_attention_dim=1280,
                   projection_class_embeddings_input_dim=2560, addition_time_embed_dim=256)

    def ldm_shapes(cfg: dict, pooled_key: str) -> dict:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        shapes = {"model.diffusion_model." + k: list(v.shape) for k, v in unet_to_ldm(unet.state_dict(), cfg).items()}
        return {**shapes, pooled_key: [1280, 1280]}
    got = sdxl_unet_from_shapes(base, ldm_shapes(refiner, "conditioner.embedders.0.model.text_projection"))
    for key in ("block_out_channels", "attention_head_dim", "down_block_types", "up_block_types",
                "cross_attention_dim", "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        assert got[key] == refiner[key], key
    assert got["transformer_layers_per_block"][1:3] == [4, 4] and got["transformer_layers_per_block"][-1] == 4
    base_shapes = ldm_shapes(base, "conditioner.embedders.1.model.text_projection")
    base_shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = [49408, 768]
    assert sdxl_unet_from_shapes(base, base_shapes) == base
