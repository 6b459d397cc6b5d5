"""LoRA stacks applied as peft adapters on a shared base model.

The base weights are never merged or mutated: each LoRA file is loaded once per base model as a named
adapter, and each job only switches which adapters are active and at what weight (`set_adapters`), so
re-weighting between jobs costs milliseconds and never reloads the base. A weight of 0 deactivates
the adapter entirely, which gives exactly the base model's pixels.

Hot-swap (a server with IMAGESMITH_LORA_MAX_RANK): a compiled model recompiles whenever its set of adapters or
their scales change. There the LoRAs live in fixed slots (``slot0``, ``slot1``, ...) padded to the declared
rank: another LoRA is copied into a slot's tensors in place (diffusers' ``hotswap=True``), a weight is written
into the slot's scaling tensor in place, and an unused slot is scaled to 0, so nothing the compiled graph
guards on changes. Only a request with more LoRAs than there are slots adds one, which recompiles once
(logged)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ..core.errors import BadRequest, UnsupportedModel

log = logging.getLogger("imagesmith.loras")


@dataclass(frozen=True)
class ResolvedLora:
    name: str
    path: str
    weight: float
    arch: str | None
    mtime_ns: int


def adapter_name(lora: ResolvedLora) -> str:
    # peft adapter names end up in module attribute paths: no dots or odd characters
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", lora.name) + f"_{lora.mtime_ns % 10**8}"


def compatible(lora_arch: str | None, model_arch: str) -> bool:
    if not lora_arch or lora_arch == "unknown":
        return True
    families = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "house": "sd1"}
    return families.get(lora_arch, lora_arch) == families.get(model_arch, model_arch)


def apply_loras(pipe, state: dict, loras: list[ResolvedLora], model_arch: str, *,
                hotswap_rank: int | None = None) -> None:
    """Make exactly `loras` active on `pipe` with their weights. `state` is the per-model dict the
    cache keeps beside the pipeline: it remembers which adapters are already loaded. With `hotswap_rank`
    the LoRAs go into hot-swap slots (module docstring)."""
    for lora in loras:
        if not compatible(lora.arch, model_arch):
            raise UnsupportedModel(f"LoRA {lora.name!r} is for {lora.arch} models, but the checkpoint is {model_arch}")
    if loras and not state.get("unpacked_4bit"):  # an NF4 file's 4-bit layers: plain ones for the adapters
        from ..models.bnb4 import unpack_linears
        net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if net is not None and unpack_linears(net):
            log.warning("LoRA on a 4-bit (NF4) model: its layers are dequantised for the adapters (the memory of "
                        "the compute dtype from now on)")
        state["unpacked_4bit"] = True
    if hotswap_rank is not None:
        _apply_slots(pipe, state, loras, hotswap_rank)
        return
    loaded: dict[str, str] = state.setdefault("lora_adapters", {})
    compiled = bool((state.get("performance") or {}).get("compiled"))
    for lora in loras:
        name = adapter_name(lora)
        if name in loaded or lora.weight == 0:
            continue
        if compiled:
            log.warning("LoRA %r loaded as a new adapter on a compiled model: torch.compile recompiles (set "
                        "IMAGESMITH_LORA_MAX_RANK to hot-swap LoRAs without recompiling)", lora.name)
        try:
            pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise BadRequest(f"LoRA {lora.name!r} could not be applied to this model: {str(exc).splitlines()[0][:200]}") from None
        loaded[name] = lora.path
    active = [(adapter_name(l), l.weight) for l in loras if l.weight != 0]
    if not loaded:
        return
    if not active:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([n for n, _ in active], adapter_weights=[w for _, w in active])


def _lora_layers(pipe):
    from peft.tuners.lora import LoraLayer
    for part in getattr(pipe, "components", {}).values():
        if isinstance(part, torch.nn.Module):
            for module in part.modules():
                if isinstance(module, LoraLayer):
                    yield module


def _set_scale(module, slot: str, value: float) -> None:
    """Write a slot's scale in place when it is a tensor (what a compiled graph reads), else as a tensor."""
    current = module.scaling.get(slot)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    elif current is not None:
        module.scaling[slot] = torch.tensor(float(value), device=module.weight.device)


def _apply_slots(pipe, state: dict, loras: list[ResolvedLora], rank: int) -> None:
    slots: list[str | None] = state.setdefault("lora_slots", [])
    base: dict[str, list[float]] = state.setdefault("lora_slot_scales", {})  # each layer's scale at weight 1
    layers: dict[str, list] = state.setdefault("lora_slot_layers", {})  # the slot's LoRA layers, found at load

    def load(i: int, lora: ResolvedLora, hotswap: bool) -> None:
        name = f"slot{i}"
        refreshed = False
        try:
            try:
                pipe.load_lora_weights(lora.path, adapter_name=name, hotswap=hotswap)
            except ValueError as exc:
                if not (hotswap and "text encoder" in str(exc)):
                    raise
                # diffusers hot-swaps the denoiser only: a LoRA with text-encoder layers is loaded afresh
                log.warning("LoRA %r has text-encoder layers, which cannot be hot-swapped: loaded afresh into "
                            "slot %d (a compiled model recompiles)", lora.name, i)
                pipe.delete_adapters(name)
                pipe.load_lora_weights(lora.path, adapter_name=name)
                refreshed = True
        except (ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise BadRequest(f"LoRA {lora.name!r} could not be {'hot-swapped' if hotswap else 'loaded'} into "
                             f"slot {i} (IMAGESMITH_LORA_MAX_RANK={rank}: a LoRA must target the same layers as "
                             f"the slot's first and have rank <= {rank}): {first}") from None
        slots[i] = lora.path
        layers[name] = [m for m in _lora_layers(pipe) if name in m.scaling]
        base[name] = [float(m.scaling[name]) for m in layers[name]]
        if refreshed:
            activate()

    def activate() -> None:
        pipe.set_adapters([f"slot{i}" for i in range(len(slots))])
        for name in base:  # set_adapters wrote plain floats: back to tensors, which compiled graphs read
            for module, value in zip(layers[name], base[name]):
                module.scaling[name] = torch.tensor(value, device=module.weight.device)

    if len(loras) > len(slots):
        if not slots and not state.get("hotswap_enabled"):
            pipe.enable_lora_hotswap(target_rank=rank)
            state["hotswap_enabled"] = True
        for i in range(len(slots), len(loras)):
            log.warning("LoRA slot %d added (a request with %d LoRAs): a compiled model recompiles once", i, len(loras))
            slots.append(None)
            load(i, loras[i], hotswap=False)
        activate()
    for i, lora in enumerate(loras):
        if slots[i] != lora.path:
            load(i, lora, hotswap=True)
    weights = {f"slot{i}": (loras[i].weight if i < len(loras) else 0.0) for i in range(len(slots))}
    for name, w in weights.items():
        for module, value in zip(layers[name], base[name]):
            _set_scale(module, name, value * w)
