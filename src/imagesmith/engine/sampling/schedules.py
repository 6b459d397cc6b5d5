"""Sigma schedules: `schedule(model_sampling, steps) -> sigmas` (descending, last value 0 unless a schedule
ends above 0 by definition). Every ComfyUI scheduler and every A1111 "schedule type", under either spelling.

Definitions (re-derived from each tool's published behaviour; golden values in tests):
- normal / Uniform: timesteps evenly spaced from the model's largest to its smallest, mapped to sigma.
- sgm_uniform / SGM Uniform: the same over steps + 1 points without the last (Stability's SGM spacing).
- simple / Simple: every (N / steps)-th entry of the model's sigma table, from the top.
- ddim_uniform / DDIM: every (N // steps)-th entry from index 1 upward, reversed (the DDIM paper's spacing).
- karras / Karras: Karras et al. 2022, rho = 7, between the model's sigma_min and sigma_max.
- exponential / Exponential: evenly spaced in log sigma.
- Polyexponential: evenly spaced in (log sigma)^rho (rho = 1 in A1111, which equals exponential).
- beta / Beta: timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al. 2024).
- linear_quadratic: Meta's Movie Gen schedule (linear then quadratic in 1 - sigma), for flow and video models.
- kl_optimal / KL Optimal: evenly spaced in arctan(sigma) (Sabour et al. 2024, "Align Your Steps" appendix).
- Align Your Steps: NVIDIA's published 10-step tables for SD1.5 and SDXL, log-linearly interpolated to any
  step count (as A1111 does).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ...core.errors import BadRequest
from ...core.sampling_names import canonical_schedule
from .model_sampling import ModelSampling

Schedule = Callable[[ModelSampling, int], torch.Tensor]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    w = torch.arange(n, dtype=torch.float32) / (n - 1) if n > 1 else torch.full((1,), float("nan"))
    out = torch.zeros(n + 1)
    out[:-1] = (w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan()
    return out


def _bounds(ms: ModelSampling) -> tuple[float, float]:
    return float(ms.sigma_min), float(ms.sigma_max)


def normal(ms: ModelSampling, steps: int, *, sgm: bool = False) -> torch.Tensor:
    start = ms.timestep(ms.sigma_max)
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
            steps += 1  # the table already ends at 0 (flow models): one more point instead of an appended 0
            append_zero = False
        timesteps = torch.linspace(float(start), float(end), steps)
    sigs = [float(ms.sigma(t)) for t in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.tensor(sigs, dtype=torch.float32)


def sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    return normal(ms, steps, sgm=True)


def simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    stride = max(len(ms.sigmas) // steps, 1)
    sigs = [float(ms.sigmas[i]) for i in range(1, len(ms.sigmas), stride)][::-1]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def karras(ms: ModelSampling, steps: int) -> torch.Tensor:
    lo, hi = _bounds(ms)
    return karras_sigmas(steps, lo, hi)


def exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    lo, hi = _bounds(ms)
    return exponential_sigmas(steps, lo, hi)


def polyexponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    lo, hi = _bounds(ms)
    return polyexponential_sigmas(steps, lo, hi, rho=1.0)


def kl_optimal(ms: ModelSampling, steps: int) -> torch.Tensor:
    lo, hi = _bounds(ms)
    return kl_optimal_sigmas(steps, lo, hi)


def beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    from scipy import stats
    last = len(ms.sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta_) * last)
    sigs, prev = [], -1
    for t in ts:
        if t != prev:
            sigs.append(float(ms.sigmas[int(t)]))
        prev = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def linear_quadratic(ms: ModelSampling, steps: int, threshold: float = 0.025) -> torch.Tensor:
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        lin = steps // 2
        linear_part = [i * threshold / lin for i in range(lin)]
        diff = lin - threshold * steps
        quad = steps - lin
        qa = diff / (lin * quad ** 2)
        qb = threshold / lin - 2 * diff / quad ** 2
        qc = qa * lin ** 2
        quad_part = [qa * i ** 2 + qb * i + qc for i in range(lin, steps)]
        sched = [1.0 - v for v in linear_part + quad_part + [1.0]]
    return torch.tensor(sched, dtype=torch.float32) * float(ms.sigma_max)


# NVIDIA's published Align Your Steps tables (10 steps, sigma space), as A1111 ships them.
AYS_TABLES = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def loglinear_interp(values: list[float], n: int) -> np.ndarray:
    """Resample a descending sigma list to n points, linearly in log sigma (A1111's way for AYS)."""
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values[::-1], dtype=np.float64))
    new = np.interp(np.linspace(0, 1, n), xs, ys)
    return np.exp(new)[::-1].copy()


def align_your_steps(ms: ModelSampling, steps: int, *, family: str = "sd1") -> torch.Tensor:
    """A1111's definition: the 11-entry table log-linearly resampled to `steps` points (the table itself when
    steps is 11), then 0 appended."""
    if ms.is_flow:
        raise BadRequest("Align Your Steps has tables for SD1.5 and SDXL only, not for flow models")
    table = AYS_TABLES["sdxl" if family == "sdxl" else "sd1"]
    sigs = list(table) if steps == len(table) else list(loglinear_interp(table, steps))
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


_FUNCTIONS: dict[str, Callable] = {
    "normal": normal, "simple": simple, "sgm_uniform": sgm_uniform, "karras": karras, "exponential": exponential,
    "polyexponential": polyexponential, "ddim_uniform": ddim_uniform, "beta": beta,
    "linear_quadratic": linear_quadratic, "kl_optimal": kl_optimal, "align_your_steps": align_your_steps,
}


def make_sigmas(schedule: str, ms: ModelSampling, steps: int, *, family: str = "sd1") -> torch.Tensor:
    """The sigmas of a schedule (any spelling but 'Automatic', which needs the sampler: see
    core.sampling_names.resolve_sampling) for `steps` steps."""
    if steps < 1:
        raise BadRequest("steps must be at least 1")
    name = canonical_schedule(schedule)
    if name == "uniform":
        name = "normal"
    if name not in _FUNCTIONS:
        raise BadRequest(f"schedule {schedule!r} depends on the sampler; resolve it first")
    if name == "align_your_steps":
        return align_your_steps(ms, steps, family=family)
    sigmas = _FUNCTIONS[name](ms, steps)
    if name == "simple" and getattr(ms, "shift_terminal", None):  # diffusers' schedule for Qwen-Image
        sigmas = ms.stretch_to_terminal(sigmas)
    return sigmas
