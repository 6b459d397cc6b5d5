"""Diffusers -> original ("single-file", A1111/ComfyUI) key layouts, and back where diffusers cannot.

Used to export single-file checkpoints (`export_single_file`) and by the test fixtures. The mappings
follow diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and ..._sdxl.py, but are
driven by each model's config (block count, layers per block, which blocks have attention) instead of
SD's fixed 4x2 layout, so they hold for any UNet size, tiny test models included.

FLUX: diffusers' own single-file converter hard-codes FLUX's inner width (3072), so it cannot read a
FLUX of another size; `flux_to_diffusers` is a config-driven inverse of `flux_to_bfl` and the loaders
use it for FLUX single files.

Files exported here carry their diffusers configs in the safetensors header metadata
(`imagesmith.configs`), so they load exactly, whatever their size, without any download."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

# metadata keys written into safetensors headers by `export_single_file`
META_ARCH = "imagesmith.arch"
META_CONFIGS = "imagesmith.configs"

# prefixes of the original layouts
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
CONTROL_PREFIX = "control_model."

_RESNET_UNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


class ConversionError(ValueError):
    """A state dict does not have the layout its config says (a bug or a mismatched config)."""


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ConversionError("per-block layers_per_block lists have no original (LDM) layout")
        lpb = lpb[0]
    return int(lpb)


def unet_prefix_map(config: Mapping[str, Any], *, controlnet: bool = False) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for a UNet2DConditionModel (or ControlNetModel) config.
    kind is 'resnet' (inner names change) or 'plain' (inner names are the same in both layouts)."""
    n = len(config["block_out_channels"])
    lpb = _layers_per_block(config)
    down_types = config["down_block_types"]
    out: list[tuple[str, str, str]] = [(d, l, "plain") for d, l in _UNET_TOP.items()]
    k = 1
    for i in range(n):
        for j in range(lpb):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", "resnet"))
            if "CrossAttn" in down_types[i]:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", "plain"))
            k += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", "plain"))
            k += 1
    out.append(("mid_block.resnets.0.", "middle_block.0.", "resnet"))
    out.append(("mid_block.attentions.0.", "middle_block.1.", "plain"))
    out.append(("mid_block.resnets.1.", "middle_block.2.", "resnet"))
    if controlnet:
        # zero convs: one per input block, and the middle one
        for z in range(k):
            out.append((f"controlnet_down_blocks.{z}.", f"zero_convs.{z}.0.", "plain"))
        out.append(("controlnet_mid_block.", "middle_block_out.0.", "plain"))
        # hint encoder: conv_in, blocks (conv pairs with SiLU between), conv_out
        n_hint = len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
        out.append(("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", "plain"))
        for b in range(2 * (n_hint - 1)):
            out.append((f"controlnet_cond_embedding.blocks.{b}.", f"input_hint_block.{2 * (b + 1)}.", "plain"))
        out.append(("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (2 * (n_hint - 1) + 1)}.", "plain"))
        return out
    up_types = config["up_block_types"]
    k = 0
    for i in range(n):
        has_attn = "CrossAttn" in up_types[i]
        for j in range(lpb + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", "resnet"))
            if has_attn:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", "plain"))
            if j == lpb and i < n - 1:
                out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{2 if has_attn else 1}.conv.", "plain"))
            k += 1
    return out


def _convert_by_prefix(state: Mapping[str, torch.Tensor], prefixes: list[tuple[str, str, str]],
                       resnet_renames: Iterable[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    ordered = sorted(prefixes, key=lambda p: -len(p[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for src, dst, kind in ordered:
            if key.startswith(src):
                rest = key[len(src):]
                if kind == "resnet":
                    for a, b in resnet_renames:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out[dst + rest] = value
                break
        else:
            raise ConversionError(f"{what}: no original-layout name for {key!r}")
    return out


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel state dict -> LDM names (without the model.diffusion_model. prefix)."""
    return _convert_by_prefix(state, unet_prefix_map(config), _RESNET_UNET, "unet")


def unet_from_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of `unet_to_ldm` (LDM names without prefix -> diffusers names)."""
    inverse = [(l, d, kind) for d, l, kind in unet_prefix_map(config)]
    return _convert_by_prefix(state, inverse, [(b, a) for a, b in _RESNET_UNET], "unet")


def controlnet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers ControlNetModel state dict -> original ControlNet names (without control_model.)."""
    return _convert_by_prefix(state, unet_prefix_map(config, controlnet=True), _RESNET_UNET, "controlnet")


# ---------------------------------------------------------------------------------------------- VAE
def vae_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    n = len(config["block_out_channels"])
    lpb = int(config["layers_per_block"])
    out = [
        ("encoder.conv_in.", "encoder.conv_in.", "plain"), ("encoder.conv_out.", "encoder.conv_out.", "plain"),
        ("encoder.conv_norm_out.", "encoder.norm_out.", "plain"),
        ("decoder.conv_in.", "decoder.conv_in.", "plain"), ("decoder.conv_out.", "decoder.conv_out.", "plain"),
        ("decoder.conv_norm_out.", "decoder.norm_out.", "plain"),
        ("quant_conv.", "quant_conv.", "plain"), ("post_quant_conv.", "post_quant_conv.", "plain"),
    ]
    for side in ("encoder", "decoder"):
        out.append((f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", "resnet"))
        out.append((f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", "resnet"))
        out.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", "attn"))
    for i in range(n):
        for j in range(lpb):
            out.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "resnet"))
        if i < n - 1:
            out.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", "plain"))
        for j in range(lpb + 1):
            out.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", "resnet"))
        if i < n - 1:
            out.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", "plain"))
    return out


_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> LDM names (without the first_stage_model. prefix).
    The mid attention's linear layers become 1x1 convolutions, as in the original VAE."""
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted(vae_prefix_map(config), key=lambda p: -len(p[0]))
    for key, value in state.items():
        for src, dst, kind in prefixes:
            if not key.startswith(src):
                continue
            rest = key[len(src):]
            if kind == "resnet" and rest.startswith("conv_shortcut."):
                rest = "nin_shortcut." + rest[len("conv_shortcut."):]
            if kind == "attn":
                for a, b in _VAE_ATTN:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                if rest.endswith("weight") and value.ndim == 2:
                    value = value[:, :, None, None]
            out[dst + rest] = value
            break
        else:
            raise ConversionError(f"vae: no original-layout name for {key!r}")
    return out


# --------------------------------------------------------------------------------------- text encoders
def _flat_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text state dict keys without the `text_model.` wrapper (transformers >= 5.6 flattened
    CLIPTextModel; CLIPTextModelWithProjection still wraps)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel state dict -> the `transformer.text_model.*` layout of SD1 / SDXL embedder 0
    (returned without the cond_stage_model.transformer. prefix)."""
    out = {}
    for k, v in _flat_clip(state).items():
        if k == "text_projection.weight" or k.startswith("embeddings.position_ids"):
            continue
        out["text_model." + k] = v
    return out


_OPENCLIP = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
             ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def openclip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) state dict -> OpenCLIP layout (SD2 cond_stage_model.model.*,
    SDXL conditioner.embedders.1.model.*), returned without prefix: q/k/v fused into in_proj,
    text_projection stored transposed."""
    flat = _flat_clip(state)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        if k.startswith("embeddings.position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("encoder.layers."):
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
            i, rest = m.group(1), m.group(2)
            qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                fused.setdefault(f"transformer.resblocks.{i}.attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = v
                continue
            for a, b in _OPENCLIP:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            else:
                raise ConversionError(f"openclip: no original-layout name for {k!r}")
            out[f"transformer.resblocks.{i}.{rest}"] = v
        else:
            raise ConversionError(f"openclip: no original-layout name for {k!r}")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --------------------------------------------------------------------------------------------- FLUX
def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_to_bfl(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers FluxTransformer2DModel state dict -> Black Forest Labs layout (double_blocks.*,
    single_blocks.*, img_in, txt_in, time_in, vector_in, guidance_in, final_layer), no prefix."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(k: str) -> torch.Tensor:
        try:
            return s.pop(k)
        except KeyError:
            raise ConversionError(f"flux: missing {k!r}") from None

    for wb in ("weight", "bias"):
        out[f"time_in.in_layer.{wb}"] = take(f"time_text_embed.timestep_embedder.linear_1.{wb}")
        out[f"time_in.out_layer.{wb}"] = take(f"time_text_embed.timestep_embedder.linear_2.{wb}")
        out[f"vector_in.in_layer.{wb}"] = take(f"time_text_embed.text_embedder.linear_1.{wb}")
        out[f"vector_in.out_layer.{wb}"] = take(f"time_text_embed.text_embedder.linear_2.{wb}")
        if f"time_text_embed.guidance_embedder.linear_1.{wb}" in s:
            out[f"guidance_in.in_layer.{wb}"] = take(f"time_text_embed.guidance_embedder.linear_1.{wb}")
            out[f"guidance_in.out_layer.{wb}"] = take(f"time_text_embed.guidance_embedder.linear_2.{wb}")
        out[f"txt_in.{wb}"] = take(f"context_embedder.{wb}")
        out[f"img_in.{wb}"] = take(f"x_embedder.{wb}")
        out[f"final_layer.linear.{wb}"] = take(f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = _swap_halves(take(f"norm_out.linear.{wb}"))
    for i in range(int(config["num_layers"])):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{q}img_mod.lin.{wb}"] = take(f"{p}norm1.linear.{wb}")
            out[f"{q}txt_mod.lin.{wb}"] = take(f"{p}norm1_context.linear.{wb}")
            out[f"{q}img_attn.qkv.{wb}"] = torch.cat([take(f"{p}attn.to_{x}.{wb}") for x in "qkv"])
            out[f"{q}txt_attn.qkv.{wb}"] = torch.cat([take(f"{p}attn.add_{x}_proj.{wb}") for x in "qkv"])
            out[f"{q}img_mlp.0.{wb}"] = take(f"{p}ff.net.0.proj.{wb}")
            out[f"{q}img_mlp.2.{wb}"] = take(f"{p}ff.net.2.{wb}")
            out[f"{q}txt_mlp.0.{wb}"] = take(f"{p}ff_context.net.0.proj.{wb}")
            out[f"{q}txt_mlp.2.{wb}"] = take(f"{p}ff_context.net.2.{wb}")
            out[f"{q}img_attn.proj.{wb}"] = take(f"{p}attn.to_out.0.{wb}")
            out[f"{q}txt_attn.proj.{wb}"] = take(f"{p}attn.to_add_out.{wb}")
        out[f"{q}img_attn.norm.query_norm.scale"] = take(f"{p}attn.norm_q.weight")
        out[f"{q}img_attn.norm.key_norm.scale"] = take(f"{p}attn.norm_k.weight")
        out[f"{q}txt_attn.norm.query_norm.scale"] = take(f"{p}attn.norm_added_q.weight")
        out[f"{q}txt_attn.norm.key_norm.scale"] = take(f"{p}attn.norm_added_k.weight")
    for i in range(int(config["num_single_layers"])):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{q}modulation.lin.{wb}"] = take(f"{p}norm.linear.{wb}")
            out[f"{q}linear1.{wb}"] = torch.cat([take(f"{p}attn.to_{x}.{wb}") for x in "qkv"] + [take(f"{p}proj_mlp.{wb}")])
            out[f"{q}linear2.{wb}"] = take(f"{p}proj_out.{wb}")
        out[f"{q}norm.query_norm.scale"] = take(f"{p}attn.norm_q.weight")
        out[f"{q}norm.key_norm.scale"] = take(f"{p}attn.norm_k.weight")
    if s:
        raise ConversionError(f"flux: no BFL name for {sorted(s)[:3]}")
    return out


def flux_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """BFL layout (with or without model.diffusion_model.) -> diffusers FluxTransformer2DModel names;
    sizes come from `config` (diffusers' converter assumes the 3072-wide FLUX.1). Split tensors are
    copied, not views: a view into a fused tensor has another memory alignment, which changes CPU
    kernels' rounding (and would keep the fused tensor alive)."""
    s = {k.removeprefix(UNET_PREFIX): v for k, v in state.items()}
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out: dict[str, torch.Tensor] = {}

    def take(k: str) -> torch.Tensor:
        try:
            return s.pop(k)
        except KeyError:
            raise ConversionError(f"flux: the file has no {k!r}: not a FLUX transformer of this config") from None

    for wb in ("weight", "bias"):
        out[f"time_text_embed.timestep_embedder.linear_1.{wb}"] = take(f"time_in.in_layer.{wb}")
        out[f"time_text_embed.timestep_embedder.linear_2.{wb}"] = take(f"time_in.out_layer.{wb}")
        out[f"time_text_embed.text_embedder.linear_1.{wb}"] = take(f"vector_in.in_layer.{wb}")
        out[f"time_text_embed.text_embedder.linear_2.{wb}"] = take(f"vector_in.out_layer.{wb}")
        if f"guidance_in.in_layer.{wb}" in s:
            out[f"time_text_embed.guidance_embedder.linear_1.{wb}"] = take(f"guidance_in.in_layer.{wb}")
            out[f"time_text_embed.guidance_embedder.linear_2.{wb}"] = take(f"guidance_in.out_layer.{wb}")
        out[f"context_embedder.{wb}"] = take(f"txt_in.{wb}")
        out[f"x_embedder.{wb}"] = take(f"img_in.{wb}")
        out[f"proj_out.{wb}"] = take(f"final_layer.linear.{wb}")
        out[f"norm_out.linear.{wb}"] = _swap_halves(take(f"final_layer.adaLN_modulation.1.{wb}"))
    for i in range(int(config["num_layers"])):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{p}norm1.linear.{wb}"] = take(f"{q}img_mod.lin.{wb}")
            out[f"{p}norm1_context.linear.{wb}"] = take(f"{q}txt_mod.lin.{wb}")
            for x, t in zip("qkv", torch.chunk(take(f"{q}img_attn.qkv.{wb}"), 3, dim=0)):
                out[f"{p}attn.to_{x}.{wb}"] = t.clone()
            for x, t in zip("qkv", torch.chunk(take(f"{q}txt_attn.qkv.{wb}"), 3, dim=0)):
                out[f"{p}attn.add_{x}_proj.{wb}"] = t.clone()
            out[f"{p}ff.net.0.proj.{wb}"] = take(f"{q}img_mlp.0.{wb}")
            out[f"{p}ff.net.2.{wb}"] = take(f"{q}img_mlp.2.{wb}")
            out[f"{p}ff_context.net.0.proj.{wb}"] = take(f"{q}txt_mlp.0.{wb}")
            out[f"{p}ff_context.net.2.{wb}"] = take(f"{q}txt_mlp.2.{wb}")
            out[f"{p}attn.to_out.0.{wb}"] = take(f"{q}img_attn.proj.{wb}")
            out[f"{p}attn.to_add_out.{wb}"] = take(f"{q}txt_attn.proj.{wb}")
        out[f"{p}attn.norm_q.weight"] = take(f"{q}img_attn.norm.query_norm.scale")
        out[f"{p}attn.norm_k.weight"] = take(f"{q}img_attn.norm.key_norm.scale")
        out[f"{p}attn.norm_added_q.weight"] = take(f"{q}txt_attn.norm.query_norm.scale")
        out[f"{p}attn.norm_added_k.weight"] = take(f"{q}txt_attn.norm.key_norm.scale")
    for i in range(int(config["num_single_layers"])):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{p}norm.linear.{wb}"] = take(f"{q}modulation.lin.{wb}")
            lin1 = take(f"{q}linear1.{wb}")
            qq, kk, vv, mlp = torch.split(lin1, [inner, inner, inner, lin1.shape[0] - 3 * inner], dim=0)
            out[f"{p}attn.to_q.{wb}"], out[f"{p}attn.to_k.{wb}"], out[f"{p}attn.to_v.{wb}"] = (
                qq.clone(), kk.clone(), vv.clone())
            out[f"{p}proj_mlp.{wb}"] = mlp.clone()
            out[f"{p}proj_out.{wb}"] = take(f"{q}linear2.{wb}")
        out[f"{p}attn.norm_q.weight"] = take(f"{q}norm.query_norm.scale")
        out[f"{p}attn.norm_k.weight"] = take(f"{q}norm.key_norm.scale")
    leftover = [k for k in s if not k.startswith(("vae.", "text_encoders.", "first_stage_model.", "cond_stage_model."))]
    if leftover:
        raise ConversionError(f"flux: unexpected tensors {leftover[:3]} (a FLUX variant this config does not describe)")
    return out


# ---------------------------------------------------------------------------------------------- SD3
def sd3_to_mmdit(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers SD3Transformer2DModel state dict -> Stability's original MMDiT layout (joint_blocks.*,
    x_embedder, t_embedder, y_embedder, final_layer; no prefix), the inverse of diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers (the last block's context side is pre-only)."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(k: str) -> torch.Tensor:
        try:
            return s.pop(k)
        except KeyError:
            raise ConversionError(f"sd3: missing {k!r}") from None

    out["pos_embed"] = take("pos_embed.pos_embed")
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    for wb in ("weight", "bias"):
        out[f"x_embedder.proj.{wb}"] = take(f"pos_embed.proj.{wb}")
        out[f"t_embedder.mlp.0.{wb}"] = take(f"time_text_embed.timestep_embedder.linear_1.{wb}")
        out[f"t_embedder.mlp.2.{wb}"] = take(f"time_text_embed.timestep_embedder.linear_2.{wb}")
        out[f"y_embedder.mlp.0.{wb}"] = take(f"time_text_embed.text_embedder.linear_1.{wb}")
        out[f"y_embedder.mlp.2.{wb}"] = take(f"time_text_embed.text_embedder.linear_2.{wb}")
        out[f"context_embedder.{wb}"] = take(f"context_embedder.{wb}")
        out[f"final_layer.linear.{wb}"] = take(f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = _swap_halves(take(f"norm_out.linear.{wb}"))
    for i in range(n):
        p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        for wb in ("weight", "bias"):
            out[f"{x}attn.qkv.{wb}"] = torch.cat([take(f"{p}attn.to_{q}.{wb}") for q in "qkv"])
            out[f"{c}attn.qkv.{wb}"] = torch.cat([take(f"{p}attn.add_{q}_proj.{wb}") for q in "qkv"])
            out[f"{x}attn.proj.{wb}"] = take(f"{p}attn.to_out.0.{wb}")
            out[f"{x}adaLN_modulation.1.{wb}"] = take(f"{p}norm1.linear.{wb}")
            ctx_mod = take(f"{p}norm1_context.linear.{wb}")
            out[f"{c}adaLN_modulation.1.{wb}"] = _swap_halves(ctx_mod) if last else ctx_mod
            out[f"{x}mlp.fc1.{wb}"] = take(f"{p}ff.net.0.proj.{wb}")
            out[f"{x}mlp.fc2.{wb}"] = take(f"{p}ff.net.2.{wb}")
            if not last:
                out[f"{c}attn.proj.{wb}"] = take(f"{p}attn.to_add_out.{wb}")
                out[f"{c}mlp.fc1.{wb}"] = take(f"{p}ff_context.net.0.proj.{wb}")
                out[f"{c}mlp.fc2.{wb}"] = take(f"{p}ff_context.net.2.{wb}")
            if i in dual:
                out[f"{x}attn2.qkv.{wb}"] = torch.cat([take(f"{p}attn2.to_{q}.{wb}") for q in "qkv"])
                out[f"{x}attn2.proj.{wb}"] = take(f"{p}attn2.to_out.0.{wb}")
        for src, dst in (("attn.norm_q", f"{x}attn.ln_q"), ("attn.norm_k", f"{x}attn.ln_k"),
                         ("attn.norm_added_q", f"{c}attn.ln_q"), ("attn.norm_added_k", f"{c}attn.ln_k"),
                         ("attn2.norm_q", f"{x}attn2.ln_q"), ("attn2.norm_k", f"{x}attn2.ln_k")):
            if f"{p}{src}.weight" in s:
                out[f"{dst}.weight"] = take(f"{p}{src}.weight")
    if s:
        raise ConversionError(f"sd3: no MMDiT name for {sorted(s)[:3]}")
    return out


# ------------------------------------------------------------------------------------------- export
def _configs_of(pipe) -> dict[str, Any]:
    """JSON-able diffusers/transformers configs of a pipeline's components, plus its model_index."""
    configs: dict[str, Any] = {"model_index": {"_class_name": type(pipe).__name__}}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        cfg = getattr(comp, "config", None)
        if cfg is None:
            configs["model_index"][name] = [type(comp).__module__.split(".")[0], type(comp).__name__]
            continue
        lib = "transformers" if type(comp).__module__.startswith("transformers") else "diffusers"
        configs["model_index"][name] = [lib, type(comp).__name__]
        if lib == "transformers":
            configs[name] = comp.config.to_dict()
        else:
            configs[name] = dict(comp.config)
    return json.loads(json.dumps(configs, default=_json_default))


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    return str(o)


def pipeline_to_single_file(pipe, arch: str) -> dict[str, torch.Tensor]:
    """An SD1/SD2/SDXL pipeline -> one state dict in the A1111 layout; FLUX -> the BFL transformer
    (as flux1-dev.safetensors ships: transformer only); SD3 -> the MMDiT transformer under
    model.diffusion_model. (as sd3_medium.safetensors, without the text encoders)."""
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            sd[prefix + k] = v.detach().contiguous()

    if arch in ("sd1", "sd2", "sdxl"):
        put(UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
        put(VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
        if arch == "sd1":
            put(SD1_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
        elif arch == "sd2":
            put(SD2_OPENCLIP_PREFIX, openclip_to_ldm(pipe.text_encoder.state_dict()))
        elif getattr(pipe, "text_encoder", None) is None:  # the refiner: OpenCLIP bigG its only (first) embedder,
            put(SDXL_REFINER_OPENCLIP_PREFIX, openclip_to_ldm(pipe.text_encoder_2.state_dict()))  # as it ships
        else:
            put(SDXL_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
            put(SDXL_OPENCLIP_PREFIX, openclip_to_ldm(pipe.text_encoder_2.state_dict()))
        return sd
    if arch == "flux":
        put("", flux_to_bfl(pipe.transformer.state_dict(), pipe.transformer.config))
        return sd
    if arch == "sd3":
        put(UNET_PREFIX, sd3_to_mmdit(pipe.transformer.state_dict(), pipe.transformer.config))
        return sd
    raise ConversionError(f"no single-file export for architecture {arch!r}")


def export_single_file(pipe, arch: str, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as one .safetensors file in the original layout A1111/ComfyUI read, with the
    diffusers configs in the header metadata so imagesmith reloads it exactly."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = pipeline_to_single_file(pipe, arch)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    configs = _configs_of(pipe)
    if arch in ("flux", "sd3"):
        configs["_contents"] = ["transformer"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={META_ARCH: arch, META_CONFIGS: json.dumps(configs)})
    tmp.replace(path)
    return path
