"""Linear multistep and predictor-corrector samplers (LMS, iPNDM, DEIS, UniPC, RES, SA-Solver, PLMS...).

Every sampler here reuses the model evaluations of earlier steps: it keeps a short history of denoiser outputs
(or of the Karras derivative d = (x - D) / sigma) and combines them with coefficients that depend on the
spacing of the sigmas. Names and numbers follow ComfyUI 0.3.64 (its k-diffusion copy, `deis.py`,
`sa_solver.py` and its UniPC adaptation); PLMS follows A1111 / latent-diffusion. The formulas were re-derived
from the papers and those sources and written here in one structure. Where the reference's numbers depend on a
numerical recipe, the recipe is reproduced so the latents match to float32 rounding rather than to 1e-4: LMS's
quadrature of a float32 integrand, DEIS's 10,000-point rectangle rule, UniPC's final sigma of 0.001 and its
float32 schedule terms, and float32 step coefficients for RES and iPNDM-v (near sigma 0 the derivatives reach
hundreds, so 1e-7 in a weight shows at 1e-5 in the latent).

Coordinates: x = x0 + sigma * n for epsilon/v models, x = (1 - t) x0 + t n for flow models (sigma = t). Unless a
docstring says otherwise a sampler works on sigma itself (the Karras ODE dx/dsigma = (x - D) / sigma), which
is what ComfyUI does for both kinds of model.

Option keys (read with `ctx.opt`, ComfyUI's defaults):

- lms: order (4)
- ipndm, ipndm_v: max_order (4)
- deis: max_order (3), deis_mode ('tab' | 'rhoab', 'tab')
- res_multistep, res_multistep_cfg_pp: none
- res_multistep_ancestral, res_multistep_ancestral_cfg_pp: eta (1.0), s_noise (1.0)
- gradient_estimation, gradient_estimation_cfg_pp: ge_gamma (2.0)
- sa_solver, sa_solver_pece: eta (1.0), sde_start_percent (0.2), sde_end_percent (0.8), s_noise (1.0),
  predictor_order (3), corrector_order (4), simple_order_2 (False)
- uni_pc, uni_pc_bh2: order (3)
- plms: none
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import SamplerContext, ancestral_step, at, gaussian_stream, registry, to_d, uncond_of

SAMPLERS: dict = {}
_register = registry(SAMPLERS)


# ================================================================================================ helpers
def _noise_scale(ctx: SamplerContext) -> float:
    return float(getattr(ctx.model_sampling, "noise_scale", 1.0))


def _f(v) -> float:
    return float(v)


def _lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """Integral over [a, b] of each Lagrange basis polynomial on `nodes` (exact, float64): the weights of a
    variable-step Adams-Bashforth (or -Moulton) step. Computed in the variable u = tau - nodes[0] so the
    polynomial coefficients stay well scaled."""
    c = nodes[0]
    us = [n - c for n in nodes]
    out = []
    for j, uj in enumerate(us):
        poly = np.poly1d([1.0])
        for k, uk in enumerate(us):
            if k != j:
                poly = poly * np.poly1d([1.0, -uk]) / (uj - uk)
        prim = poly.integ()
        out.append(float(prim(b - c) - prim(a - c)))
    return out


# ================================================================================================ LMS
@_register("lms")
def sample_lms(model, x, sigmas, ctx: SamplerContext):
    """Linear multistep (k-diffusion's LMS): variable-step Adams-Bashforth of order up to `order` (4) on the
    Karras ODE in sigma; each weight is the integral over the step of a Lagrange basis polynomial through the
    last derivatives' sigmas. The last step to sigma 0 returns the denoised estimate."""
    order = int(ctx.opt("order", 4))
    s = [_f(v) for v in sigmas.detach().cpu().to(torch.float32)]
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, at(x, sigmas[i]))
        ctx.report(i, x, denoised, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        del ds[:-order]
        if s[i + 1] == 0:
            x = denoised
            continue
        k = min(i + 1, order)
        weights = _lms_weights(s[i - k + 1:i + 1][::-1], s[i], s[i + 1])
        x = x + sum(w * d for w, d in zip(weights, reversed(ds)))
    return x


def _lms_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """LMS's weights, integrated the way k-diffusion / ComfyUI do: adaptive quadrature (scipy's quad, rel. tol.
    1e-4, exact for these cubics) of the Lagrange basis evaluated with float32 nodes, so in float32 arithmetic
    under NumPy 2. The float32 rounding of the integrand moves the weights by ~1e-7, which near sigma 0
    (derivatives of hundreds) shows in the latent at 1e-5: reproduced so the images match."""
    from scipy import integrate  # noqa: PLC0415

    t = np.asarray(nodes, dtype=np.float32)
    out = []
    for j in range(len(t)):
        others = [t[k] for k in range(len(t)) if k != j]

        def basis(tau, j=j, others=others):
            prod = 1.0
            for tk in others:
                prod *= (tau - tk) / (t[j] - tk)
            return prod
        out.append(float(integrate.quad(basis, np.float32(a), np.float32(b), epsrel=1e-4)[0]))
    return out


# ================================================================================================ iPNDM
_AB = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}
"""Fixed-step Adams-Bashforth weights (numerators, newest derivative first, and the common denominator)."""


def _ab_numerator(order: int, newest_first: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The Adams-Bashforth combination as (integer-weighted sum, denominator); callers scale then divide, the
    evaluation order of the reference implementations (it shows at the 1e-5 level in float32)."""
    nums, den = _AB[order]
    acc = newest_first[0] if nums[0] == 1 else nums[0] * newest_first[0]
    for c, v in zip(nums[1:], newest_first[1:]):
        acc = acc + c * v
    return acc, den


def _ipndm_variable_weights(h: list[float]) -> tuple[float, ...]:
    """iPNDM-v's weights (Zhang & Chen 2023, as in zju-pi/diff-sampler) for the step h[0] given the earlier steps
    h[1], h[2], h[3] (all as sigma differences), newest derivative first."""
    order = len(h)
    if order == 1:
        return (1.0,)
    h0, h1 = h[0], h[1]
    r1 = h0 / h1
    w = [1 + r1 / 2, -r1 / 2]
    if order == 2:
        return tuple(w)
    h2 = h[2]
    g1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    w = [w[0] + g1, w[1] - (1 + h1 / h2) * g1, g1 * h1 / h2]
    if order == 3:
        return tuple(w)
    h3 = h[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    g2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return (w[0] + g2,
            w[1] - (1 + h1 / h2 + q) * g2,
            w[2] + (h1 / h2 + q * (1 + h2 / h3)) * g2,
            -g2 * q * h1 / h2)


def _ipndm(model, x, sigmas, ctx: SamplerContext, variable: bool):
    max_order = int(ctx.opt("max_order", 4))
    ds: list[torch.Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        d = (x - denoised) / sigma
        ds.append(d)
        del ds[:-max_order]
        order = min(max_order, i + 1)
        if sigma_next == 0:
            x = denoised
            continue
        history = ds[-order:][::-1]
        if variable:
            steps = [sigmas[i + 1 - k] - sigmas[i - k] for k in range(order)]
            weights = _ipndm_variable_weights(steps)
            slope = history[0] if order == 1 else sum(w * dd for w, dd in zip(weights, history))
            x = x + (sigma_next - sigma) * slope
        else:
            num, den = _ab_numerator(order, history)
            x = x + (sigma_next - sigma) * num / den
    return x


@_register("ipndm")
def sample_ipndm(model, x, sigmas, ctx: SamplerContext):
    """Improved PNDM (Zhang & Chen, DEIS paper, 2023): Euler first, then fixed-coefficient Adams-Bashforth of
    order up to `max_order` (4) on the Karras derivative, whatever the spacing of the sigmas."""
    return _ipndm(model, x, sigmas, ctx, variable=False)


@_register("ipndm_v")
def sample_ipndm_v(model, x, sigmas, ctx: SamplerContext):
    """iPNDM with variable-step coefficients (diff-sampler's iPNDM-v): the Adams-Bashforth weights corrected for
    the ratios of consecutive sigma steps."""
    return _ipndm(model, x, sigmas, ctx, variable=True)


# ================================================================================================ DEIS
class _EdmVp:
    """DEIS's reference VP-SDE, fitted (as in EDM's VP baseline) so that sigma(eps_s = 1e-3) = 0.002 and
    sigma(1) = 80: sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1. DEIS interpolates the derivative as a
    polynomial in this t. Constants are computed in float32, as the reference does."""

    def __init__(self, eps_s: float = 1e-3, sigma_min: float = 0.002, sigma_max: float = 80.0):
        lo = torch.log(torch.tensor(sigma_min) ** 2 + 1)
        hi = torch.log(torch.tensor(sigma_max) ** 2 + 1)
        self.beta_d = 2 * (lo / eps_s - hi) / (eps_s - 1)
        self.beta_min = hi - 0.5 * self.beta_d

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        bd, bm = self.beta_d, self.beta_min
        return ((bm ** 2 + 2 * bd * (sigma ** 2 + 1).log()).sqrt() - bm) / bd

    def dsigma_dt(self, t: torch.Tensor) -> torch.Tensor:
        """DEIS's integrand -1/2 dlog(alpha)/dt / sqrt(alpha (1 - alpha)), which is d sigma / d t, written with
        beta(t) = beta_0 + (beta_1 - beta_0) t as in the reference (float32)."""
        beta_0, beta_1 = self.beta_min, self.beta_d + self.beta_min
        alpha = torch.exp(-0.5 * t ** 2 * (beta_1 - beta_0) - t * beta_0)
        dlog_alpha = -(beta_1 - beta_0) * t - beta_0
        return -0.5 * dlog_alpha / torch.sqrt(alpha * (1 - alpha))


def _deis_tab_weights(sigmas: torch.Tensor, max_order: int, n_points: int = 10000) -> list[list[float]]:
    """Weights of DEIS's time-quadratic 'tAB' multistep: the integral over a step of the Lagrange basis in VP time
    t (through the last `order` step times) against d sigma. Integrated as ComfyUI does, with a rectangle rule
    over `n_points` evenly spaced points including both ends (the numbers must match its images)."""
    vp = _EdmVp()
    ts = vp.t(sigmas.detach().cpu().to(torch.float32))
    weights: list[list[float]] = []
    for i in range(len(ts) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sigmas[i + 1] <= 0:
            weights.append([])
            continue
        taus = torch.linspace(ts[i], ts[i + 1], n_points)
        dtau = (ts[i + 1] - ts[i]) / n_points
        density = vp.dsigma_dt(taus)
        nodes = [ts[i - k] for k in range(order)]
        row = []
        for j in range(order):
            basis = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis = basis * (taus - nodes[k]) / (nodes[j] - nodes[k])
            row.append(_f(torch.sum(density * basis) * dtau))
        weights.append(row)
    return weights


def _deis_rhoab_weights(sigmas: torch.Tensor, max_order: int) -> list[list[float]]:
    """DEIS's 'rhoAB': exact Adams-Bashforth weights with the polynomial in sigma itself."""
    s = [_f(v) for v in sigmas.detach().cpu().to(torch.float32)]
    out = []
    for i in range(len(s) - 1):
        order = min(i + 1, max_order)
        out.append([] if order == 1 else _lagrange_integrals([s[i - k] for k in range(order)], s[i], s[i + 1]))
    return out


@_register("deis")
def sample_deis(model, x, sigmas, ctx: SamplerContext):
    """DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"), its multistep
    AB form: x_next = x + sum_j C_j d_{i-j} with d the Karras derivative and C_j the integral of the Lagrange
    basis over the step; order up to `max_order` (3); `deis_mode` 'tab' (polynomial in VP time, ComfyUI's
    default) or 'rhoab' (in sigma). Euler first and on the step to sigma 0."""
    max_order = int(ctx.opt("max_order", 3))
    mode = ctx.opt("deis_mode", "tab")
    if mode == "tab":
        weights = _deis_tab_weights(sigmas, max_order)
    elif mode == "rhoab":
        weights = _deis_rhoab_weights(sigmas, max_order)
    else:
        raise ValueError(f"deis_mode must be 'tab' or 'rhoab', got {mode!r}")
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        d = (x - denoised) / sigma
        ds.append(d)
        del ds[:-max_order]
        w = weights[i]
        if not w:  # first step, or the step to sigma 0: Euler
            x = x + (sigma_next - sigma) * d
        else:
            for c, dd in zip(w, reversed(ds[-len(w):])):
                x = x + c * dd
    return x


# ================================================================================================ RES multistep
def _res_multistep(model, x, sigmas, ctx: SamplerContext, eta: float, cfg_pp: bool):
    """Refined exponential solver, 2nd-order multistep (Zhang et al. 2023, arXiv 2308.02157) in t = -log sigma
    on the data prediction; optional ancestral noise (eta) and CFG++ (Chung et al. 2024)."""
    s_noise = float(ctx.opt("s_noise", 1.0)) * _noise_scale(ctx)
    noise_sampler = gaussian_stream(x, ctx) if eta > 0 else None
    old_denoised = None
    old_sigma_down = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        uncond = uncond_of(model, denoised) if cfg_pp else denoised
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta=eta)
        ctx.report(i, x, denoised, sigma)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigma, uncond) * sigma_down
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_down.log().neg()
            t_prev, t_old = sigmas[i - 1].log().neg(), old_sigma_down.log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            if c2 == 0:  # a repeated sigma left no usable history: first-order step
                b1, b2 = torch.nan_to_num(phi1, nan=0.0), 0.0
            else:
                b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
                b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = torch.exp(-h) * x + h * (b1 * uncond + b2 * old_denoised)
        if eta > 0 and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        old_denoised = uncond
        old_sigma_down = sigma_down
    return x


@_register("res_multistep")
def sample_res_multistep(model, x, sigmas, ctx: SamplerContext):
    """RES multistep (Zhang et al. 2023, "Improved order analysis and design of exponential integrators"): the
    2nd-order exponential multistep on the denoised estimate, Euler on the first step."""
    return _res_multistep(model, x, sigmas, ctx, eta=0.0, cfg_pp=False)


@_register("res_multistep_cfg_pp")
def sample_res_multistep_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """RES multistep with CFG++ (Chung et al. 2024): steps along the unconditional noise direction and re-adds
    the guidance to the data estimate (use CFG about 1)."""
    return _res_multistep(model, x, sigmas, ctx, eta=0.0, cfg_pp=True)


@_register("res_multistep_ancestral")
def sample_res_multistep_ancestral(model, x, sigmas, ctx: SamplerContext):
    """RES multistep with ancestral noise: each step goes to k-diffusion's sigma_down and adds fresh noise of
    sigma_up (eta 1, s_noise 1; one draw per step from the seeded stream)."""
    return _res_multistep(model, x, sigmas, ctx, eta=float(ctx.opt("eta", 1.0)), cfg_pp=False)


@_register("res_multistep_ancestral_cfg_pp")
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """RES multistep, ancestral and CFG++."""
    return _res_multistep(model, x, sigmas, ctx, eta=float(ctx.opt("eta", 1.0)), cfg_pp=True)


# ================================================================================================ gradient estimation
def _gradient_estimation(model, x, sigmas, ctx: SamplerContext, cfg_pp: bool):
    gamma = float(ctx.opt("ge_gamma", 2.0))
    old_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        d = to_d(x, sigma, uncond_of(model, denoised) if cfg_pp else denoised)
        ctx.report(i, x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@_register("gradient_estimation")
def sample_gradient_estimation(model, x, sigmas, ctx: SamplerContext):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an
    optimization perspective"): Euler with the derivative extrapolated, d + (ge_gamma - 1)(d - d_prev)."""
    return _gradient_estimation(model, x, sigmas, ctx, cfg_pp=False)


@_register("gradient_estimation_cfg_pp")
def sample_gradient_estimation_cfg_pp(model, x, sigmas, ctx: SamplerContext):
    """Gradient estimation with CFG++: the derivative comes from the unconditional estimate."""
    return _gradient_estimation(model, x, sigmas, ctx, cfg_pp=True)


# ================================================================================================ SA-Solver
def _sa_weights(nodes: list[float], lam_s: float, lam_t: float, tau: float, alpha_t: float) -> list[float]:
    """SA-Solver's b_j (Xue et al. 2023, eqs. 15/18): alpha_t times the integral over [lam_s, lam_t] of
    (1 + tau^2) exp((1 + tau^2)(lam - lam_t)) l_j(lam), l_j the Lagrange basis on `nodes` (half-log-SNRs).
    Exact, in float64, with lam measured from lam_t."""
    c = 1.0 + tau * tau
    a = lam_s - lam_t
    us = [n - lam_t for n in nodes]
    k = len(us)
    # m[p] = c * int_a^0 exp(c u) u^p du; by parts m[p] = [p == 0] - a^p exp(c a) - (p / c) m[p - 1]
    ea = math.exp(c * a)
    m = []
    for p in range(k):
        top = 1.0 if p == 0 else 0.0
        val = top - (a ** p) * ea
        if p > 0:
            val -= p / c * m[p - 1]
        m.append(val)
    vander_t = np.array([[u ** p for u in us] for p in range(k)], dtype=np.float64)
    lag = np.linalg.solve(vander_t, np.array(m, dtype=np.float64))
    return [alpha_t * float(v) for v in lag]


def _sa_simple_weights(nodes: list[float], lam_s: float, lam_t: float, tau: float, alpha_t: float,
                       corrector: bool) -> list[float]:
    """SA-Solver's simplified order-2 weights (paper, appendix D), oldest first."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    total = alpha_t * -math.expm1(-h * c)
    if corrector:
        newest = alpha_t * 0.5 * c * h
        return [total - newest, newest]
    older = alpha_t * 0.5 * c * h * h / (nodes[-2] - lam_s)
    return [older, total - older]


def _sa_solver(model, x, sigmas, ctx: SamplerContext, use_pece: bool):
    if len(sigmas) <= 1:
        return x
    ms = ctx.model_sampling
    noise_sampler = gaussian_stream(x, ctx)
    s_noise = float(ctx.opt("s_noise", 1.0)) * _noise_scale(ctx)
    pred_order = int(ctx.opt("predictor_order", 3))
    corr_order = int(ctx.opt("corrector_order", 4))
    simple_2 = bool(ctx.opt("simple_order_2", False))
    eta = float(ctx.opt("eta", 1.0))
    start_sigma = ms.percent_to_sigma(float(ctx.opt("sde_start_percent", 0.2)))
    end_sigma = ms.percent_to_sigma(float(ctx.opt("sde_end_percent", 0.8)))

    def tau_of(sigma) -> float:
        return eta if eta > 0 and start_sigma >= _f(sigma) >= end_sigma else 0.0

    sigmas = _offset_first_sigma(sigmas, ms)
    lambdas = ms.half_log_snr(sigmas)
    lam = [_f(v) for v in lambdas]
    sig = [_f(v) for v in sigmas]

    def weights(nodes, i_s, i_t, tau, corrector):
        alpha_t = sig[i_t] * math.exp(lam[i_t])
        if simple_2 and len(nodes) == 2:
            return _sa_simple_weights(nodes, lam[i_s], lam[i_t], tau, alpha_t, corrector)
        return _sa_weights(nodes, lam[i_s], lam[i_t], tau, alpha_t)

    n = len(sigmas) - 1
    keep = max(pred_order, corr_order)
    lower_to_end = sig[-1] == 0
    x_pred = x
    h = 0.0
    tau = 0.0
    noise = None
    preds: list[torch.Tensor] = []
    for i in range(n):
        denoised = model(x_pred, at(x_pred, sigmas[i]))
        ctx.report(i, x_pred, denoised, sigmas[i])
        preds.append(denoised)
        del preds[:-keep]
        p_used = min(pred_order, len(preds))
        c_used = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corr_order, len(preds))
        if lower_to_end:
            p_used = min(p_used, n - 1 - i)
            c_used = min(c_used, n - i)

        # corrector: redo the last step with the new evaluation included (Adams-Moulton-like)
        if c_used == 0:
            x = x_pred
        else:
            w = weights(lam[i - c_used + 1:i + 1], i - 1, i, tau, corrector=True)
            x = (sig[i] / sig[i - 1] * math.exp(-tau * tau * h)) * x + sum(c * p for c, p in zip(w, preds[-c_used:]))
            if noise is not None:
                x = x + noise
            if use_pece:
                denoised = model(x, at(x, sigmas[i]))
                preds[-1] = denoised

        # predictor: Adams-Bashforth-like step to the next sigma, with SDE noise inside the chosen interval
        if sig[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_of(sigmas[i + 1])
            w = weights(lam[i - p_used + 1:i + 1], i, i + 1, tau, corrector=False)
            h = lam[i + 1] - lam[i]
            x_pred = (sig[i + 1] / sig[i] * math.exp(-tau * tau * h)) * x \
                + sum(c * p for c, p in zip(w, preds[-p_used:]))
            noise = None
            if tau > 0 and s_noise > 0:
                scale = sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * s_noise
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * scale
                x_pred = x_pred + noise
    return x_pred


def _offset_first_sigma(sigmas: torch.Tensor, ms) -> torch.Tensor:
    """A flow model's sigma 1 has an infinite log-SNR: start a hair below it, as ComfyUI does."""
    if len(sigmas) > 1 and ms.is_flow and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = ms.percent_to_sigma(1e-4)
    return sigmas


@_register("sa_solver")
def sample_sa_solver(model, x, sigmas, ctx: SamplerContext):
    """SA-Solver (Xue et al. 2023, "Stochastic Adams solver"): a stochastic Adams predictor (order 3) and
    corrector (order 4) in half-log-SNR on the data prediction; SDE noise (tau = eta) between the
    sde_start_percent and sde_end_percent of the run, ODE elsewhere. One fresh draw per noisy step."""
    return _sa_solver(model, x, sigmas, ctx, use_pece=False)


@_register("sa_solver_pece")
def sample_sa_solver_pece(model, x, sigmas, ctx: SamplerContext):
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate): the corrected state is evaluated again,
    which costs one more model call per step."""
    return _sa_solver(model, x, sigmas, ctx, use_pece=True)


# ================================================================================================ UniPC
def _vp_terms(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, std, lambda) of the VP process matching sigma (alpha = 1 / sqrt(1 + sigma^2)), as float32 scalars
    computed through log(alpha), as ComfyUI's UniPC does. The float32 rounding matters at its final sigma of
    0.001, where 1 - alpha^2 keeps only a few bits: ComfyUI's effective last sigma is about 0.000977, and
    matching its images means matching that."""
    log_alpha = 0.5 * torch.log(1 / (sigma * sigma + 1))
    one_minus = 1.0 - torch.exp(2.0 * log_alpha)
    return torch.exp(log_alpha), torch.sqrt(one_minus), log_alpha - 0.5 * torch.log(one_minus)


def _unipc(model, x, sigmas, ctx: SamplerContext, variant: str):
    """UniPC (Zhao et al. 2023), multistep, data prediction, in the half-log-SNR lambda of the VP process whose
    alpha is 1 / sqrt(1 + sigma^2) (ComfyUI runs it on VP-scaled latents for every model, flow ones included):
    a UniP predictor of order k, then the UniC corrector that reuses the model evaluation at the predicted point.
    B(h) = h (bh1) or e^h - 1 (bh2). As ComfyUI: order min(3, steps - 1), warm-up with lower orders, lower
    orders at the end, no corrector on the final step, and a final sigma of 0 replaced by 0.001 (the result is
    the latent there, not denoised further). Scalars are float32 like the reference's, which keeps the result
    within float32 rounding of ComfyUI's."""
    sig = sigmas.detach().cpu().to(torch.float32).clone()
    if sig[-1] == 0:
        sig[-1] = 0.001
    n = len(sig) - 1
    if n < 1:
        return x
    # ComfyUI uses order min(3, n - 1), which is 0 (no step at all) for a one-step run; take one first-order step.
    order = max(1, min(int(ctx.opt("order", 3)), n - 1))
    alpha, std, lam = _vp_terms(sig)
    dev = x.device

    def data_pred(z, i):
        """The x0 estimate for a VP-scaled latent at sigma index i, through the noise prediction with the
        float32 alpha and std above, as ComfyUI computes it (at small sigmas this differs from D by ~1e-5)."""
        s = sig[i].to(dev)
        z_ve = z * (s * s + 1.0) ** 0.5
        eps = (z_ve - model(z_ve, at(z, s))) / s
        return (z - std[i].to(dev) * eps) / alpha[i].to(dev)

    def step(z, hist, i_t, k, correct):
        """From the newest history point to sigma index i_t with order k (the newest k history points)."""
        i0, m0 = hist[-1]
        h = lam[i_t] - lam[i0]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rks, d1s = [], []
        for ik, mk in reversed(hist[-k:-1]):
            rk = (lam[ik] - lam[i0]) / h
            rks.append(rk)
            d1s.append((mk - m0) / rk.to(dev))
        rks = torch.stack(rks + [torch.tensor(1.0)])
        # b_p = p! * (Taylor remainder of e^hh of order p) / hh^p, scaled by 1 / B(h)
        bs, g, fact = [], h_phi_1 / hh - 1, 1
        for p in range(1, k + 1):
            bs.append(g * fact / b_h)
            fact *= p + 1
            g = g / hh - 1 / fact
        bs = torch.stack(bs)
        R = torch.stack([rks ** (p - 1) for p in range(1, k + 1)])
        base = (std[i_t] / std[i0]).to(dev) * z - (alpha[i_t] * h_phi_1).to(dev) * m0
        scale = (alpha[i_t] * b_h).to(dev)
        z_t = base
        if d1s:
            rho_p = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(R[:-1, :-1], bs[:-1])
            z_t = base - scale * _combine(rho_p, d1s)
        if not correct:
            return z_t, None
        m_t = data_pred(z_t, i_t)
        rho_c = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(R, bs)
        corr = _combine(rho_c[:-1], d1s) if d1s else 0
        return base - scale * (corr + rho_c[-1].to(dev) * (m_t - m0)), m_t

    z = x / torch.sqrt(1.0 + sig[0].to(dev) ** 2.0)
    hist = [(0, data_pred(z, 0))]
    for i in range(n):
        if ctx.callback is not None:
            ctx.report(i, z / alpha[i].to(dev), hist[-1][1], sigmas[i])
        target = i + 1
        k = target if target < order else min(order, n + 1 - target)
        correct = target < n
        z, m_t = step(z, hist, target, k, correct)
        if correct:
            hist.append((target, m_t))
            del hist[:-order]
    return z / alpha[n].to(dev)


def _combine(weights: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum_k weights[k] * tensors[k], contracted in one go (as an einsum over the stacked history)."""
    return torch.einsum("k,k...->...", weights.to(tensors[0]), torch.stack(tensors))


@_register("uni_pc")
def sample_uni_pc(model, x, sigmas, ctx: SamplerContext):
    """UniPC, B(h) = h (bh1): unified predictor-corrector (Zhao et al. 2023), order 3."""
    return _unipc(model, x, sigmas, ctx, "bh1")


@_register("uni_pc_bh2")
def sample_uni_pc_bh2(model, x, sigmas, ctx: SamplerContext):
    """UniPC, B(h) = e^h - 1 (bh2): better for few steps and guided sampling."""
    return _unipc(model, x, sigmas, ctx, "bh2")


# ================================================================================================ PLMS
@_register("plms")
def sample_plms(model, x, sigmas, ctx: SamplerContext):
    """PLMS (Liu et al. 2022, "Pseudo numerical methods for diffusion models"), as latent-diffusion and A1111 run
    it: the DDIM transfer applied to eps, which in sigma coordinates is an Euler step x + (sigma' - sigma) eps
    with eps = (x - D) / sigma. First step: pseudo improved Euler (eps averaged with eps at the Euler
    prediction, one extra call); then Adams-Bashforth 2, 3, 4 on the eps history. Epsilon/v models only."""
    if ctx.model_sampling.is_flow:
        raise ValueError("plms (PLMS) is defined for epsilon/v-prediction models only; this is a flow-matching "
                         "model: choose another sampler (euler, dpmpp_2m, uni_pc, ...)")
    old_eps: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, at(x, sigma))
        ctx.report(i, x, denoised, sigma)
        eps = (x - denoised) / sigma
        k = len(old_eps) + 1
        if k == 1:
            if sigma_next > 0:
                x_euler = x + (sigma_next - sigma) * eps
                eps_next = (x_euler - model(x_euler, at(x, sigma_next))) / sigma_next
                eps_prime = (eps + eps_next) / 2
            else:
                eps_prime = eps
        else:
            num, den = _ab_numerator(k, [eps] + old_eps[::-1])
            eps_prime = num / den
        x = x + (sigma_next - sigma) * eps_prime
        old_eps.append(eps)
        del old_eps[:-3]
    return x
