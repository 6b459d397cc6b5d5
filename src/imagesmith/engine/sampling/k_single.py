"""Single-step and SDE samplers of the k-diffusion family (Euler, Heun, DPM-Solver(++), ancestral, SDE, LCM...).

Every sampler has the signature `fn(model, x, sigmas, ctx) -> x_final` (see `base.SamplerContext`) and is
registered in `SAMPLERS` under ComfyUI's name. The numerics follow ComfyUI 0.3.64's k-diffusion sampling module
(its images are the reference), re-derived from the methods:

- sigma is the noise level of `x = alpha * x0 + sigma * n`, with alpha = 1 for epsilon / v models (the
  "variance exploding" view) and alpha = 1 - sigma for rectified-flow models;
- lambda = log(alpha / sigma) is the half log-SNR in which the exponential integrators (DPM-Solver(++),
  SEEDS, ER-SDE) step; `ModelSampling.half_log_snr` gives it for either kind of model;
- on flow models the ancestral samplers use the rectified-flow split of a step into a deterministic move and
  fresh noise (the "_RF" variants), and the half-log-SNR samplers move a first sigma of 1 (infinite lambda)
  slightly below 1, as ComfyUI does.

Options each sampler reads from `ctx.options` are listed in its docstring, with ComfyUI's defaults."""

from __future__ import annotations

import math

import torch

from .base import SamplerContext, ancestral_step, at, gaussian_stream, registry, to_d, uncond_of
from .noise import brownian_noise_sampler
from .schedules import karras_sigmas

SAMPLERS: dict = {}
_register = registry(SAMPLERS)


# ================================================================================================ helpers
def _brownian(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplerContext):
    """Brownian increments over [smallest positive sigma, largest sigma] for SDE samplers."""
    if ctx.noise_sampler is not None:
        return ctx.noise_sampler
    return brownian_noise_sampler(x, sigmas[sigmas > 0].min(), sigmas.max(), ctx.seed)


def _snr_safe(sigmas: torch.Tensor, ms, percent: float = 1e-4) -> torch.Tensor:
    """A flow model's sigma of 1 has infinite half log-SNR: start a hair below it (at percent 1e-4)."""
    if len(sigmas) > 1 and ms.is_flow and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = ms.percent_to_sigma(percent)
    return sigmas


def _alpha(ms, sigma):
    """The signal scale at sigma: 1 for epsilon / v models, 1 - sigma for rectified flow."""
    return 1 - sigma if ms.is_flow else 1.0


def _rf_ancestral_split(sigma, sigma_next, eta: float):
    """Rectified-flow ancestral step: interpolate x toward x0 down to sigma_down, then rescale by
    alpha_next / alpha_down and add `renoise` of fresh noise, so the marginal at sigma_next is right.
    Returns (sigma_down, alpha_next / alpha_down, renoise)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def _dpmpp_first_order(x, denoised, lam_s, lam_t, alpha_s, alpha_t):
    """DPM-Solver++(1) in data prediction from half log-SNR lam_s to lam_t: the exact solution of the
    probability-flow ODE when the x0 estimate stays constant over the step (DDIM in lambda)."""
    h = lam_t - lam_s
    return (alpha_t / alpha_s) * (-h).exp() * x - alpha_t * (-h).expm1() * denoised


def _ancestral_target(lam_s, lam_t, eta: float):
    """An ancestral split done in the variance-exploding view (sigma~ = e^-lambda): the half log-SNR to step
    down to deterministically and the noise (in sigma~ units) to add back."""
    sigma_down, sigma_up = ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
    return sigma_down.log().neg(), sigma_up


class _Churn:
    """Karras et al.'s "churn" (Algorithm 2): optionally raise sigma by a factor 1 + gamma before a step by
    adding noise. Options s_churn (0 = off), s_tmin, s_tmax, s_noise. The noise comes from the run's
    seeded stream (ComfyUI draws it from torch's global generator)."""

    def __init__(self, x, sigmas, ctx: SamplerContext):
        self.s_churn = float(ctx.opt("s_churn", 0.0))
        self.s_tmin = float(ctx.opt("s_tmin", 0.0))
        self.s_tmax = float(ctx.opt("s_tmax", float("inf")))
        self.s_noise = float(ctx.opt("s_noise", 1.0))
        self.n = len(sigmas) - 1
        self.x, self.ctx, self.noise = x, ctx, None

    def __call__(self, x, sigma):
        if self.s_churn <= 0 or not self.s_tmin <= sigma <= self.s_tmax:
            return x, sigma
        gamma = min(self.s_churn / self.n, 2 ** 0.5 - 1)
        if gamma <= 0:
            return x, sigma
        sigma_hat = sigma * (gamma + 1)
        if self.noise is None:
            self.noise = gaussian_stream(self.x, self.ctx)
        x = x + self.noise(sigma, sigma_hat) * self.s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        return x, sigma_hat


# ================================================================================================ Euler / Heun
@_register("euler")
def sample_euler(model, x, sigmas, ctx: SamplerContext):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022,
    Algorithm 2 with Euler steps). Options: s_churn, s_tmin, s_tmax, s_noise (churn; off by default)."""
    churn = _Churn(x, sigmas, ctx)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i])
        denoised = model(x, at(x, sigma_hat))
        ctx.report(i, x, denoised, sigmas[i])
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@_register("euler_ancestral")
def sample_euler_ancestral(model, x, sigmas, ctx: SamplerContext):
    """Ancestral Euler ("Euler a", k-diffusion): an Euler step down to sigma_down, then fresh noise back up
    to the next sigma. Rectified-flow models use the flow form of the split. Options: eta (1), s_noise (1)."""
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    flow = ctx.model_sampling.is_flow
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if flow:
            if sigma_next == 0:
                x = denoised
                continue
            sigma_down, rescale, renoise = _rf_ancestral_split(sigma, sigma_next, eta)
            keep = sigma_down / sigma
            x = keep * x + (1 - keep) * denoised
            if eta > 0:
                x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
        else:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            if sigma_down == 0:
                x = denoised
                continue
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def _heun_correct(model, x, d, sigma_hat, sigma_next):
    """One Heun (trapezoidal) step from sigma_hat to sigma_next given the slope d at the start."""
    dt = sigma_next - sigma_hat
    x_euler = x + d * dt
    d_next = to_d(x_euler, sigma_next, model(x_euler, at(x, sigma_next)))
    return x + (d + d_next) / 2 * dt


def _two_stage(model, x, sigmas, ctx: SamplerContext, second):
    """The loop Heun and DPM2 share: (churn,) one evaluation, then `second(model, x, d, sigma, sigma_next)`
    for the step, except Euler on the step to sigma 0."""
    churn = _Churn(x, sigmas, ctx)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i])
        denoised = model(x, at(x, sigma_hat))
        ctx.report(i, x, denoised, sigmas[i])
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = second(model, x, d, sigma_hat, sigmas[i + 1])
    return x


@_register("heun")
def sample_heun(model, x, sigmas, ctx: SamplerContext):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the last step to sigma 0 is Euler.
    Options: s_churn, s_tmin, s_tmax, s_noise."""
    return _two_stage(model, x, sigmas, ctx, _heun_correct)


@_register("heunpp2")
def sample_heunpp2(model, x, sigmas, ctx: SamplerContext):
    """Heun++ (sd-webui-samplers-scheduler's HeunPP2): a weighted three-slope Heun whose weights sigma_k /
    (3 sigma_0) lean on the later slopes as the run progresses; two-slope near the end, Euler on the last
    step. Options: s_churn, s_tmin, s_tmax, s_noise."""
    churn = _Churn(x, sigmas, ctx)
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i])
        denoised = model(x, at(x, sigma_hat))
        ctx.report(i, x, denoised, sigmas[i])
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, at(x, sigmas[i + 1])))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            slope = d * (1 - w2) + d_2 * w2
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, at(x, sigmas[i + 2])))
            w2 = sigmas[i + 1] / (3 * sigmas[0])
            w3 = sigmas[i + 2] / (3 * sigmas[0])
            slope = (1 - w2 - w3) * d + w2 * d_2 + w3 * d_3
        x = x + slope * dt
    return x


# ================================================================================================ DPM-Solver-2
def _dpm2_step(model, x, d, sigma, sigma_to):
    """DPM-Solver-2 in sigma (k-diffusion's DPM2): a half step to the geometric midpoint, then the full step
    with the midpoint's slope."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, model(x_mid, at(x, sigma_mid)))
    return x + d_mid * (sigma_to - sigma)


@_register("dpm_2")
def sample_dpm_2(model, x, sigmas, ctx: SamplerContext):
    """DPM2 (k-diffusion): DPM-Solver-2 (Lu et al. 2022) steps in the Karras ODE, Euler on the last step.
    ComfyUI runs it on a schedule without its next-to-last sigma. Options: s_churn, s_tmin, s_tmax, s_noise."""
    return _two_stage(model, x, sigmas, ctx, _dpm2_step)


@_register("dpm_2_ancestral")
def sample_dpm_2_ancestral(model, x, sigmas, ctx: SamplerContext):
    """Ancestral DPM2 ("DPM2 a"): a DPM-Solver-2 step down to sigma_down plus fresh noise (the flow form of
    the split on rectified-flow models). Options: eta (1), s_noise (1)."""
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    flow = ctx.model_sampling.is_flow
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        if flow:
            sigma_down, rescale, renoise = _rf_ancestral_split(sigma, sigma_next, eta)
        else:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        ctx.report(i, x, denoised, sigma)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
            continue
        x = _dpm2_step(model, x, d, sigma, sigma_down)
        if flow:
            x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
        else:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


# ================================================================================================ DPM-Solver++
@_register("dpmpp_2s_ancestral")
def sample_dpmpp_2s_ancestral(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(2S) (Lu et al. 2022, single-step second order in data prediction) with ancestral noise
    ("DPM++ 2S a"); the flow form of the ancestral split on rectified-flow models. Options: eta (1),
    s_noise (1)."""
    if ctx.model_sampling.is_flow:
        return _dpmpp_2s_ancestral_rf(model, x, sigmas, ctx, cfg_pp=False)
    return _dpmpp_2s_ancestral_ve(model, x, sigmas, ctx, cfg_pp=False)


def _dpmpp_2s_ancestral_ve(model, x, sigmas, ctx, cfg_pp: bool):
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        # CFG++ steps with the unconditional estimate and adds the guidance back at the end
        target = uncond_of(model, denoised) if cfg_pp else denoised
        guidance = denoised - target
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        ctx.report(i, x, denoised, sigma)
        if sigma_down == 0:
            x = x + to_d(x, sigma, target) * (sigma_down - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + h / 2
            x_mid = (s.neg().exp() / t.neg().exp()) * x - (-h / 2).expm1() * target
            mid = model(x_mid, at(x, s.neg().exp()))
            mid = uncond_of(model, mid) if cfg_pp else mid
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * mid
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        if cfg_pp:
            x = x + guidance
    return x


def _dpmpp_2s_ancestral_rf(model, x, sigmas, ctx, cfg_pp: bool):
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    lam = lambda s: ((1 - s) / s).log()  # noqa: E731 - the flow half log-SNR, as ComfyUI computes it here
    sig = lambda l: (l.exp() + 1) ** -1  # noqa: E731
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        target = uncond_of(model, denoised) if cfg_pp else denoised
        guidance = denoised - target
        sigma_down, rescale, renoise = _rf_ancestral_split(sigma, sigma_next, eta)
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, target) * (sigma_down - sigma)
        else:
            if sigma == 1.0:
                sigma_mid = 0.9999
            else:
                lam_i, lam_down = lam(sigma), lam(sigma_down)
                sigma_mid = sig(lam_i + (lam_down - lam_i) / 2)
            keep = sigma_mid / sigma
            u = keep * x + (1 - keep) * target
            mid = model(u, at(x, sigma_mid))
            mid = uncond_of(model, mid) if cfg_pp else mid
            keep = sigma_down / sigma
            x = keep * x + (1 - keep) * mid
        if sigma_next > 0 and eta > 0:
            x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
        if cfg_pp:
            x = x + (1 - sigma_next) * guidance
    return x


@_register("dpmpp_sde")
def sample_dpmpp_sde(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++ (stochastic) ("DPM++ SDE", k-diffusion): a two-stage DPM-Solver++ step in half log-SNR
    with an intermediate point at fraction r, each stage split ancestrally with Brownian-tree noise.
    Options: eta (1), s_noise (1), r (1/2)."""
    if len(sigmas) <= 1:
        return x
    eta, s_noise, r = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0), ctx.opt("r", 0.5)
    ms = ctx.model_sampling
    noise = _brownian(x, sigmas, ctx)
    sigmas = _snr_safe(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        lam_s, lam_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
        h = lam_t - lam_s
        lam_mid = lam_s + r * h
        sigma_mid = ms.sigma_from_half_log_snr(lam_mid)
        alpha_s, alpha_mid, alpha_t = sigma * lam_s.exp(), sigma_mid * lam_mid.exp(), sigma_next * lam_t.exp()

        lam_to, up = _ancestral_target(lam_s, lam_mid, eta)
        x_mid = _dpmpp_first_order(x, denoised, lam_s, lam_to, alpha_s, alpha_mid)
        if eta > 0 and s_noise > 0:
            x_mid = x_mid + alpha_mid * noise(sigma, sigma_mid) * s_noise * up
        denoised_mid = model(x_mid, at(x, sigma_mid))

        lam_to, up = _ancestral_target(lam_s, lam_t, eta)
        mixed = (1 - fac) * denoised + fac * denoised_mid
        x = _dpmpp_first_order(x, mixed, lam_s, lam_to, alpha_s, alpha_t)
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigma, sigma_next) * s_noise * up
    return x


@_register("dpmpp_2m")
def sample_dpmpp_2m(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in data prediction, in lambda = -log sigma
    (the k-diffusion form, used for every model type); first order on the first and last steps."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            estimate = denoised
        else:
            r = (t - sigmas[i - 1].log().neg()) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * estimate
        old_denoised = denoised
    return x


def _dpmpp_multistep_sde(model, x, sigmas, ctx: SamplerContext, order: int, solver_type: str):
    """DPM-Solver++(2M/3M) SDE: the exact linear part of the data-prediction SDE over a step of half log-SNR
    h (eta = 0 is the ODE), polynomial corrections from the previous x0 estimates, Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    ms = ctx.model_sampling
    noise = _brownian(x, sigmas, ctx)
    sigmas = _snr_safe(sigmas, ms)
    d_1 = d_2 = None  # the previous two x0 estimates
    h = h_1 = h_2 = None  # the current and previous two step sizes in lambda
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lam_t.exp()
            one_minus = (-h_eta).expm1().neg()  # 1 - e^(-h (1 + eta))
            x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * one_minus * denoised
            if order == 3 and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                slope_0 = (denoised - d_1) / r0
                slope_1 = (d_1 - d_2) / r1
                first = slope_0 + (slope_0 - slope_1) * r0 / (r0 + r1)
                second = (slope_0 - slope_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * first - (alpha_t * phi_3) * second
            elif h_1 is not None:
                r = h_1 / h
                if order == 2 and solver_type == "midpoint":
                    x = x + 0.5 * alpha_t * one_minus * (1 / r) * (denoised - d_1)
                elif order == 2:  # heun: the exponential-integrator weight phi_2(h_eta) h_eta
                    x = x + alpha_t * (one_minus / (-h_eta) + 1) * (1 / r) * (denoised - d_1)
                else:
                    phi_2 = h_eta.neg().expm1() / h_eta + 1
                    x = x + (alpha_t * phi_2) * ((denoised - d_1) / r)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


@_register("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(2M) SDE (k-diffusion, after Lu et al. 2022), midpoint correction by default.
    Options: eta (1), s_noise (1), solver_type ('midpoint' | 'heun')."""
    return _dpmpp_multistep_sde(model, x, sigmas, ctx, 2, ctx.opt("solver_type", "midpoint"))


@_register("dpmpp_2m_sde_heun")
def sample_dpmpp_2m_sde_heun(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(2M) SDE with the Heun (exponential-integrator) form of the second-order correction.
    Options: eta (1), s_noise (1), solver_type ('heun')."""
    return _dpmpp_multistep_sde(model, x, sigmas, ctx, 2, ctx.opt("solver_type", "heun"))


@_register("dpmpp_3m_sde")
def sample_dpmpp_3m_sde(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(3M) SDE (k-diffusion): third-order multistep over the last three x0 estimates.
    Options: eta (1), s_noise (1)."""
    return _dpmpp_multistep_sde(model, x, sigmas, ctx, 3, "heun")


# ================================================================================================ DDPM, LCM
@_register("ddpm")
def sample_ddpm(model, x, sigmas, ctx: SamplerContext):
    """DDPM ancestral sampling (Ho et al. 2020): the posterior mean of x_{t-1} given x_t and the predicted
    noise plus the posterior noise, in the variance-preserving scale x / sqrt(1 + sigma^2)."""
    noise = gaussian_stream(x, ctx)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma ** 2.0)
        abar = 1 / (sigma * sigma + 1)
        abar_next = 1 / (sigma_next * sigma_next + 1)
        alpha = abar / abar_next
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - abar).sqrt())
        if sigma_next > 0:
            x = x + ((1 - alpha) * (1.0 - abar_next) / (1.0 - abar)).sqrt() * noise(sigma, sigma_next)
        if sigma_next != 0:
            x = x * torch.sqrt(1.0 + sigma_next ** 2.0)
    return x


@_register("lcm")
def sample_lcm(model, x, sigmas, ctx: SamplerContext):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the x0 estimate, then noise it afresh to
    the next sigma with the model's own forward noising. Options: s_noise (1), s_noise_end (= s_noise; the
    multiplier is interpolated linearly over the steps), noise_clip_std (0 = off; clamps the fresh noise
    to that many standard deviations)."""
    noise = gaussian_stream(x, ctx)
    ms = ctx.model_sampling
    n = max(1, len(sigmas) - 1)
    s_start = float(ctx.opt("s_noise", 1.0))
    s_end = float(ctx.opt("s_noise_end", s_start))
    clip = float(ctx.opt("noise_clip_std", 0.0))
    for i in range(len(sigmas) - 1):
        denoised = model(x, at(x, sigmas[i]))
        ctx.report(i, x, denoised, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            fresh = noise(sigmas[i], sigmas[i + 1])
            if clip > 0:
                bound = clip * fresh.std()
                fresh = fresh.clamp(min=-bound, max=bound)
            scale = s_start + (s_end - s_start) * (i / (n - 1) if n > 1 else 0.0)
            if scale != 1.0:
                fresh = fresh * scale
            x = ms.noise_scaling(sigmas[i + 1], fresh, x)
    return x


# ================================================================================================ ER-SDE, SEEDS
@_register("er_sde")
def sample_er_sde(model, x, sigmas, ctx: SamplerContext):
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs"), VP
    form in er_lambda = sigma / alpha with the noise scaler l * (e^(l^0.3) + 10); up to third order from the
    previous x0 estimates, the integrals by a 200-point Riemann sum. Options: s_noise (1), max_stage (3)."""
    s_noise, max_stage = ctx.opt("s_noise", 1.0), int(ctx.opt("max_stage", 3))
    noise = gaussian_stream(x, ctx)
    ms = ctx.model_sampling

    def scaler(v):
        return v * ((v ** 0.3).exp() + 10.0)

    n_points = 200.0
    points = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    sigmas = _snr_safe(sigmas, ms)
    er = ms.half_log_snr(sigmas).neg().exp()  # sigma / alpha
    old_denoised = old_slope = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, at(x, sigmas[i]))
        ctx.report(i, x, denoised, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_s, er_t = er[i], er[i + 1]
            alpha_s, alpha_t = sigmas[i] / er_s, sigmas[i + 1] / er_t
            ratio = scaler(er_t) / scaler(er_s)
            x = alpha_t / alpha_s * ratio * x + alpha_t * (1 - ratio) * denoised
            if stage >= 2:
                dt = er_t - er_s
                step = -dt / n_points
                grid = er_t + points * step
                scaled = scaler(grid)
                s1 = torch.sum(1 / scaled) * step
                slope = (denoised - old_denoised) / (er_s - er[i - 1])
                x = x + alpha_t * (dt + s1 * scaler(er_t)) * slope
                if stage >= 3:
                    s2 = torch.sum((grid - er_s) / scaled) * step
                    curvature = (slope - old_slope) / ((er_s - er[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s2 * scaler(er_t)) * curvature
                old_slope = slope
            if s_noise > 0:
                spread = (er_t ** 2 - er_s ** 2 * ratio ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x


def _h_phi_1(h):
    return torch.expm1(h)


def _h_phi_2(h):
    return (torch.expm1(h) - h) / h


class _SeedsNoise:
    """The correlated noise of a SEEDS step: each stage's noise is the previous stage's decayed by
    e^((r_prev - r) h eta) plus an independent increment, so the stages follow one Brownian path."""

    def __init__(self, draw, s_noise: float):
        self.draw, self.s_noise, self.acc = draw, s_noise, None

    def advance(self, seg, sigma_a, sigma_b):
        fresh = seg.mul(2).expm1().neg().sqrt() * self.draw(sigma_a, sigma_b)
        self.acc = fresh if self.acc is None else self.acc * seg.exp() + fresh
        return self.acc * self.s_noise


@_register("seeds_2")
def sample_seeds_2(model, x, sigmas, ctx: SamplerContext):
    """SEEDS-2 (Gonzalez et al. 2023, stochastic explicit exponential derivative-free solver, data
    prediction, two stages). Options: eta (1), s_noise (1), r (1/2), solver_type ('phi_1' | 'phi_2')."""
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    r, solver_type = ctx.opt("r", 0.5), ctx.opt("solver_type", "phi_1")
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    draw = gaussian_stream(x, ctx)
    ms = ctx.model_sampling
    inject = eta > 0 and s_noise > 0
    sigmas = _snr_safe(sigmas, ms)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        lam_s, lam_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = torch.lerp(lam_s, lam_t, r)
        sigma_1 = ms.sigma_from_half_log_snr(lam_1)
        alpha_1, alpha_t = sigma_1 * lam_1.exp(), sigma_next * lam_t.exp()
        path = _SeedsNoise(draw, s_noise)

        x_1 = sigma_1 / sigma * (-r * h * eta).exp() * x - alpha_1 * _h_phi_1(-r * h_eta) * denoised
        if inject:
            x_1 = x_1 + path.advance(-r * h * eta, sigma, sigma_1) * sigma_1
        denoised_1 = model(x_1, at(x, sigma_1))

        if solver_type == "phi_1":
            combined = torch.lerp(denoised, denoised_1, 1 / (2 * r))
            x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * _h_phi_1(-h_eta) * combined
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_1)
        if inject:
            x = x + path.advance((r - 1) * h * eta, sigma_1, sigma_next) * sigma_next
    return x


@_register("seeds_3")
def sample_seeds_3(model, x, sigmas, ctx: SamplerContext):
    """SEEDS-3 (Gonzalez et al. 2023, three stages at fractions r_1, r_2 of the step in half log-SNR).
    Options: eta (1), s_noise (1), r_1 (1/3), r_2 (2/3)."""
    eta, s_noise = ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0)
    r_1, r_2 = ctx.opt("r_1", 1.0 / 3), ctx.opt("r_2", 2.0 / 3)
    draw = gaussian_stream(x, ctx)
    ms = ctx.model_sampling
    inject = eta > 0 and s_noise > 0
    sigmas = _snr_safe(sigmas, ms)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        lam_s, lam_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_1, sigma_2 = ms.sigma_from_half_log_snr(lam_1), ms.sigma_from_half_log_snr(lam_2)
        alpha_1, alpha_2 = sigma_1 * lam_1.exp(), sigma_2 * lam_2.exp()
        alpha_t = sigma_next * lam_t.exp()
        path = _SeedsNoise(draw, s_noise)

        x_1 = sigma_1 / sigma * (-r_1 * h * eta).exp() * x - alpha_1 * _h_phi_1(-r_1 * h_eta) * denoised
        if inject:
            x_1 = x_1 + path.advance(-r_1 * h * eta, sigma, sigma_1) * sigma_1
        denoised_1 = model(x_1, at(x, sigma_1))

        a2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a1 = _h_phi_1(-r_2 * h_eta) - a2
        x_2 = sigma_2 / sigma * (-r_2 * h * eta).exp() * x - alpha_2 * (a1 * denoised + a2 * denoised_1)
        if inject:
            x_2 = x_2 + path.advance((r_1 - r_2) * h * eta, sigma_1, sigma_2) * sigma_2
        denoised_2 = model(x_2, at(x, sigma_2))

        b3 = _h_phi_2(-h_eta) / r_2
        b1 = _h_phi_1(-h_eta) - b3
        x = sigma_next / sigma * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_2)
        if inject:
            x = x + path.advance((r_2 - 1) * h * eta, sigma_2, sigma_next) * sigma_next
    return x


# ================================================================================================ CFG++
@_register("euler_ancestral_cfg_pp")
def sample_euler_ancestral_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """Ancestral Euler with CFG++ (Chung et al. 2024): step to the guided x0 estimate but renoise along the
    unconditional noise estimate (a DDIM-style step in the alpha-scaled view, so it also holds for flow
    models). Options: eta (1), s_noise (1). Needs the denoiser's `last_uncond` (use CFG about 1)."""
    return _euler_cfg_pp(model, x, sigmas, ctx, ctx.opt("eta", 1.0), ctx.opt("s_noise", 1.0))


@_register("euler_cfg_pp")
def sample_euler_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """Euler with CFG++ (Chung et al. 2024): the deterministic (eta 0) case of Euler a CFG++."""
    return _euler_cfg_pp(model, x, sigmas, ctx, 0.0, 0.0)


def _euler_cfg_pp(model, x, sigmas, ctx: SamplerContext, eta: float, s_noise: float):
    ms = ctx.model_sampling
    noise = gaussian_stream(x, ctx) if eta > 0 and s_noise > 0 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s = sigma * ms.half_log_snr(sigma).exp()
        alpha_t = sigma_next * ms.half_log_snr(sigma_next).exp()
        eps = to_d(x, sigma, alpha_s * uncond_of(model, denoised))  # the unconditional noise estimate
        sigma_down, sigma_up = ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta)
        x = alpha_t * denoised + alpha_t * sigma_down * eps
        if noise is not None:
            x = x + alpha_t * noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@_register("dpmpp_2s_ancestral_cfg_pp")
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """DPM++ 2S a with CFG++ (Chung et al. 2024): both stages step with the unconditional x0 estimate and the
    guidance (guided minus unconditional) is added back after each step (scaled by alpha on flow models).
    Options: eta (1), s_noise (1)."""
    if ctx.model_sampling.is_flow:
        return _dpmpp_2s_ancestral_rf(model, x, sigmas, ctx, cfg_pp=True)
    return _dpmpp_2s_ancestral_ve(model, x, sigmas, ctx, cfg_pp=True)


@_register("dpmpp_2m_cfg_pp")
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver++(2M) with CFG++ (Chung et al. 2024): the multistep update built on the unconditional x0
    estimates, re-anchored on the guided one."""
    old_uncond = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        uncond = uncond_of(model, denoised)
        ctx.report(i, x, denoised, sigma)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        h = t_next - t
        mix = -torch.exp(-h) * uncond
        if old_uncond is not None and sigma_next != 0:
            r = (t - sigmas[i - 1].log().neg()) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


# ================================================================================================ DPM-Solver
class _DPMSolver:
    """DPM-Solver (Lu et al. 2022) in noise prediction, in t = -log sigma (k-diffusion's DPMSolver): the
    first-, second- and third-order single-step updates, sharing model evaluations through a per-step cache."""

    def __init__(self, model, x):
        self.model = model
        self.ones = x.new_ones([x.shape[0]])
        self.last_denoised = None

    @staticmethod
    def t(sigma):
        return sigma.log().neg()

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = self.sigma(t)
            denoised = self.model(x, sigma * self.ones)
            if key == "eps":
                self.last_denoised = denoised
            cache[key] = (x - denoised) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
        eps_2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_2 - eps)

    def ancestral(self, t, t_next, t_end, eta):
        """With eta > 0: the t to step to deterministically (never past t_end) and the noise to add."""
        if not eta:
            return t_next, 0.0
        sigma_down, _ = ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_down = torch.minimum(t_end, self.t(sigma_down))
        return t_down, (self.sigma(t_next) ** 2 - self.sigma(t_down) ** 2) ** 0.5


def _dpm_bounds(sigmas):
    """dpm_fast / dpm_adaptive integrate from sigmas[0] down to the last positive sigma (not to 0: like
    ComfyUI and A1111, the result keeps that last sigma's noise)."""
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast / dpm_adaptive need positive sigma_min and sigma_max")
    return sigma_min, sigmas[0]


@_register("dpm_fast")
def sample_dpm_fast(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver-fast (Lu et al. 2022): len(sigmas) - 1 model evaluations spent as third-order steps (two
    last steps of order 2 and 1, or one of order nfe mod 3) evenly spaced in log sigma between sigmas[0] and
    the last positive sigma. Options: eta (0), s_noise (1)."""
    if len(sigmas) <= 1:
        return x
    eta, s_noise = ctx.opt("eta", 0.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    sigma_min, sigma_max = _dpm_bounds(sigmas)
    solver = _DPMSolver(model, x)
    t_start, t_end = solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min))
    nfe = len(sigmas) - 1
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_to, up = solver.ancestral(t, t_next, t_end, eta)
        solver.eps(cache, "eps", x, t)
        ctx.report(i, x, solver.last_denoised, solver.sigma(t))
        step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
        x = step(x, t, t_to, cache)
        x = x + up * s_noise * noise(solver.sigma(t), solver.sigma(t_next))
    return x


class _PIDStepSize:
    """A PID controller of the step size of an adaptive ODE solver (k-diffusion's, after Söderlind 2003)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose(self, error) -> bool:
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # soft limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@_register("dpm_adaptive")
def sample_dpm_adaptive(model, x, sigmas, ctx: SamplerContext):
    """DPM-Solver-12 / 23 with adaptive step size (Lu et al. 2022): embedded pairs of orders (1, 2) or
    (2, 3) estimate the local error, a PID controller sizes the next step in log sigma; integrates from
    sigmas[0] to the last positive sigma whatever the step count. Options: order (3), rtol (0.05),
    atol (0.0078), h_init (0.05), pcoeff (0), icoeff (1), dcoeff (0), accept_safety (0.81), eta (0),
    s_noise (1)."""
    if len(sigmas) <= 1:
        return x
    order = int(ctx.opt("order", 3))
    if order not in (2, 3):
        raise ValueError("dpm_adaptive order must be 2 or 3")
    eta, s_noise = ctx.opt("eta", 0.0), ctx.opt("s_noise", 1.0)
    noise = gaussian_stream(x, ctx)
    sigma_min, sigma_max = _dpm_bounds(sigmas)
    solver = _DPMSolver(model, x)
    t_start, t_end = solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min))
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h_init = abs(float(ctx.opt("h_init", 0.05))) * (1 if forward else -1)
    atol = torch.tensor(float(ctx.opt("atol", 0.0078)))
    rtol = torch.tensor(float(ctx.opt("rtol", 0.05)))
    pid = _PIDStepSize(h_init, float(ctx.opt("pcoeff", 0.0)), float(ctx.opt("icoeff", 1.0)),
                       float(ctx.opt("dcoeff", 0.0)), 1.5 if eta else order, float(ctx.opt("accept_safety", 0.81)))
    s, x_prev, attempt = t_start, x, 0
    while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
        cache: dict = {}
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        t_to, up = solver.ancestral(s, t, t_end, eta)
        solver.eps(cache, "eps", x, s)
        ctx.report(attempt, x, solver.last_denoised, solver.sigma(s))
        if order == 2:
            x_low = solver.step_1(x, s, t_to, cache)
            x_high = solver.step_2(x, s, t_to, cache)
        else:
            x_low = solver.step_2(x, s, t_to, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_to, cache)
        scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev = x_low
            x = x_high + up * s_noise * noise(solver.sigma(s), solver.sigma(t))
            s = t
        attempt += 1
    return x


# ================================================================================================ Restart
@_register("restart")
def sample_restart(model, x, sigmas, ctx: SamplerContext):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111
    runs it: Heun steps, and at chosen points a jump back up to a higher sigma with fresh noise followed by
    Heun steps down again, repeated. With 20 or more steps and no restart_list (A1111's default) the main
    schedule becomes a Karras one with the restart steps taken out of it, and one restart (two from 36
    steps) goes from sigma 0.1 up to 2 (in the variance-exploding view, sigma / alpha, on flow models).
    Options: s_noise (1), restart_list ({min_sigma: [restart_steps, restart_times, max_sigma]}, in the
    model's sigma)."""
    ms = ctx.model_sampling
    s_noise = ctx.opt("s_noise", 1.0)
    restart_list = ctx.opt("restart_list", None)
    steps = len(sigmas) - 1
    if steps < 1:
        return x
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = 9, 1
            if steps >= 36:
                restart_steps, restart_times = steps // 4, 2
            main = steps - restart_steps * restart_times
            if sigmas[-1] == 0:
                sigmas = karras_sigmas(main, float(sigmas[-2]), float(sigmas[0])).to(sigmas)
            else:  # a run that stops with leftover noise keeps its last sigma (A1111 always ends at 0)
                sigmas = karras_sigmas(main + 1, float(sigmas[-1]), float(sigmas[0]))[:-1].to(sigmas)
            low, high = _from_ve_sigma(ms, 0.1), _from_ve_sigma(ms, 2.0)
            restart_list = {low: [restart_steps + 1, restart_times, high]}

    def nearest(value) -> int:
        return int(torch.argmin((sigmas - value).abs(), dim=0))

    restarts = {nearest(k): v for k, v in restart_list.items()}
    segments = []
    for i in range(len(sigmas) - 1):
        segments.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            n, times, sigma_high = restarts[i + 1]
            lo, hi = i + 1, nearest(sigma_high)
            if hi < lo:
                ladder = karras_sigmas(int(n), float(sigmas[lo]), float(sigmas[hi])).to(sigmas)[:-1]
                for _ in range(int(times)):
                    segments.extend(zip(ladder[:-1], ladder[1:]))

    noise = None
    last = None
    for step, (sigma, sigma_next) in enumerate(segments):
        if last is not None and last < sigma:
            # forward-noise from `last` up to `sigma`: x_hi = (alpha_hi / alpha_lo) x_lo + fresh noise
            if noise is None:
                noise = gaussian_stream(x, ctx)
            grow = _alpha(ms, sigma) / _alpha(ms, last)
            x = grow * x + noise(last, sigma) * s_noise * (sigma ** 2 - grow ** 2 * last ** 2) ** 0.5
        denoised = model(x, at(x, sigma))
        ctx.report(step, x, denoised, sigma)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = _heun_correct(model, x, d, sigma, sigma_next)
        last = sigma_next
    return x


def _from_ve_sigma(ms, sigma_ve: float) -> float:
    """The model sigma whose sigma / alpha is sigma_ve (the same number for epsilon / v models)."""
    if not ms.is_flow:
        return sigma_ve
    return sigma_ve / (1.0 + sigma_ve)
