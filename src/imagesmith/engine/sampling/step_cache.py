"""Step caching (the engine's `turbo` mode): skip model evaluations whose x0 estimate would barely change.

The idea is TeaCache's and AdaptiveDiffusion's: consecutive denoiser outputs of a diffusion run are highly
redundant in the middle of the schedule, and a cheap indicator can tell when the next evaluation would add
little. TeaCache reads the change of the timestep-modulated input inside the network; this cache works at the
sampler level, on any architecture (UNet, MMDiT, FLUX) and with CFG, so its indicator is the output itself:

- the rate of change of the x0 estimate per unit of log-sigma, measured between the last two evaluations;
- before each call the change predicted for this step (rate x its log-sigma distance from the last evaluation)
  is accumulated; while the sum stays under `threshold` the last x0 estimate is returned again, and once it
  would pass, the model runs and the sum restarts;
- the first `warmup` evaluations and every step at the schedule's low-noise end (below `tail_sigma`) always run,
  as does any call after `max_skip` reuses in a row.

Reusing an x0 estimate is exact for the sampler's arithmetic (the sampler still steps x with it); what is lost
is the model's refinement on the skipped steps. A threshold of 0 never reuses anything."""

from __future__ import annotations

import math

import torch


class StepCache:
    def __init__(self, inner, sigmas: torch.Tensor, *, threshold: float, warmup: int = 3, max_skip: int = 2,
                 tail_fraction: float = 0.15):
        self.inner, self.threshold, self.warmup, self.max_skip = inner, float(threshold), warmup, max_skip
        positive = sigmas[sigmas > 0].float()
        # the low-noise tail (fine detail) always runs: below the sigma of the last `tail_fraction` of the steps
        k = max(1, math.ceil(len(positive) * tail_fraction))
        self.tail_sigma = float(positive[-k]) if len(positive) else 0.0
        self.calls = 0
        self.reused = 0
        self.last_uncond = None
        self._history: list[tuple[float, torch.Tensor, torch.Tensor | None]] = []  # (log sigma, x0, uncond)
        self._accumulated = 0.0
        self._streak = 0

    @property
    def evaluations(self) -> int:
        return self.calls - self.reused

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = float(sigma.flatten()[0])
        if self._can_reuse(x, s):
            predicted = self._rate() * abs(math.log(s) - self._history[-1][0])
            if self._accumulated + predicted < self.threshold:
                self._accumulated += predicted
                self._streak += 1
                self.reused += 1
                _, x0, uncond = self._history[-1]
                self.last_uncond = uncond
                return x0
        out = self.inner(x, sigma)
        self.last_uncond = getattr(self.inner, "last_uncond", None)
        if s > 0:
            self._history = (self._history + [(math.log(s), out, self.last_uncond)])[-2:]
        self._accumulated = 0.0
        self._streak = 0
        return out

    def _can_reuse(self, x: torch.Tensor, s: float) -> bool:
        if self.threshold <= 0 or s <= 0 or s <= self.tail_sigma or self._streak >= self.max_skip:
            return False
        if self.evaluations < max(self.warmup, 2) or len(self._history) < 2:
            return False
        return self._history[-1][1].shape == x.shape

    def _rate(self) -> float:
        """Relative change of the x0 estimate per unit of log-sigma between the last two evaluations."""
        (l0, a, _), (l1, b, _) = self._history
        change = float((b - a).abs().mean() / b.abs().mean().clamp_min(1e-8))
        return change / max(abs(l1 - l0), 1e-6)
