"""bitsandbytes 4-bit (NF4, FP4) weights, read without bitsandbytes.

Forge's ``flux1-dev-bnb-nf4`` files and diffusers' bnb exports store each quantised linear weight as packed codes
(``X.weight``: uint8, two 4-bit codes a byte, high nibble first) beside its quantisation state, under the names
bitsandbytes' ``Params4bit`` writes: ``X.weight.absmax`` (per block of ``blocksize`` values; itself 8-bit
quantised when "nested", with ``nested_absmax`` per block of ``nested_blocksize``, ``nested_quant_map`` and an
offset), ``X.weight.quant_map`` (the 16 code values) and ``X.weight.quant_state.bitsandbytes__nf4`` (its JSON:
shape, dtype, block sizes). A weight is ``quant_map[code] * absmax[block]``. The tests compare this with
bitsandbytes' own ``dequantize_4bit`` on weights it quantised: identical.

The weights are dequantised to convert the file's names and fused layers to diffusers' (whole blocks move, so each
stays on its 16-level grid), then packed again (:func:`pack_linears`: codes and one float32 scale a block, checked
to give every value back) and dequantised at each call: in memory a 4-bit layer takes about a quarter of bf16's
size, as a GGUF Q4 does (:mod:`imagesmith.models.gguf_files`).
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


class Packed4bitLinear(torch.nn.Module):
    """A Linear whose weight stays 4-bit: two codes a byte and one float32 scale per ``blocksize`` values (about a
    quarter of bf16's memory), dequantised in the input's dtype at each call, as GGUF layers are."""

    def __init__(self, linear: torch.nn.Linear, codes: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                 blocksize: int):
        super().__init__()
        self.in_features, self.out_features, self.blocksize = linear.in_features, linear.out_features, blocksize
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.register_buffer("quant_map", quant_map)
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.in_features * self.out_features
        codes = torch.stack([self.codes >> 4, self.codes & 15], dim=1).flatten()[:n].long()
        values = self.quant_map[codes] * self.absmax.repeat_interleave(self.blocksize)[:n]
        return values.reshape(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a layer's weight (its dtype, its device)
        return self.dequantized(self.absmax.dtype if self.bias is None else self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), bias)


def file_quantisation(get, keys: list[str]) -> tuple[torch.Tensor, int] | None:
    """(quant_map, blocksize) of a file's 4-bit weights (one map and block size for the file, as bitsandbytes
    writes them), or None when it has none."""
    weights = quantised_weights(keys)
    if not weights:
        return None
    state = next(get(weights[0] + s) for s in STATE_SUFFIXES if weights[0] + s in keys)
    meta = json.loads(bytes(state.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    return get(weights[0] + ".quant_map").float(), int(meta["blocksize"])


def pack(weight: torch.Tensor, quant_map: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, absmax) that give ``weight`` back, when it is a 4-bit weight of this map and block size (its values,
    dequantised from such a file and moved as whole blocks, lie on the map times each block's largest magnitude,
    which the map's +-1 reaches), else None. Exact in float32; within the rounding of value and scale where the
    weight was rounded to a 16-bit dtype."""
    flat = weight.detach().flatten().float()
    n = flat.numel()
    if n % blocksize or n % 2:
        return None
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    qmap, order = quant_map.float().sort()
    edges = (qmap[1:] + qmap[:-1]) / 2
    tol = 0.0 if weight.dtype == torch.float32 else 2.0 ** -7  # the value and its block scale each rounded
    codes = torch.empty(n, dtype=torch.uint8)
    for lo in range(0, blocks.shape[0], 1 << 14):  # a few MB at a time
        b, a = blocks[lo:lo + (1 << 14)], absmax[lo:lo + (1 << 14)]
        idx = order[torch.bucketize(b / a.clamp_min(1e-30)[:, None], edges)]
        back = quant_map.float()[idx] * a[:, None]
        if not torch.allclose(back, b, rtol=tol, atol=0.0):
            return None
        codes[lo * blocksize:(lo + b.shape[0]) * blocksize] = idx.flatten().to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def pack_linears(model: torch.nn.Module, quant_map: torch.Tensor, blocksize: int) -> int:
    """Every Linear of ``model`` whose weight is a 4-bit one (checked value by value, see :func:`pack`) replaced by
    a :class:`Packed4bitLinear`; how many were."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            w = child.weight
            if w.numel() < blocksize or not bool((w.detach().flatten()[:blocksize].abs().amax() > 0)):
                continue
            packed = pack(w, quant_map, blocksize)
            if packed is not None:
                setattr(module, child_name, Packed4bitLinear(child, packed[0], packed[1], quant_map.float(),
                                                             blocksize))
                count += 1
    return count


def unpack_linears(model: torch.nn.Module) -> int:
    """Every :class:`Packed4bitLinear` of ``model`` back to a plain Linear of its dequantised weight (LoRA
    adapters attach to plain Linear layers); how many were."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Packed4bitLinear):
                dtype = child.bias.dtype if child.bias is not None else child.absmax.dtype
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                         device=child.codes.device, dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantized(dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
                count += 1
    return count
