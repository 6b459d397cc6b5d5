"""LoRA stacks applied as peft adapters on a shared base model.

The base weights are never merged or mutated: each LoRA file is loaded once per base model as a named
adapter, and each job only switches which adapters are active and at what weight (`set_adapters`), so
re-weighting between jobs costs milliseconds and never reloads the base. A weight of 0 deactivates
the adapter entirely, which gives exactly the base model's pixels."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import BadRequest, UnsupportedModel


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


def apply_loras(pipe, state: dict, loras: list[ResolvedLora], model_arch: str) -> None:
    """Make exactly `loras` active on `pipe` with their weights. `state` is the per-model dict the
    cache keeps beside the pipeline: it remembers which adapters are already loaded."""
    loaded: dict[str, str] = state.setdefault("lora_adapters", {})
    for lora in loras:
        if not compatible(lora.arch, model_arch):
            raise UnsupportedModel(f"LoRA {lora.name!r} is for {lora.arch} models, but the checkpoint is {model_arch}")
        name = adapter_name(lora)
        if name in loaded or lora.weight == 0:
            continue
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
