"""Noise streams for samplers, seeded so every stochastic sampler is bit-reproducible from its seed.

- `gaussian_noise_sampler`: one CPU generator seeded once per run, one draw per step (ancestral samplers).
- `brownian_noise_sampler`: increments of one Brownian motion over sigma, from torchsde's Brownian interval
  seeded with the run's seed (SDE samplers): the same seed gives the same path whatever the step count asks of
  it, and never touches torch's global random state (diffusers' DPMSolverSDEScheduler seeds its tree from the
  global state, which is why its images were not reproducible)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`noise(sigma, sigma_next) -> tensor like x`: a sampler's fresh draws."""


def gaussian_noise_sampler(x: torch.Tensor, seed: int | None, *, offset: int = 0) -> NoiseSampler:
    """ComfyUI's default stream (0.3.64): a generator on the latent's device seeded with `seed`, one standard
    normal draw per call. (On the CPU the first draw therefore repeats the initial noise, as it does in
    ComfyUI 0.3.64; later ComfyUI versions seed the CPU stream with seed + 1, which `offset=1` reproduces.)"""
    if seed is None:
        generator = None
    else:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(_wrap_seed(seed + offset if x.device.type == "cpu" else seed))

    def draw(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)
    return draw


class _Brownian:
    """Brownian motion W(t) on [t_min, t_max], one torchsde tree per seed; W(t1) - W(t0) for any t0, t1."""

    def __init__(self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, seeds: list[int] | int | None):
        import torchsde  # noqa: PLC0415 - only SDE samplers need it
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        self.batched = isinstance(seeds, (list, tuple))
        w0 = torch.zeros_like(x)
        if seeds is None:
            seeds = [int(torch.randint(0, 2 ** 63 - 1, ()).item())]
        elif self.batched:
            if len(seeds) != x.shape[0]:
                raise ValueError("one Brownian seed per batch item")
            w0 = w0[0]
        else:
            seeds = [seeds]
        self.device = x.device  # the increments go where the latents are; the trees live on the CPU
        t0, t1, w0 = t0.detach().cpu(), t1.detach().cpu(), w0.detach().cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=_wrap_seed(s)) for s in seeds]

    def __call__(self, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        t0, t1, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        device, dtype = self.device, t0.dtype
        t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        with warnings.catch_warnings():  # torchsde warns when a float32 query sits an ulp outside its float64 ends
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(t0, t1) for tree in self.trees]).to(device=device, dtype=dtype) * (self.sign * sign)
        return w if self.batched else w[0]


def brownian_noise_sampler(x: torch.Tensor, sigma_min, sigma_max, seed, transform=lambda s: s) -> NoiseSampler:
    """Unit-variance increments of a Brownian motion over `transform(sigma)`, normalised by sqrt(|dt|)."""
    t0 = transform(torch.as_tensor(sigma_min))
    t1 = transform(torch.as_tensor(sigma_max))
    tree = _Brownian(x, t0, t1, seed)

    def draw(sigma, sigma_next):
        a = transform(torch.as_tensor(sigma))
        b = transform(torch.as_tensor(sigma_next))
        return tree(a, b) / (b - a).abs().sqrt()
    return draw


def _wrap_seed(seed: int) -> int:
    """torch generators take seeds in [-2^63, 2^64); keep 64-bit seeds as they are."""
    return int(seed) % (2 ** 64)
