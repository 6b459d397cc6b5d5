"""Performance modes: what the engine changes on a loaded model to run it faster, per request and per server.

- ``quality`` (default, lossless): the model's own dtype (bf16/fp16 on a GPU) with PyTorch SDPA, Flash-Attention 3
  on Hopper when its kernel package (``flash_attn_interface``) is installed, fused QKV projections, channels-last
  UNet/VAE, regional ``torch.compile`` of the repeated blocks (diffusers' ``compile_repeated_blocks``; optionally
  with CUDA graphs), and warm-up of the server's resolution buckets.
- ``fast`` adds torchao's fp8 dynamic quantization (per-row scales) of the denoiser's linear layers: lossy,
  recorded in the infotext. The fp8 network is a second, half-size copy of the denoiser, so a ``quality`` request
  on the same model still runs the original weights.
- ``turbo`` adds step caching (:mod:`.sampling.step_cache`): a step whose x0 estimate is predicted to change
  less than a threshold reuses the last one. Lossy, recorded with the number of reused steps.

A mode the device cannot run is never a crash mid-request: :func:`plan` turns it into the nearest one that works
and says why (``Plan.notes``, logged and written to the infotext), e.g. fp8 on a GPU older than Ada/Hopper or
without torchao, Flash-Attention 3 off Hopper, ``torch.compile`` on the CPU (slower there than eager)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from ..core.errors import BadRequest
from ..core.settings import PerformanceMode

log = logging.getLogger("imagesmith.performance")

MODES: tuple[str, ...] = get_args(PerformanceMode)
CompileSetting = Literal["auto", "on", "off"]
CompileScope = Literal["auto", "regional", "whole"]
WHOLE_COMPILE_ARCHS: tuple[str, ...] = ()
"""Architectures that `IMAGESMITH_COMPILE_SCOPE=auto` compiles whole rather than block by block (see
benchmarks/results/gpu_modes.json for the measurement behind the choice)."""
FP8_ARCHS = ("flux", "sd3")
"""Where fp8 pays. On SDXL's UNet at 1024x1024 torchao's dynamic fp8 made a step slower, not faster (H200,
2026-12-04: 2.73 s per image against 1.77 s in quality; benchmarks/results/gpu_modes.json): its linear layers are
too small for the fp8 products to beat the cost of quantizing activations on the fly. UNet models run `fast` as
`quality` and `turbo` without fp8, and say so."""
STEP_CACHE_THRESHOLD = 0.12
"""turbo's default: accumulated predicted relative change of the x0 estimate allowed before a step is computed"""

DESCRIPTIONS = {
    "quality": "lossless: bf16/fp16 SDPA (Flash-Attention 3 on Hopper if installed), fused QKV, channels-last, "
               "regional torch.compile on CUDA",
    "fast": "quality + fp8 dynamic quantization of the denoiser's linear layers (torchao; lossy)",
    "turbo": "fast + step caching: steps whose x0 estimate barely changes reuse the last one (lossy)",
}


@dataclass(frozen=True)
class Capabilities:
    """What the device can run, read once per engine."""
    device_type: str
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    torchao: bool = False
    fa3: bool = False
    triton: bool = False

    @property
    def fp8(self) -> bool:
        """fp8 matrix products need compute capability 8.9 (Ada) or 9.0 (Hopper) and torchao's kernels."""
        return self.device_type == "cuda" and self.capability is not None and self.capability >= (8, 9) \
            and self.torchao

    @property
    def hopper(self) -> bool:
        return self.device_type == "cuda" and self.capability is not None and self.capability[0] == 9

    @classmethod
    def detect(cls, device: torch.device | str) -> "Capabilities":
        device = torch.device(device)
        found = lambda mod: importlib.util.find_spec(mod) is not None  # noqa: E731
        if device.type != "cuda" or not torch.cuda.is_available():
            return cls(device.type, name=device.type, torchao=found("torchao"))
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cls("cuda", name=torch.cuda.get_device_name(index),
                   capability=tuple(torch.cuda.get_device_capability(index)), torchao=found("torchao"),
                   fa3=found("flash_attn_interface"), triton=found("triton"))

    def describe(self) -> dict:
        return {"device": self.device_type, "name": self.name,
                "compute_capability": ".".join(map(str, self.capability)) if self.capability else None,
                "fp8": self.fp8, "flash_attention_3": self.fa3 and self.hopper, "torchao": self.torchao,
                "torch_compile": self.device_type == "cuda" and self.triton}


@dataclass(frozen=True)
class Plan:
    """What one request runs with. ``requested`` is the mode asked for, ``mode`` the one that runs."""
    requested: str
    mode: str
    attention: str = "sdpa"
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_whole: bool = False
    """the whole denoiser is one compiled graph (ResNets, up/down-samplers included), not only its repeated blocks"""
    cuda_graphs: bool = False
    fp8: bool = False
    step_cache: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def features(self) -> list[str]:
        out = ["flash-attention-3" if self.attention == "flash3" else "sdpa"]
        out += [name for name, on in (("fused-qkv", self.fuse_qkv), ("channels-last", self.channels_last),
                                      ("compile", self.compile and not self.compile_whole),
                                      ("compile-whole", self.compile and self.compile_whole),
                                      ("cuda-graphs", self.cuda_graphs),
                                      ("fp8", self.fp8)) if on]
        if self.step_cache is not None:
            out.append(f"step-cache {self.step_cache:g}")
        return out

    def infotext(self, *, reused: int | None = None, calls: int = 0) -> str | None:
        """The infotext's `Performance:` value: None for a plain quality run (lossless; nothing to say).
        `reused`/`calls`: the step cache's count of reused model evaluations."""
        lossy = ["fp8"] if self.fp8 else []
        if self.step_cache is not None:
            lossy.append(f"step cache {self.step_cache:g}"
                         + (f": {reused} of {calls} evaluations reused" if reused is not None else ""))
        if self.mode == "quality" and self.requested == "quality":
            return None
        label = self.mode + (f" ({', '.join(lossy)})" if lossy else "")
        if self.requested != self.mode:
            label += f" (asked {self.requested})"
        return label


def plan(requested: str, caps: Capabilities, *, compile_setting: CompileSetting = "auto", cuda_graphs: bool = False,
         compile_scope: CompileScope = "auto", has_loras: bool = False, hotswap: bool = False,
         step_cache: float = STEP_CACHE_THRESHOLD,
         arch: str | None = None) -> Plan:
    """The plan for `requested` on `caps`: every feature the mode names that the device can run; the others
    switched off with a note that says why and what runs instead. QKV fusion is skipped for requests with LoRAs
    and on servers that hot-swap LoRAs (`hotswap`): adapters sit on the unfused projections."""
    if requested not in MODES:
        raise BadRequest(f"performance mode {requested!r} is not one of {', '.join(MODES)}")
    notes: list[str] = []
    gpu = caps.device_type == "cuda"
    if compile_setting == "on":
        compiled = True
        if not gpu:
            notes.append("torch.compile forced on the CPU (IMAGESMITH_COMPILE=on), where it is usually slower than eager")
    elif compile_setting == "off":
        compiled = False
    else:
        compiled = gpu and caps.triton
    attention = "flash3" if caps.fa3 and caps.hopper else "sdpa"
    fp8 = False
    if requested in ("fast", "turbo"):
        if not caps.fp8:
            why = ("torchao is not installed (pip install torchao)" if gpu and caps.capability and caps.capability >= (8, 9)
                   else f"it needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); this is {caps.name}"
                   + (f" ({'.'.join(map(str, caps.capability))})" if caps.capability else ""))
            notes.append(f"fp8 is off: {why}")
        elif arch is not None and arch not in FP8_ARCHS:
            notes.append(f"fp8 is off for {arch} UNets: measured slower than bf16 there (engine.performance.FP8_ARCHS)")
        elif has_loras:
            notes.append("fp8 is off for requests with LoRAs: their adapters sit on the bf16/fp16 weights")
        else:
            fp8 = True
    mode = requested
    if requested == "fast" and not fp8:
        mode = "quality"
        notes.append("running quality, the nearest mode that works here")
    whole = compile_scope == "whole" or (compile_scope == "auto" and arch in WHOLE_COMPILE_ARCHS)
    return Plan(requested=requested, mode=mode, attention=attention, fuse_qkv=gpu and not has_loras and not hotswap,
                channels_last=gpu, compile=compiled, compile_whole=compiled and whole,
                cuda_graphs=compiled and cuda_graphs and gpu, fp8=fp8,
                step_cache=step_cache if requested == "turbo" else None, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------------- applying

def denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    for name in ("unet", "transformer"):
        net = getattr(pipe, name, None)
        if isinstance(net, torch.nn.Module):
            return name, net
    raise ValueError("pipeline has neither a UNet nor a transformer")


def has_lora(net: torch.nn.Module) -> bool:
    return bool(getattr(net, "peft_config", None))


def prepare(pipe, state: dict, p: Plan) -> torch.nn.Module:
    """Apply `p` to the loaded pipeline (once per feature; `state` is the cache's per-model dict) and return the
    denoiser network the request runs: the pipeline's own, or its fp8 copy."""
    applied: dict = state.setdefault("performance", {"compiled": set(), "events": []})
    _, net = denoiser_of(pipe)
    if p.attention == "flash3" and applied.get("attention") != "flash3":
        _timed(applied, "flash-attention-3", lambda: net.set_attention_backend("_flash_3"))
        applied["attention"] = "flash3"
    if p.channels_last and not applied.get("channels_last"):
        def to_channels_last():
            for part in (getattr(pipe, "vae", None), getattr(pipe, "unet", None)):
                if isinstance(part, torch.nn.Module):
                    part.to(memory_format=torch.channels_last)
        _timed(applied, "channels-last", to_channels_last)
        applied["channels_last"] = True
    fused = applied.get("fused", False)
    if p.fuse_qkv and not fused and not has_lora(net) and hasattr(net, "fuse_qkv_projections"):
        _timed(applied, "fuse-qkv", net.fuse_qkv_projections)
        applied["fused"] = True
    if p.fp8:
        fp8_net = applied.get("fp8_net")
        if fp8_net is None:
            fp8_net = _timed(applied, "fp8-quantize", lambda: quantize_fp8(copy.deepcopy(net)))
            applied["fp8_net"] = fp8_net
        net = fp8_net
    if p.compile and id(net) not in applied["compiled"]:
        _timed(applied, "compile-wrap", lambda: compile_regions(net, cuda_graphs=p.cuda_graphs, whole=p.compile_whole))
        applied["compiled"].add(id(net))
    return net


def unfuse_for_lora(pipe, state: dict) -> None:
    """LoRA adapters sit on to_q/to_k/to_v: a fused model is unfused before the first one is loaded (logged;
    a compiled model recompiles once)."""
    applied = state.get("performance") or {}
    if applied.get("fused"):
        _, net = denoiser_of(pipe)
        log.warning("unfusing QKV projections of %s for its first LoRA (a compiled model recompiles once)",
                    type(net).__name__)
        net.unfuse_qkv_projections()
        applied["fused"] = False


def quantize_fp8(net: torch.nn.Module) -> torch.nn.Module:
    """torchao's fp8 dynamic activation + fp8 weight quantization with per-row scales, on the linear layers
    whose shapes the fp8 kernels take (both dimensions multiples of 16, at least 256 wide)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 \
            and module.out_features % 16 == 0 and min(module.in_features, module.out_features) >= 256

    quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)
    return net


def compile_regions(net: torch.nn.Module, *, cuda_graphs: bool = False, whole: bool = False, **extra) -> None:
    """Regional compilation: each repeated block (diffusers' ``_repeated_blocks``: UNet transformer blocks, FLUX's
    double and single blocks) compiled once and reused, which compiles in a fraction of whole-model time; a
    model without declared blocks, or `whole`, is compiled as one graph (longer to compile; the ResNets and
    samplers between the blocks are fused too, and CUDA graphs then cover a whole call)."""
    kwargs = {"fullgraph": True, "dynamic": False, **extra}
    if cuda_graphs:
        kwargs["mode"] = "reduce-overhead"
    if not whole and getattr(net, "_repeated_blocks", None) and hasattr(net, "compile_repeated_blocks"):
        net.compile_repeated_blocks(**kwargs)
    else:
        net.compile(**kwargs)


def _timed(applied: dict, what: str, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    applied["events"].append((what, round(seconds, 3)))
    log.info("performance: %s in %.2f s", what, seconds)
    return out
