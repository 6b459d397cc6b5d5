"""Write the diffusers-format config folders (no weights) that single-file loading needs offline:

    src/imagesmith/models/configs/{sd15,sd2,sdxl,sd3,flux-dev,flux-schnell,controlnet-sd15,controlnet-sdxl}/

Each is what the reference repository ships as JSON (runwayml SD1.5, stabilityai SD2.1 768-v,
SDXL base 1.0, SD3 medium, FLUX.1 dev/schnell, lllyasviel sd15 / diffusers SDXL ControlNets): the
configs are produced here by instantiating the diffusers/transformers classes with those
hyperparameters (models on the meta device, so no memory is used) and saving their configs.
Tokenizers are not written here: the loaders add the shipped CLIP tokenizer (configs/tokenizers/clip)
at load time, and T5 tokenizers come from the user's files.

    python scripts/build_model_configs.py          # rewrites the folders; commit the result
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "imagesmith" / "models" / "configs"

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _meta():
    from accelerate import init_empty_weights
    return init_empty_weights()


def save_model_config(cls, folder: Path, **kwargs) -> None:
    with _meta():
        model = cls(**kwargs)
    model.save_config(str(folder))


def save_scheduler(cls, folder: Path, **kwargs) -> None:
    cls(**kwargs).save_config(str(folder))


def clip_l(folder: Path, *, with_projection: bool = False) -> None:
    from transformers import CLIPTextConfig
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, layer_norm_eps=1e-5)
    cfg.architectures = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    cfg.save_pretrained(str(folder))


def clip_bigg(folder: Path) -> None:
    from transformers import CLIPTextConfig
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=1280, layer_norm_eps=1e-5)
    cfg.architectures = ["CLIPTextModelWithProjection"]
    cfg.save_pretrained(str(folder))


def openclip_h(folder: Path) -> None:
    """SD2's text encoder: OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24 kept)."""
    from transformers import CLIPTextConfig
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=512, layer_norm_eps=1e-5)
    cfg.architectures = ["CLIPTextModel"]
    cfg.save_pretrained(str(folder))


def t5_xxl(folder: Path) -> None:
    from transformers import T5Config
    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                   layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                   tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg.architectures = ["T5EncoderModel"]
    cfg.save_pretrained(str(folder))


def sd_vae(folder: Path, *, sample_size: int, scaling_factor: float = 0.18215, latent_channels: int = 4,
           shift_factor: float | None = None, quant: bool = True, force_upcast: bool = True) -> None:
    from diffusers import AutoencoderKL
    save_model_config(AutoencoderKL, folder, in_channels=3, out_channels=3, latent_channels=latent_channels,
                      block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                      act_fn="silu", sample_size=sample_size, scaling_factor=scaling_factor,
                      shift_factor=shift_factor, use_quant_conv=quant, use_post_quant_conv=quant,
                      force_upcast=force_upcast)


def model_index(folder: Path, cls: str, components: dict[str, list]) -> None:
    from diffusers import __version__
    data = {"_class_name": cls, "_diffusers_version": __version__, **components}
    (folder / "model_index.json").write_text(json.dumps(data, indent=2) + "\n")


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
                 flip_sin_to_cos=True, freq_shift=0, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
                 flip_sin_to_cos=True, freq_shift=0, act_fn="silu")


def build_sd15(root: Path) -> None:
    from diffusers import PNDMScheduler, UNet2DConditionModel
    d = root / "sd15"
    save_model_config(UNet2DConditionModel, d / "unet", **SD15_UNET)
    sd_vae(d / "vae", sample_size=512, force_upcast=True)
    clip_l(d / "text_encoder")
    save_scheduler(PNDMScheduler, d / "scheduler", **BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                   steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
    model_index(d, "StableDiffusionPipeline", {
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "requires_safety_checker": False})


def build_sd2(root: Path) -> None:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    d = root / "sd2"
    save_model_config(UNet2DConditionModel, d / "unet", **SD2_UNET)
    sd_vae(d / "vae", sample_size=768)
    openclip_h(d / "text_encoder")
    save_scheduler(DDIMScheduler, d / "scheduler", **BETAS, clip_sample=False, set_alpha_to_one=False,
                   steps_offset=1, prediction_type="v_prediction", timestep_spacing="leading")
    model_index(d, "StableDiffusionPipeline", {
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "requires_safety_checker": False})


def build_sdxl(root: Path) -> None:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    d = root / "sdxl"
    save_model_config(UNet2DConditionModel, d / "unet", **SDXL_UNET)
    sd_vae(d / "vae", sample_size=1024, scaling_factor=0.13025)
    clip_l(d / "text_encoder")
    clip_bigg(d / "text_encoder_2")
    save_scheduler(EulerDiscreteScheduler, d / "scheduler", **BETAS, steps_offset=1, prediction_type="epsilon",
                   timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    model_index(d, "StableDiffusionXLPipeline", {
        "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None]})


def build_sd3(root: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    d = root / "sd3"
    save_model_config(SD3Transformer2DModel, d / "transformer", sample_size=128, patch_size=2, in_channels=16,
                      num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                      caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    sd_vae(d / "vae", sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16, quant=False)
    clip_l(d / "text_encoder", with_projection=True)
    clip_bigg(d / "text_encoder_2")
    t5_xxl(d / "text_encoder_3")
    save_scheduler(FlowMatchEulerDiscreteScheduler, d / "scheduler", num_train_timesteps=1000, shift=3.0)
    model_index(d, "StableDiffusion3Pipeline", {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None]})


def build_flux(root: Path, variant: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    d = root / f"flux-{variant}"
    dev = variant == "dev"
    save_model_config(FluxTransformer2DModel, d / "transformer", patch_size=1, in_channels=64, num_layers=19,
                      num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, guidance_embeds=dev, axes_dims_rope=(16, 56, 56))
    sd_vae(d / "vae", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, quant=False)
    clip_l(d / "text_encoder")
    t5_xxl(d / "text_encoder_2")
    if dev:
        save_scheduler(FlowMatchEulerDiscreteScheduler, d / "scheduler", num_train_timesteps=1000, shift=3.0,
                       use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096)
    else:
        save_scheduler(FlowMatchEulerDiscreteScheduler, d / "scheduler", num_train_timesteps=1000, shift=1.0,
                       use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096)
    model_index(d, "FluxPipeline", {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]})


def build_controlnets(root: Path) -> None:
    from diffusers import ControlNetModel
    keep = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "act_fn",
            "downsample_padding", "mid_block_scale_factor", "use_linear_projection", "upcast_attention",
            "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim")
    for name, unet in (("controlnet-sd15", SD15_UNET), ("controlnet-sdxl", SDXL_UNET)):
        kwargs = {k: v for k, v in unet.items() if k in keep}
        save_model_config(ControlNetModel, root / name, conditioning_embedding_out_channels=(16, 32, 96, 256),
                          controlnet_conditioning_channel_order="rgb", **kwargs)


def main() -> None:
    for name in ("sd15", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell", "controlnet-sd15", "controlnet-sdxl"):
        shutil.rmtree(OUT / name, ignore_errors=True)
    build_sd15(OUT)
    build_sd2(OUT)
    build_sdxl(OUT)
    build_sd3(OUT)
    build_flux(OUT, "dev")
    build_flux(OUT, "schnell")
    build_controlnets(OUT)
    for p in sorted(OUT.rglob("*.json")):
        if "tokenizers" not in p.parts:
            print(p.relative_to(OUT))


if __name__ == "__main__":
    main()
