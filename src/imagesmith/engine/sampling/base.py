"""The pieces every sampler shares: the denoiser protocol, the per-run context, and the small formulas of
the k-diffusion family (Karras ODE derivative, ancestral step split)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .model_sampling import ModelSampling
from .noise import NoiseSampler, gaussian_noise_sampler

"""(sigma, sigma_next) -> unit-variance noise shaped like the latent."""


class Denoiser(Protocol):
    """`denoiser(x, sigma) -> x0 estimate` with CFG already applied; sigma is a [batch] tensor.

    After each call `last_uncond` holds the unconditional x0 estimate of that call (the CFG++ samplers need it),
    or None when the call made none (CFG 1)."""

    last_uncond: torch.Tensor | None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(step index, x, denoised, sigma) after each model evaluation of a step; may raise to cancel."""


@dataclass
class SamplerContext:
    """What a sampler gets besides the model, the latent and the sigmas."""

    model_sampling: ModelSampling
    seed: int | None = None
    """Seeds the sampler's own noise stream (ancestral steps, SDE Brownian trees)."""
    callback: StepCallback | None = None
    noise_sampler: NoiseSampler | None = None
    """Overrides the sampler's default noise stream (tests, A1111's noise)."""
    options: dict = field(default_factory=dict)
    """Sampler-specific settings (eta, s_noise, order, ...); each sampler documents its keys and defaults."""

    def opt(self, key: str, default):
        value = self.options.get(key)
        return default if value is None else value

    def report(self, i: int, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i, x, denoised, sigma)


SamplerFn = Callable[[Denoiser, torch.Tensor, torch.Tensor, SamplerContext], torch.Tensor]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """`x` with trailing singleton dimensions up to `ndim`; a 0-d tensor stays 0-d (it broadcasts as it is, and
    a 0-d CPU sigma may meet CUDA latents, which a [1, 1, 1, 1] CPU tensor may not)."""
    if x.ndim == 0:
        return x
    return x[(...,) + (None,) * (ndim - x.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative dx/dsigma from a denoiser output."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step from sigma_from to sigma_to into a deterministic step down to sigma_down and fresh noise
    of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 (eta scales the noise)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def at(x: torch.Tensor, sigma) -> torch.Tensor:
    """A sigma as the [batch] tensor the denoiser takes."""
    return sigma * x.new_ones([x.shape[0]])


def uncond_of(model, denoised: torch.Tensor) -> torch.Tensor:
    """The unconditional x0 estimate of the model's last call (the CFG++ samplers step with it); at CFG 1 the
    model makes none, and the guided estimate is the unconditional one."""
    u = getattr(model, "last_uncond", None)
    return denoised if u is None else u


def gaussian_stream(x: torch.Tensor, ctx: SamplerContext) -> NoiseSampler:
    """The fresh draws of ancestral samplers: ctx.noise_sampler when given, else the run's seeded stream."""
    return ctx.noise_sampler if ctx.noise_sampler is not None else gaussian_noise_sampler(x, ctx.seed)


def registry(table: dict):
    """A decorator factory that files sampler functions in `table` under their ComfyUI name."""
    def register(name: str):
        def add(fn):
            table[name] = fn
            return fn
        return add
    return register
