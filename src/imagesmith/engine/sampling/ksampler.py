"""One call that samples a latent: ComfyUI's KSampler / KSamplerAdvanced semantics ("latent in, latent out")
over this package's schedules and samplers, with ComfyUI's or A1111's noise.

    sigmas = plan_sigmas(ms, "dpmpp_2m", "karras", steps=20, denoise=1.0)
    x0 = sample(denoiser, ms, "dpmpp_2m", sigmas, noise=initial_noise(...), latent=zeros, seed=42)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ...core.errors import BadRequest
from ...core.sampling_names import SAMPLERS_BY_NAME, SCHEDULES_BY_NAME
from .base import Denoiser, NoiseSampler, SamplerContext, StepCallback
from .k_multistep import SAMPLERS as _MULTI
from .k_single import SAMPLERS as _SINGLE
from .model_sampling import ModelSampling
from .noise import brownian_noise_sampler
from .schedules import make_sigmas

NoiseMode = Literal["comfy", "a1111-cpu", "a1111-gpu"]
NOISE_MODES = ("comfy", "a1111-cpu", "a1111-gpu")


_FUNCTIONS = {**_SINGLE, **_MULTI}
# ComfyUI's and (with eta 0) A1111's DDIM is Euler on the DDIM timesteps; its CFG++ form likewise
_FUNCTIONS.update(ddim=_FUNCTIONS["euler"], ddim_cfg_pp=_FUNCTIONS["euler_cfg_pp"])


def sampler_function(name: str):
    if name not in _FUNCTIONS:
        raise BadRequest(f"sampler {name!r} is not implemented")
    return _FUNCTIONS[name]


def available_samplers() -> list[str]:
    return [s.name for s in SAMPLERS_BY_NAME.values() if s.name in _FUNCTIONS]


# ------------------------------------------------------------------------------------------------ sigmas
def plan_sigmas(ms: ModelSampling, sampler: str, schedule: str, steps: int, *, denoise: float | None = None,
                family: str = "sd1") -> torch.Tensor:
    """ComfyUI's KSampler sigmas: the schedule for `steps` (one more, then the next-to-last dropped, for the
    samplers that discard it); with denoise d < 1 the last `steps` + 1 of the schedule for int(steps / d)."""
    if steps < 1:
        raise BadRequest("steps must be at least 1")
    if denoise is not None and not 0.0 < denoise <= 1.0:
        raise BadRequest(f"denoise must be in (0, 1], got {denoise}")
    if schedule not in SCHEDULES_BY_NAME or schedule in ("automatic",):
        raise BadRequest(f"resolve schedule {schedule!r} first (core.sampling_names.resolve_sampling)")
    discard = SAMPLERS_BY_NAME[sampler].discard_penultimate

    def full(n: int) -> torch.Tensor:
        sig = make_sigmas(schedule, ms, n + 1 if discard else n, family=family)
        return torch.cat([sig[:-2], sig[-1:]]) if discard else sig

    if denoise is None or denoise > 0.9999:
        return full(steps)
    return full(int(steps / denoise))[-(steps + 1):]


def a1111_img2img_sigmas(ms: ModelSampling, sampler: str, schedule: str, steps: int, strength: float,
                         *, family: str = "sd1") -> torch.Tensor:
    """A1111's img2img: the schedule for `steps`, entered at step steps - t_enc - 1 with
    t_enc = int(min(strength, 0.999) * steps) (so strength 0.5 of 20 steps runs 11)."""
    sig = plan_sigmas(ms, sampler, schedule, steps, family=family)
    n = len(sig) - 1
    t_enc = int(min(strength, 0.999) * n)
    return sig[n - t_enc - 1:]


def clip_steps(sigmas: torch.Tensor, *, start_at_step: int | None = None, end_at_step: int | None = None,
               return_with_leftover_noise: bool = False) -> torch.Tensor:
    """KSamplerAdvanced's range: stop at end_at_step (ending on 0 unless the leftover noise is kept, the SDXL
    base -> refiner hand-off), start at start_at_step."""
    if start_at_step is not None and end_at_step is not None and start_at_step >= end_at_step:
        raise BadRequest(f"start_at_step ({start_at_step}) must be below end_at_step ({end_at_step})")
    if end_at_step is not None and end_at_step < len(sigmas) - 1:
        sigmas = sigmas[:end_at_step + 1].clone()
        if not return_with_leftover_noise:
            sigmas[-1] = 0
    if start_at_step is not None:
        sigmas = sigmas[start_at_step:] if start_at_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


# ------------------------------------------------------------------------------------------------ noise
def initial_noise(mode: NoiseMode, shape: tuple[int, ...], seeds: list[int], *, device=None) -> torch.Tensor:
    """The starting noise of a batch of `shape` (batch first).

    comfy: one draw over the whole batch from `seeds[0]` on the CPU (image i depends on the batch);
    a1111-cpu: image i drawn alone from seeds[i] on the CPU; a1111-gpu: the same on the CUDA device (A1111's
    default 'GPU' RNG source)."""
    if mode == "comfy":
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(_seed64(seeds[0])),
                           dtype=torch.float32)
    if mode == "a1111-cpu":
        return torch.stack([torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(_seed64(s)),
                                        dtype=torch.float32) for s in seeds])
    if mode == "a1111-gpu":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cuda":
            raise BadRequest("noise 'a1111-gpu' draws on a CUDA device (A1111's GPU RNG source); this engine runs "
                             "on the CPU: use 'a1111-cpu' or 'comfy'")
        return torch.stack([torch.randn(shape[1:], generator=torch.Generator(dev).manual_seed(_seed64(s)),
                                        device=dev, dtype=torch.float32) for s in seeds]).cpu()
    raise BadRequest(f"unknown noise {mode!r}; choose one of: {', '.join(NOISE_MODES)}")


def a1111_noise_sampler(x: torch.Tensor, seeds: list[int], eta_noise_seed_delta: int = 0) -> NoiseSampler:
    """A1111's ancestral noise: one generator per image, seeded with its seed + ENSD; without ENSD the first
    draw repeats the initial noise, as it does in A1111."""
    gens = [torch.Generator("cpu").manual_seed(_seed64(s + eta_noise_seed_delta)) for s in seeds]

    def draw(sigma, sigma_next):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in gens]).to(x)
    return draw


def _seed64(seed: int) -> int:
    return int(seed) % (2 ** 64)


# ------------------------------------------------------------------------------------------------ sampling
class _Inpaint:
    """Keeps the unmasked latent on the noisy trajectory of the original (ComfyUI's noise-mask sampling):
    before each evaluation the kept region is the original noised to the current sigma; after it, the
    denoised estimate there is the original itself."""

    def __init__(self, inner: Denoiser, ms: ModelSampling, latent: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor, differential: tuple[float, float] | None = None):
        self.inner, self.ms, self.latent, self.noise, self.mask = inner, ms, latent, noise, mask
        self.differential = differential
        self.last_uncond = None

    def mask_at(self, sigma) -> torch.Tensor:
        """The mask this step. Differential diffusion (ComfyUI's DifferentialDiffusion): a soft mask becomes a
        growing hard one, a pixel joining the repainted part once the step's time (between the schedule's first
        and last) falls to its mask value."""
        if self.differential is None:
            return self.mask
        first, last = (float(self.ms.timestep(torch.tensor(v))) for v in self.differential)
        now = float(self.ms.timestep(torch.as_tensor(sigma).flatten()[0]))
        threshold = (now - last) / (first - last) if first != last else 0.0
        return (self.mask >= threshold).to(self.mask.dtype)

    def __call__(self, x, sigma):
        mask = self.mask_at(sigma)
        keep = 1.0 - mask
        x = x * mask + self.ms.noise_scaling(sigma, self.noise, self.latent) * keep
        out = self.inner(x, sigma)
        uncond = getattr(self.inner, "last_uncond", None)
        self.last_uncond = None if uncond is None else uncond * mask + self.latent * keep
        return out * mask + self.latent * keep


def sample(denoiser: Denoiser, ms: ModelSampling, sampler: str, sigmas: torch.Tensor, *, noise: torch.Tensor,
           latent: torch.Tensor | None = None, seed: int | None = None, noise_mode: NoiseMode = "comfy",
           seeds: list[int] | None = None, eta_noise_seed_delta: int = 0, denoise_mask: torch.Tensor | None = None,
           add_noise: bool = True, callback: StepCallback | None = None, options: dict | None = None,
           sgm_noise_multiplier: bool = False, differential: bool = False) -> torch.Tensor:
    """Run `sampler` over `sigmas` from `latent` (zeros for txt2img) and unit `noise`.

    comfy noise: the start is noise_scaling(sigmas[0]) (epsilon models take sqrt(1 + sigma^2) when starting
    at the model's sigma_max), the sampler's own noise streams are seeded with `seed`.
    a1111 noise: the start is latent + noise * sigmas[0] (sqrt(1 + sigma^2) with A1111's SGM noise multiplier),
    ancestral noise per image from `seeds` (+ ENSD), Brownian trees per image."""
    if latent is None:
        latent = torch.zeros_like(noise)
    if len(sigmas) <= 1:
        return latent
    if not add_noise:
        noise = torch.zeros_like(noise)
    spec = SAMPLERS_BY_NAME[sampler]
    fn = sampler_function(sampler)
    noise_sampler = None
    if noise_mode == "comfy":
        max_sigma = float(ms.sigma_max)
        max_denoise = math.isclose(max_sigma, float(sigmas[0]), rel_tol=1e-5) or float(sigmas[0]) > max_sigma
        x = ms.noise_scaling(sigmas[0], noise, latent, max_denoise)
    else:
        seeds = seeds or [seed or 0] * noise.shape[0]
        s0 = float(sigmas[0])
        scale = math.sqrt(1.0 + s0 * s0) if sgm_noise_multiplier and not ms.is_flow else s0
        x = ms.noise_scaling(scale, noise, latent) if not ms.is_flow else ms.noise_scaling(s0, noise, latent)
        if spec.noise == "ancestral":
            noise_sampler = a1111_noise_sampler(x, seeds, eta_noise_seed_delta)
        elif spec.noise == "brownian":
            positive = sigmas[sigmas > 0]
            noise_sampler = brownian_noise_sampler(x, positive.min(), sigmas.max(), [_seed64(s) for s in seeds])
    span = None
    if differential:  # from the first sigma to the last (at least the model's smallest)
        span = (float(sigmas[0]), max(float(sigmas[-1]), float(ms.sigma_min)))
    model = _Inpaint(denoiser, ms, latent, noise, denoise_mask, span) if denoise_mask is not None else denoiser
    ctx = SamplerContext(model_sampling=ms, seed=seed, callback=callback, noise_sampler=noise_sampler,
                         options=dict(options or {}))
    out = fn(model, x, sigmas, ctx)
    last = sigmas[-1]
    if sampler in ("uni_pc", "uni_pc_bh2") and float(last) == 0.0:
        last = torch.tensor(0.001)  # ComfyUI's UniPC ends on 0.001 (it edits the sigma list), and scales by it
    return ms.inverse_noise_scaling(last, out)

