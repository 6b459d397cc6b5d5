"""Synthetic safetensors files with real key names and real shapes. The data region is a sparse hole
(zeros, no disk use), so full-size SD/SDXL/FLUX shapes cost nothing: probe only reads the header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1}


def write_header_file(path: Path, tensors: dict[str, list[int]], *, dtype: str = "F16",
                      metadata: dict[str, str] | None = None) -> Path:
    table: dict = {}
    offset = 0
    for name, shape in tensors.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        table["__metadata__"] = metadata
    blob = json.dumps(table).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)  # sparse zeros
    return path


U = "model.diffusion_model."

SD15 = {
    U + "input_blocks.0.0.weight": [320, 4, 3, 3],
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    U + "input_blocks.1.1.proj_in.weight": [320, 320, 1, 1],
    U + "output_blocks.11.0.skip_connection.weight": [320, 640, 1, 1],
    U + "time_embed.0.weight": [1280, 320],
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": [768, 768],
    "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3],
    "first_stage_model.encoder.down.0.block.0.conv1.weight": [128, 128, 3, 3],
    "first_stage_model.quant_conv.weight": [8, 8, 1, 1],
}
SD15_INPAINT = {**SD15, U + "input_blocks.0.0.weight": [320, 9, 3, 3]}
SD2 = {
    U + "input_blocks.0.0.weight": [320, 4, 3, 3],
    U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
    U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
    U + "input_blocks.1.1.proj_in.weight": [320, 320],
    "cond_stage_model.model.token_embedding.weight": [49408, 1024],
    "cond_stage_model.model.positional_embedding": [77, 1024],
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": [3072, 1024],
    "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3],
}
SDXL = {
    U + "input_blocks.0.0.weight": [320, 4, 3, 3],
    U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
    U + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": [640, 640],
    U + "label_emb.0.0.weight": [1280, 2816],
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": [1280],
    "conditioner.embedders.1.model.positional_embedding": [77, 1280],
    "conditioner.embedders.1.model.text_projection": [1280, 1280],
    "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3],
}
SDXL_UNET_ONLY = {k.removeprefix(U): v for k, v in SDXL.items() if k.startswith(U)}
SD3 = {
    U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": [9216],
    U + "joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536],
    **{U + f"joint_blocks.{i}.x_block.mlp.fc1.weight": [6144, 1536] for i in range(24)},
    U + "x_embedder.proj.weight": [1536, 16, 2, 2],
    U + "pos_embed": [1, 36864, 1536],
    U + "context_embedder.weight": [1536, 4096],
    "first_stage_model.decoder.conv_in.weight": [512, 16, 3, 3],
    "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
    "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": [77, 1280],
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": [4096, 4096],
}
SD3_DIFFUSERS = {
    "transformer_blocks.0.attn.add_q_proj.weight": [1536, 1536],
    "transformer_blocks.0.attn.to_q.weight": [1536, 1536],
    "context_embedder.weight": [1536, 4096],
    "pos_embed.proj.weight": [1536, 16, 2, 2],
    "pos_embed.pos_embed": [1, 36864, 1536],
}
FLUX_DEV = {
    "double_blocks.0.img_attn.norm.key_norm.scale": [128],
    "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
    "double_blocks.18.txt_mlp.2.weight": [3072, 12288],
    "single_blocks.0.linear1.weight": [21504, 3072],
    "single_blocks.37.linear2.weight": [3072, 15360],
    "guidance_in.in_layer.weight": [3072, 256],
    "img_in.weight": [3072, 64],
    "txt_in.weight": [3072, 4096],
}
FLUX_SCHNELL_COMFY = {U + k: v for k, v in FLUX_DEV.items() if not k.startswith("guidance_in")}
FLUX_DIFFUSERS = {
    "transformer_blocks.0.attn.add_q_proj.weight": [3072, 3072],
    "transformer_blocks.0.attn.to_q.weight": [3072, 3072],
    "single_transformer_blocks.0.proj_mlp.weight": [12288, 3072],
    "x_embedder.weight": [3072, 64],
    "time_text_embed.guidance_embedder.linear_1.weight": [3072, 256],
}
VAE_SD = {
    "encoder.down.0.block.0.conv1.weight": [128, 128, 3, 3],
    "encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    "decoder.conv_in.weight": [512, 4, 3, 3],
    "decoder.up.3.block.0.conv1.weight": [128, 128, 3, 3],
    "quant_conv.weight": [8, 8, 1, 1],
    "post_quant_conv.weight": [4, 4, 1, 1],
}
VAE_FLUX = {
    "encoder.down.0.block.0.conv1.weight": [128, 128, 3, 3],
    "decoder.conv_in.weight": [512, 16, 3, 3],
    "encoder.conv_out.weight": [32, 512, 3, 3],
}
LORA_KOHYA_SD1 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [8, 768],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": [320, 8],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": [],
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [8, 768],
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": [768, 8],
}
LORA_KOHYA_SD2 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": [8, 1024],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": [320, 8],
}
LORA_KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [16, 2048],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": [640, 16],
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [16, 768],
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [16, 1280],
}
LORA_KOHYA_SDXL_UNET_ONLY = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [16, 2048],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": [640, 16],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": [],
}
LORA_KOHYA_FLUX = {
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [16, 3072],
    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [9216, 16],
    "lora_unet_single_blocks_0_linear1.lora_down.weight": [16, 3072],
    "lora_unet_single_blocks_0_linear1.alpha": [],
}
LORA_PEFT_FLUX = {
    "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": [16, 3072],
    "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": [3072, 16],
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": [16, 3072],
}
LORA_PEFT_SD3 = {
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": [16, 1536],
    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": [1536, 16],
}
LORA_PEFT_SDXL_UNET = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": [4, 2048],
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": [640, 4],
}
LORA_COMFY_FLUX = {
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": [16, 3072],
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": [9216, 16],
}
LORA_LYCORIS_LOHA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a": [320, 8],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": [8, 768],
}
EMB_SD1 = {"emb_params": [2, 768]}
EMB_SD2 = {"string_to_param.*": [4, 1024]}
EMB_SDXL = {"clip_l": [3, 768], "clip_g": [3, 1280]}
CONTROLNET_SD15 = {
    "control_model.input_hint_block.0.weight": [16, 3, 3, 3],
    "control_model.input_hint_block.14.weight": [320, 256, 3, 3],
    "control_model.zero_convs.0.0.weight": [320, 320, 1, 1],
    "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "control_model.middle_block_out.0.weight": [1280, 1280, 1, 1],
}
CONTROLNET_SDXL_DIFFUSERS = {
    "controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3],
    "controlnet_down_blocks.0.weight": [320, 320, 1, 1],
    "add_embedding.linear_1.weight": [1280, 2816],
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
}
ESRGAN = {
    "conv_first.weight": [64, 3, 3, 3],
    "body.0.rdb1.conv1.weight": [32, 64, 3, 3],
    "conv_last.weight": [3, 64, 3, 3],
}
ESRGAN_OLD = {"model.0.weight": [64, 3, 3, 3], "model.1.sub.0.RDB1.conv1.0.weight": [32, 64, 3, 3]}
