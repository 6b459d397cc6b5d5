"""LoRA key naming: diffusers/peft <-> kohya/WebUI.

kohya (and so A1111, Forge and ComfyUI) name a LoRA'd module ``lora_unet_<module path with _>`` /
``lora_te[1|2]_<text encoder module path with _>`` and store ``.lora_down.weight`` (peft's ``lora_A``),
``.lora_up.weight`` (``lora_B``) and ``.alpha``. SD1.5 UNet paths are the diffusers ones; SDXL UNet paths
are the original (LDM) ones (``input_blocks_4_1_...``). :func:`to_kohya` writes that; :func:`from_kohya`
reads it back against the model's module names (underscores alone are ambiguous)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def _module_path(key: str) -> tuple[str, str]:
    """'a.b.lora_A.weight' -> ('a.b', 'lora_A')."""
    stem, _, _ = key.rpartition(".")
    module, _, ab = stem.rpartition(".")
    return module, ab


def _prefixes(components: Iterable[str]) -> dict[str, str]:
    prefixes = dict(PREFIXES)
    if "text_encoder_2" in components:
        prefixes["text_encoder"] = "lora_te1_"
    return prefixes


def to_kohya(layers: dict[str, dict[str, torch.Tensor]], *, alpha: float,
             unet_name_map: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """``{component: peft state}`` (keys ``<module>.lora_A.weight`` / ``lora_B``) -> kohya/WebUI keys with
    ``.alpha`` (scale = alpha / rank, as peft's ``lora_alpha``). ``unet_name_map`` maps UNet module paths
    (e.g. :func:`sdxl_unet_module_to_ldm` for SDXL)."""
    prefixes = _prefixes(layers)
    out: dict[str, torch.Tensor] = {}
    for comp, state in layers.items():
        for key, value in state.items():
            module, ab = _module_path(key)
            if comp == "unet" and unet_name_map is not None:
                module = unet_name_map(module)
            if comp.startswith("text_encoder") and not module.startswith("text_model.") and ".layers." in module:
                module = "text_model." + module  # CLIP: kohya names start at text_model
            name = prefixes[comp] + module.replace(".", "_")
            out[f"{name}.{'lora_down' if ab == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, Iterable[str]], *,
               unet_name_map: Callable[[str], str] | None = None
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """The inverse of :func:`to_kohya`: ``modules`` = ``{component: its module names}`` (``named_modules``)
    to resolve the underscores. Returns ``({component: peft state}, {component: alpha})``."""
    prefixes = _prefixes(modules)
    lookup: dict[str, tuple[str, str]] = {}
    for comp, names in modules.items():
        for name in names:
            try:
                kohya = name if not (comp == "unet" and unet_name_map) else unet_name_map(name)
            except KeyError:  # a container module with no LDM name: never a LoRA target
                continue
            if comp.startswith("text_encoder") and not kohya.startswith("text_model.") and ".layers." in kohya:
                kohya = "text_model." + kohya
            lookup[prefixes[comp] + kohya.replace(".", "_")] = (comp, name)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        stem, _, kind = key.partition(".")
        if stem not in lookup:
            raise KeyError(f"kohya key {key!r} names no module of this model")
        comp, module = lookup[stem]
        if kind == "alpha":
            alphas[comp] = float(value)
        elif kind in ("lora_down.weight", "lora_up.weight"):
            ab = "lora_A" if kind.startswith("lora_down") else "lora_B"
            layers.setdefault(comp, {})[f"{module}.{ab}.weight"] = value
    return layers, alphas


def sdxl_unet_module_to_ldm(unet_config) -> Callable[[str], str]:
    """kohya's SDXL LoRAs name UNet modules in the original (LDM) layout: input_blocks_4_1_..."""
    from .convert import unet_prefix_map
    prefixes = sorted(unet_prefix_map(unet_config), key=lambda p: -len(p[0]))

    def convert(module: str) -> str:
        for src, dst, _ in prefixes:
            if (module + ".").startswith(src):
                return (dst + (module + ".")[len(src):]).rstrip(".")
        raise KeyError(module)
    return convert
