"""Round trips: diffusers tiny model -> original single-file layout -> diffusers' own single-file
loader (or our inverse) -> identical tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny
from imagesmith.models import convert


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def sd15():
    return tiny.build_sd15(0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny.build_sdxl(0)


def test_unet_ldm_names_follow_the_original_layout(sd15):
    ldm = convert.unet_to_ldm(sd15.unet.state_dict(), sd15.unet.config)
    # SD's fixed layout, on a 2-block UNet with one layer per block and attention in block 0 only
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm and "time_embed.0.weight" in ldm
    assert "input_blocks.1.0.in_layers.2.weight" in ldm  # first resnet conv1
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert "input_blocks.2.0.op.weight" in ldm  # downsampler
    assert "middle_block.1.proj_in.weight" in ldm and "middle_block.2.emb_layers.1.weight" in ldm
    assert "output_blocks.1.1.conv.weight" in ldm  # up block 0 has no attention: upsampler at .1
    assert "output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in ldm)


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_unet_round_trip_through_diffusers_loader(which, sd15, sdxl):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    pipe = sd15 if which == "sd15" else sdxl
    state = pipe.unet.state_dict()
    ldm = {convert.UNET_PREFIX + k: v for k, v in convert.unet_to_ldm(state, pipe.unet.config).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    assert_same_state(state, back)
    assert_same_state(state, convert.unet_from_ldm(convert.unet_to_ldm(state, pipe.unet.config), pipe.unet.config))


def test_vae_round_trip_through_diffusers_loader(sd15):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    state = sd15.vae.state_dict()
    ldm = convert.vae_to_ldm(state, sd15.vae.config)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original
    assert "decoder.up.3.upsample.conv.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint({convert.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(sd15.vae.config))
    assert_same_state(state, back)


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_full_single_file_reloads_identical(which, sd15, sdxl, tmp_path):
    """export_single_file -> from_single_file(config=local folder) gives every tensor back."""
    pipe = sd15 if which == "sd15" else sdxl
    arch = "sd1" if which == "sd15" else "sdxl"
    path = convert.export_single_file(pipe, arch, tmp_path / "m.safetensors")
    from imagesmith.models.loaders import assemble_config_folder
    from imagesmith.models.probe import read_header
    cfg = assemble_config_folder(tmp_path / "cfg", arch, read_header(path))
    cls = type(pipe)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if arch == "sd1" else {}
    again = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, **kwargs)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for name in names:
        assert_same_state(getattr(pipe, name).state_dict(), getattr(again, name).state_dict())


def test_sd2_openclip_single_file_round_trip(tmp_path):
    """SD2 layout: OpenCLIP text encoder (fused in_proj, cond_stage_model.model.*), linear projections."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from imagesmith.models.loaders import assemble_config_folder
    from imagesmith.models.probe import probe, read_header
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    te = tiny._clip(32)
    pipe = StableDiffusionPipeline(unet=unet, vae=tiny._vae(64), text_encoder=te, tokenizer=tiny._clip_tokenizer(),
                                   scheduler=DDIMScheduler(prediction_type="v_prediction", steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    path = convert.export_single_file(pipe, "sd2", tmp_path / "sd2.safetensors")
    header = read_header(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in header.shapes
    assert header.shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == [96, 32]
    assert probe(path).arch == "sd2"
    again = StableDiffusionPipeline.from_single_file(str(path), config=str(assemble_config_folder(tmp_path / "c", "sd2", header)),
                                                     local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name).state_dict(), getattr(again, name).state_dict())
    assert again.scheduler.config.prediction_type == "v_prediction"  # from the embedded configs


def test_controlnet_original_layout_round_trip(sd15, tmp_path):
    from diffusers import ControlNetModel
    cn = ControlNetModel.from_unet(sd15.unet)  # the original layout has the 4-level hint encoder
    tiny._randomise_(cn, 5)
    ldm = convert.controlnet_to_ldm(cn.state_dict(), cn.config)
    assert "input_hint_block.0.weight" in ldm and "input_hint_block.4.weight" in ldm
    assert "zero_convs.0.0.weight" in ldm and "middle_block_out.0.weight" in ldm
    path = tmp_path / "cn.safetensors"
    save_file({convert.CONTROL_PREFIX + k: v.contiguous() for k, v in ldm.items()}, str(path))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(dict(cn.config)))
    again = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "cfg"), local_files_only=True)
    assert_same_state(cn.state_dict(), again.state_dict())


def test_flux_bfl_round_trip(tmp_path):
    pipe = tiny.build_flux(0, tmp_path / "t5")
    state = pipe.transformer.state_dict()
    bfl = convert.flux_to_bfl(state, pipe.transformer.config)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert "guidance_in.in_layer.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    back = convert.flux_to_diffusers({convert.UNET_PREFIX + k: v for k, v in bfl.items()}, pipe.transformer.config)
    assert_same_state(state, back)


def test_flux_layout_matches_diffusers_converter_at_real_width():
    """At FLUX.1's real width (3072, which diffusers' converter assumes), our BFL names and shapes are
    exactly what diffusers' converter consumes, and it maps them where we do. Meta tensors: no memory."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    state = model.state_dict()
    bfl = convert.flux_to_bfl(state, model.config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = convert.flux_to_diffusers(dict(bfl), model.config)
    assert set(theirs) == set(ours) == set(state)
    for k in state:
        assert theirs[k].shape == ours[k].shape == state[k].shape, k


def test_conversion_rejects_unmapped_keys(sd15):
    state = dict(sd15.unet.state_dict())
    state["some_new_module.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match="some_new_module"):
        convert.unet_to_ldm(state, sd15.unet.config)


def test_sd3_mmdit_round_trip_through_diffusers_converter(tmp_path):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    pipe = tiny.build_sd3(0, tmp_path / "t5")
    state = pipe.transformer.state_dict()
    mmdit = convert.sd3_to_mmdit(state, pipe.transformer.config)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in mmdit and "joint_blocks.1.context_block.attn.qkv.weight" in mmdit
    assert "joint_blocks.1.context_block.mlp.fc1.weight" not in mmdit  # last context block is pre-only
    back = convert_sd3_transformer_checkpoint_to_diffusers({convert.UNET_PREFIX + k: v for k, v in mmdit.items()})
    assert_same_state(state, back)


def test_sd35_style_qk_norm_and_dual_attention_round_trip():
    """SD3.5 Medium's MMDiT-X: RMS qk-norm and a second attention in the first blocks."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                  qk_norm="rms_norm", dual_attention_layers=(0, 1))
    state = model.state_dict()
    mmdit = convert.sd3_to_mmdit(state, model.config)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in mmdit and "joint_blocks.0.x_block.attn.ln_q.weight" in mmdit
    assert_same_state(state, convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit)))
