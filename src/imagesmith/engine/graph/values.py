"""The values that travel along a graph's links, as ComfyUI's types name them.

MODEL, CLIP and VAE are references (a registry entry plus what was applied to it: LoRAs with their strengths,
clip skip, a sampling override), never a mutated network: the network is shared in the engine's cache, and each
sampler or text encoder run switches on exactly its own LoRAs (ARCHITECTURE: patch, never mutate).
LATENT is ``{"samples": [B, C, h, w] scaled latents, "noise_mask"?: [B, 1, H, W]}``; IMAGE is ``[B, H, W, 3]``
floats in [0, 1] and MASK ``[B, H, W]``, as in ComfyUI, so the node semantics carry over unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ...models.registry import ModelEntry


@dataclass(frozen=True)
class LoraUse:
    name: str
    path: str
    arch: str | None
    mtime_ns: int
    strength: float


@dataclass(frozen=True, eq=False)
class ModelValue:
    entry: ModelEntry
    loras: tuple[LoraUse, ...] = ()
    sampling: tuple = ()
    """("discrete", prediction, zsnr) | ("sd3", shift) | ("flux", max_shift, base_shift, width, height)"""
    post_cfg: tuple = ()
    """("cfg_norm", strength): ComfyUI's CFGNorm after the CFG mix"""
    differential: bool = False
    """ComfyUI's DifferentialDiffusion: a soft noise mask repaints each pixel from the step its value reaches"""

    def with_lora(self, lora: LoraUse) -> "ModelValue":
        return replace(self, loras=self.loras + (lora,))


@dataclass(frozen=True, eq=False)
class ClipValue:
    entry: ModelEntry
    loras: tuple[LoraUse, ...] = ()
    clip_skip: int = 1
    """A1111's meaning: 1 = the last layer (ComfyUI's stop_at_clip_layer -1), 2 = the penultimate (-2), ..."""
    files: tuple[str, ...] = ()
    """text encoder files of ComfyUI's CLIP loaders (``entry`` is then the folder that gives tokenizers and
    configs); empty: the checkpoint's own encoders"""

    def with_lora(self, lora: LoraUse) -> "ClipValue":
        return replace(self, loras=self.loras + (lora,))


@dataclass(frozen=True, eq=False)
class VaeValue:
    entry: ModelEntry | None = None
    """a checkpoint's own VAE"""
    name: str | None = None
    """a separate VAE (VAELoader) by registry name"""


@dataclass(frozen=True, eq=False)
class ControlNetValue:
    name: str
    union_type: int | None = None
    """a union ControlNet's control type (SetUnionControlNetType), None for auto"""


@dataclass(frozen=True, eq=False)
class UpscaleModelValue:
    name: str


@dataclass(frozen=True, eq=False)
class ClipVisionValue:
    name: str
    """a vision encoder in models/clip_vision (SigLIP for FLUX Redux)"""


@dataclass(frozen=True, eq=False)
class StyleModelValue:
    name: str
    """a style model in models/style_models (FLUX Redux)"""


@dataclass(eq=False)
class Cond:
    """One conditioning entry (ComfyUI's ``[tensor, {extras}]``)."""
    embeds: torch.Tensor
    arch: str
    pooled: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """area (h, w, y, x in latent cells), strength, mask [1, H, W], mask_strength, set_area_to_bounds,
    guidance (FLUX), txt_ids (FLUX), controls [(ControlNetValue, image [1, 3, H, W], strength, start, end)]"""

    def but(self, **extra) -> "Cond":
        return Cond(self.embeds, self.arch, self.pooled, {**self.extra, **extra})
