"""bitsandbytes 4-bit (NF4, FP4) weights, dequantised on load without bitsandbytes.

Forge's ``flux1-dev-bnb-nf4`` files and diffusers' bnb exports store each quantised linear weight as packed codes
(``X.weight``: uint8, two 4-bit codes a byte, high nibble first) beside its quantisation state, under the names
bitsandbytes' ``Params4bit`` writes: ``X.weight.absmax`` (per block of ``blocksize`` values; itself 8-bit
quantised when "nested", with ``nested_absmax`` per block of ``nested_blocksize``, ``nested_quant_map`` and an
offset), ``X.weight.quant_map`` (the 16 code values) and ``X.weight.quant_state.bitsandbytes__nf4`` (its JSON:
shape, dtype, block sizes). A weight is ``quant_map[code] * absmax[block]``. The tests compare this with
bitsandbytes' own ``dequantize_4bit`` on weights it quantised: identical.

Dequantised weights take the memory of the compute dtype (bf16 on a GPU): the file's 4-bit saving is on disk and
download, not in memory (a GGUF Q4 keeps its blocks; see :mod:`imagesmith.models.gguf_files`).
"""

from __future__ import annotations

import json
import math

import torch

from ..core.errors import UnsupportedModel

STATE_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def quantised_weights(keys) -> list[str]:
    """The names of the 4-bit weights among ``keys`` (``X.weight`` for each ``X.weight.quant_state.*``)."""
    return [k[: -len(s)] for k in keys for s in STATE_SUFFIXES if k.endswith(s)]


def aux_keys(weight: str) -> list[str]:
    return [f"{weight}.{a}" for a in AUX] + [weight + s for s in STATE_SUFFIXES]


def dequantize(packed: torch.Tensor, aux: dict[str, torch.Tensor], name: str = "") -> torch.Tensor:
    """One weight from its packed codes and state (``aux``: the suffixes after ``X.weight.``), float32."""
    state = next((aux[s.lstrip(".")] for s in STATE_SUFFIXES if s.lstrip(".") in aux), None)
    if state is None:
        raise UnsupportedModel(f"{name}: a 4-bit weight without its quant_state")
    try:
        meta = json.loads(bytes(state.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        shape, block = [int(d) for d in meta["shape"]], int(meta["blocksize"])
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedModel(f"{name}: unreadable bitsandbytes quant_state ({e})") from None
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=1).flatten().long()
    n = math.prod(shape)
    absmax = aux["absmax"]
    if "nested_absmax" in aux:  # the block scales are themselves 8-bit codes into nested_quant_map
        nb = int(meta["nested_blocksize"])
        scale = aux["nested_absmax"].float().repeat_interleave(nb)[: absmax.numel()]
        absmax = aux["nested_quant_map"].float()[absmax.long()] * scale + float(meta.get("nested_offset", 0.0))
    absmax = absmax.float()
    if codes.numel() < n or absmax.numel() * block < n:
        raise UnsupportedModel(f"{name}: its 4-bit data holds fewer values than its shape {shape}")
    values = aux["quant_map"].float()[codes[:n]] * absmax.repeat_interleave(block)[:n]
    return values.reshape(shape)


def dequantize_state(get, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every 4-bit weight of a file, dequantised to ``dtype``: ``get(key)`` reads one tensor."""
    out = {}
    for weight in quantised_weights(keys):
        aux = {k[len(weight) + 1:]: get(k) for k in aux_keys(weight) if k in keys}
        out[weight] = dequantize(get(weight), aux, weight).to(dtype)
    return out
