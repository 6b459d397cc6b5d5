"""How a model maps noise levels to its inputs and outputs: the sigma table of a discrete (DDPM-trained) model,
the shifted time of a flow-matching one, the prediction type, and the noise scaling at the start and end of a
run. Everything a schedule or a sampler needs to know about a model, and nothing about its weights.

Sigma means the same thing everywhere in this package: for epsilon / v-prediction models x = x0 + sigma * n
(the Karras et al. 2022 "variance exploding" view of a DDPM), for flow-matching models x = (1 - t) x0 + t n with
sigma = t in [0, 1]. The conventions (timestep <-> sigma by nearest log-sigma, percent_to_sigma, the start-of-run
noise scaling) follow ComfyUI's, because matching its images is a goal; they are re-derived here from those
definitions, not copied."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Prediction = Literal["epsilon", "v_prediction", "flow"]


def _to_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float32)


def time_shift(shift: float, t):
    """SD3's resolution shift of flow time: t' = shift t / (1 + (shift - 1) t)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flux_time_shift(mu: float, t):
    """FLUX's exponential shift: t' = e^mu / (e^mu + (1/t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


@dataclass
class ModelSampling:
    """Base: a table of the model's discrete sigmas (ascending), and the prediction type."""

    prediction: Prediction = "epsilon"
    sigmas: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sigma_data: float = 1.0

    # --------------------------------------------------------------- table
    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    log_table: torch.Tensor | None = None
    """log sigma of the table, taken in float64 before rounding (as ComfyUI keeps it); None: log of `sigmas`"""

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.log_table if self.log_table is not None else self.sigmas.log()

    def timestep(self, sigma) -> torch.Tensor:
        """The model's timestep (0..999 for SD) for a sigma: the nearest table entry in log sigma."""
        sigma = _to_tensor(sigma)
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep) -> torch.Tensor:
        """The sigma of a (fractional) timestep: linear interpolation of log sigma between table entries."""
        t = torch.clamp(_to_tensor(timestep).float(), min=0, max=len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at a fraction of the way through denoising (0 = pure noise, 1 = clean)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    # --------------------------------------------------------------- model I/O
    def model_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the network sees for x at sigma (epsilon/v models take x / sqrt(sigma^2 + 1))."""
        sigma = _append_dims(sigma, x.ndim)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's prediction of x0, from its raw output."""
        sigma = _append_dims(sigma, x.ndim)
        if self.prediction == "v_prediction":
            sd2 = self.sigma_data ** 2
            return x * sd2 / (sigma ** 2 + sd2) - model_output * sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5
        return x - model_output * sigma

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
        """The starting point of a run at `sigma` from a clean latent and unit noise."""
        sigma = _append_dims(_to_tensor(sigma).to(noise.device, noise.dtype), noise.ndim)
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma ** 2)
        else:
            noise = noise * sigma
        return noise + latent

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda = log(alpha / sigma), the variable of DPM-Solver-style exponential integrators."""
        return sigma.log().neg()

    def sigma_from_half_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.neg().exp()

    def timestep_for_network(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep value the network is conditioned on (float, 0..999 for SD)."""
        return self.timestep(sigma).float()


class DiscreteModelSampling(ModelSampling):
    """An epsilon or v-prediction model trained on a discrete DDPM schedule (SD1.x, SD2, SDXL)."""

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction: Prediction = "epsilon") -> "DiscreteModelSampling":
        alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(prediction=prediction, sigmas=sigmas.float(), sigma_data=1.0, log_table=sigmas.log().float())

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000,
                      prediction: Prediction = "epsilon") -> "DiscreteModelSampling":
        """Stable Diffusion's 'scaled_linear' betas (CompVis calls them 'linear'): linear in sqrt(beta)."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(betas, prediction)


@dataclass
class FlowModelSampling(ModelSampling):
    """A rectified-flow model (SD3, FLUX): sigma = t in [0, 1], x = (1 - t) x0 + t n, the network predicts n - x0.

    SD3 shifts time by a constant (`shift`, 3.0); FLUX by e^mu, mu depending on the image size (`mu`).
    `shift_terminal` (Qwen-Image's 0.02): the simple schedule is stretched so its last sigma before 0 is this,
    as diffusers' FlowMatchEulerDiscreteScheduler does (:meth:`stretch_to_terminal`)."""

    prediction: Prediction = "flow"
    shift: float = 1.0
    mu: float | None = None
    multiplier: float = 1000.0
    timesteps: int = 1000
    shift_terminal: float | None = None

    def stretch_to_terminal(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``sigmas`` (a schedule ending in 0) with its nonzero part stretched so that the last one is
        ``shift_terminal``: ``1 - (1 - s) * (1 - shift_terminal) / (1 - s_last)``."""
        if not self.shift_terminal:
            return sigmas
        body, tail = sigmas[:-1], sigmas[-1:]
        if body.numel() == 0 or float(tail[0]) != 0.0:
            return sigmas
        one_minus = 1.0 - body.double()
        scale = one_minus[-1] / (1.0 - self.shift_terminal)
        return torch.cat([(1.0 - one_minus / scale).to(sigmas.dtype), tail])

    def __post_init__(self):
        ts = torch.arange(1, self.timesteps + 1, 1, dtype=torch.float32) / self.timesteps
        self.sigmas = self._shifted(ts).float()

    def _shifted(self, t):
        if self.mu is not None:
            t = _to_tensor(t)
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1))
        return time_shift(self.shift, t)

    def timestep(self, sigma) -> torch.Tensor:
        return _to_tensor(sigma) * self.multiplier

    def sigma(self, timestep) -> torch.Tensor:
        return self._shifted(_to_tensor(timestep) / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent  # in Python floats, as ComfyUI: float32 here moves sigmas that sit on a boundary
        if self.mu is not None:
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1))
        return time_shift(self.shift, t)

    def model_input(self, sigma, x):
        return x

    def denoised(self, sigma, model_output, x):
        return x - model_output * _append_dims(sigma, x.ndim)

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        sigma = _append_dims(_to_tensor(sigma).to(noise.device, noise.dtype), noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - float(sigma))

    def half_log_snr(self, sigma):
        return sigma.logit().neg()

    def sigma_from_half_log_snr(self, lam):
        return lam.neg().sigmoid()

    def timestep_for_network(self, sigma):
        return self.timestep(sigma).float()


def _append_dims(x, ndim: int) -> torch.Tensor:
    x = _to_tensor(x)
    if x.ndim == 0:  # broadcasts as it is, on any device (see base.append_dims)
        return x
    return x[(...,) + (None,) * (ndim - x.ndim)]


def from_scheduler_config(config: dict, *, arch: str | None = None) -> ModelSampling:
    """A ModelSampling from a diffusers scheduler config (what every diffusers model folder and every
    single-file load carries), so the model's own betas, prediction type and flow shift are used."""
    cls_name = str(config.get("_class_name", ""))
    if "FlowMatch" in cls_name or config.get("prediction_type") == "flow_prediction" or arch in ("sd3", "flux"):
        if config.get("use_dynamic_shifting"):
            return FlowModelSampling(mu=float(config.get("base_shift", 0.5)), timesteps=int(config.get("num_train_timesteps", 1000)))
        return FlowModelSampling(shift=float(config.get("shift", 1.0)), timesteps=int(config.get("num_train_timesteps", 1000)))
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        from ...core.errors import UnsupportedModel
        raise UnsupportedModel(f"prediction type {prediction!r} is not supported by the sampling layer")
    if config.get("trained_betas") is not None:
        return DiscreteModelSampling.from_betas(torch.tensor(config["trained_betas"], dtype=torch.float64), prediction)
    if schedule == "scaled_linear":
        return DiscreteModelSampling.scaled_linear(start, end, n, prediction)
    if schedule == "linear":
        return DiscreteModelSampling.from_betas(torch.linspace(start, end, n, dtype=torch.float64), prediction)
    if schedule == "squaredcos_cap_v2":
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
        return DiscreteModelSampling.from_betas(betas, prediction)
    from ...core.errors import UnsupportedModel
    raise UnsupportedModel(f"beta schedule {schedule!r} is not supported by the sampling layer")
