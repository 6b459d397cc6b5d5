"""Qwen-Image and Qwen-Image-Edit on imagesmith's sampling layer: text conditioning through the pipeline's own
Qwen2.5-VL encoder (diffusers' ``encode_prompt``, which also reads the picture to edit), the picture to edit as
reference latent tokens, and the sizes diffusers' edit pipelines use.

The samplers see the plain [B, 16, H/8, W/8] latent; ``QwenDenoiser`` (engine.sampling.denoisers) packs it into
the transformer's 2x2 tokens. The VAE's per-channel latent normalisation is handled where every VAE is
(``engine.generate``'s encode and decode)."""

from __future__ import annotations

import math

import torch
from PIL import Image

from ..models.probe import QWEN_EDIT_NOTE, QWEN_EDIT_PLUS_NOTE
from ..models.registry import ModelEntry
from .sampling.denoisers import Conditioning

VAE_REFERENCE_AREA = 1024 * 1024
"""diffusers' QwenImageEdit(Plus)Pipeline: the picture to edit is encoded at about 1 MP (its aspect kept)"""
PLUS_CONDITION_AREA = 384 * 384
"""QwenImageEditPlusPipeline: the picture the text encoder sees is about 384x384"""


def is_qwen_edit(entry: ModelEntry) -> bool:
    """Qwen-Image-Edit (2508) and Edit-Plus (2509 and later): the picture to edit and an instruction."""
    return entry.arch == "qwen" and QWEN_EDIT_NOTE in entry.notes


def is_qwen_edit_plus(entry: ModelEntry) -> bool:
    """Qwen-Image-Edit-Plus (2509 and later): edits with up to three pictures."""
    return is_qwen_edit(entry) and any(n == "QwenImageEditPlusPipeline" or n == QWEN_EDIT_PLUS_NOTE
                                       for n in entry.notes)


def edit_size(image: Image.Image, area: int) -> tuple[int, int]:
    """diffusers' ``calculate_dimensions``: the picture's aspect ratio at about ``area`` pixels, sides rounded to
    multiples of 32."""
    ratio = image.width / image.height
    width = math.sqrt(area * ratio)
    return max(32, round(width / 32) * 32), max(32, round(width / ratio / 32) * 32)


def condition_size(pipe, image: Image.Image, area: int) -> tuple[int, int]:
    """A Qwen-Image 2.1 condition picture's size: its aspect at about ``area`` pixels in multiples of 32
    (QwenImage21Pipeline's ``calculate_dimensions``), then as the processor's own resize would take it (its pixel
    bounds and grid): the VAE's tokens must fill the picture slots Qwen3-VL gives it, one slot a 2x2 group."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    width, height = edit_size(image, area)
    ip = pipe.processor.image_processor
    size = getattr(ip, "size", None) or {}
    size = size if isinstance(size, dict) else dict(size)
    low = size.get("shortest_edge") or getattr(ip, "min_pixels", None) or 56 * 56
    high = size.get("longest_edge") or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=low, max_pixels=high)
    return w, h


def reference_sizes(pipe, image: Image.Image, *, area: int = VAE_REFERENCE_AREA,
                    condition_area: int = PLUS_CONDITION_AREA) -> tuple[tuple[int, int], tuple[int, int]]:
    """(VAE reference size, text-encoder picture size) for an edit, as diffusers' edit pipelines and ComfyUI's
    TextEncodeQwenImageEdit(Plus) nodes take them whatever the output size: about 1 MP for the VAE; for Edit-Plus
    a 384 px picture for the text encoder (Edit reads the VAE-sized one)."""
    vae_size = edit_size(image, area)
    plus = type(pipe).__name__.startswith("QwenImageEditPlus")
    return vae_size, (edit_size(image, condition_area) if plus else vae_size)


def encode_text(pipe, prompt: str, device, image: Image.Image | list[Image.Image] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own text conditioning: (embeds [1, T, D], padding mask [1, T] or None). Edit pipelines read
    the picture too (Qwen2.5-VL sees it beside the instruction); Edit-Plus takes several ("Picture 1: ...")."""
    if image is None or (isinstance(image, list) and not image):
        return pipe.encode_prompt(prompt, device=device)
    if type(pipe).__name__.startswith("QwenImageEditPlus"):
        return pipe.encode_prompt(prompt, image=image if isinstance(image, list) else [image], device=device)
    return pipe.encode_prompt(prompt, image=image[0] if isinstance(image, list) else image, device=device)


def stack_conditioning(parts: list[tuple[torch.Tensor, torch.Tensor | None, int]]) -> Conditioning:
    """Per-request (embeds, mask, images) into one batch: each request's text repeated for its images, shorter
    texts padded with zeros and masked out (the transformer attends only to real tokens)."""
    longest = max(e.shape[1] for e, _, _ in parts)
    embeds, masks = [], []
    for e, m, k in parts:
        m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m
        pad = longest - e.shape[1]
        if pad:
            e = torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
        embeds.append(e.repeat(k, 1, 1))
        masks.append(m.repeat(k, 1))
    mask = torch.cat(masks)
    return Conditioning(torch.cat(embeds), {} if bool(mask.all()) else {"mask": mask})


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> the transformer's [B, H/2 * W/2, 4C] tokens."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def unpack(pipe, tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The transformer's tokens -> [B, C, H, W] latents (diffusers' unpack gives a one-frame video latent)."""
    return pipe._unpack_latents(tokens, height, width, pipe.vae_scale_factor)[:, :, 0]


def inpaint_control(encode, pixels: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """An inpainting ControlNet's control latent (InstantX's Qwen-Image-ControlNet-Inpainting; diffusers'
    QwenImageControlNetInpaintPipeline, ComfyUI's ControlNetInpaintingAliMamaApply): the picture (``pixels``,
    ``[B, 3, H, W]`` in [0, 1]) with its ``hole`` (bool ``[B, 1, H, W]``, True = repaint) black, through
    ``encode`` (pixels in [-1, 1] -> latent), and beside its channels the mask of what to keep (1 kept, 0
    repainted) taken to the latent's size by nearest neighbour."""
    latent = encode(pixels.masked_fill(hole, 0.0) * 2.0 - 1.0)
    keep = torch.nn.functional.interpolate((~hole).float(), size=latent.shape[-2:], mode="nearest")
    return torch.cat([latent, keep.to(latent.dtype)], dim=1)


def share_positions(controlnet, transformer) -> None:
    """A Qwen-Image ControlNet is made from the transformer (InstantX's ``from_transformer``) and must place tokens
    as it does: a file whose config was read off its shapes (positions have no weights) takes the transformer's
    rotary axes."""
    axes = list(transformer.config.axes_dims_rope)
    if list(controlnet.config.axes_dims_rope) != axes:
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
        controlnet.pos_embed = QwenEmbedRope(theta=10000, axes_dim=axes, scale_rope=True).to(
            next(controlnet.parameters()).device)
        controlnet.register_to_config(axes_dims_rope=tuple(axes))
