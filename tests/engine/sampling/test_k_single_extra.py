"""The k_single samplers the ComfyUI oracle does not cover (dpm_fast, dpm_adaptive, the CFG++ variants, A1111's
Restart), on the oracle's analytic problem: both models, the oracle's own karras and simple sigma lists.

The CFG'd analytic denoiser is exactly the posterior mean of Gaussian data N(mu_u + 6 (mu_c - mu_u), 0.5^2), so
an ODE sampler must land near Euler with 100 steps. The tolerances are about 1.5x the worst error seen over
the four (model, schedule) cases; a broken coefficient (a wrong 1/(2r) in 2M, a wrong third-order weight in
DPM-Solver-3, a missing alpha in a flow step) lands several times further out."""

import pytest
import torch

from fixtures import sampling_oracle as O
from imagesmith.engine.sampling.base import SamplerContext
from imagesmith.engine.sampling.k_single import SAMPLERS
from imagesmith.engine.sampling.schedules import karras_sigmas

CASES = [(m, s) for m in O.MODELS for s in ("karras", "simple")]


def oracle_sigmas(model: str, schedule: str, steps: int = 10) -> torch.Tensor:
    if steps == 10:
        return O.sigmas_used(f"{model}|{schedule}|10|euler")
    return torch.tensor(O.oracle()["sigmas"][model]["by_scheduler"][schedule][str(steps)], dtype=torch.float32)


class Unguided(O.AnalyticDenoiser):
    """The analytic denoiser with its unconditional estimate equal to the guided one (what CFG off gives):
    the CFG++ samplers must then be their plain counterparts."""

    def __call__(self, x, sigma):
        out = super().__call__(x, sigma)
        self.last_uncond = out
        return out


class UncondOnly(O.AnalyticDenoiser):
    def __call__(self, x, sigma):
        super().__call__(x, sigma)
        return self.last_uncond


class Recording(O.AnalyticDenoiser):
    def __init__(self, model):
        super().__init__(model)
        self.seen = []

    def __call__(self, x, sigma):
        self.seen.append((float(sigma[0]), x.clone()))
        return super().__call__(x, sigma)


def run(name, model, sigmas, denoiser=None, *, seed=42, noise=None, callback=None, **options):
    denoiser = denoiser if denoiser is not None else O.AnalyticDenoiser(model)
    x = (O.initial_noise() if noise is None else noise) * sigmas[0]
    ctx = SamplerContext(model_sampling=O.model_sampling(model), seed=seed, callback=callback, options=options)
    with torch.no_grad():
        return SAMPLERS[name](denoiser, x, sigmas, ctx)


def euler_reference(model, sigmas, steps=100, *, to_zero=True, noise=None):
    """Euler with `steps` Karras-spaced steps between the schedule's end points (to 0, or stopping at the last
    positive sigma for the DPM-Solver samplers, which stop there)."""
    ladder = karras_sigmas(steps, float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]), float(sigmas[0]))
    return run("euler", model, ladder if to_zero else ladder[:-1], noise=noise)


# ------------------------------------------------------------------------------------------------ ODE accuracy
TOL = {
    "dpm_fast": 0.3,
    "dpm_adaptive": 0.12,
    "euler_cfg_pp": 0.35,
    "euler_ancestral_cfg_pp": 0.35,
    "dpmpp_2m_cfg_pp": 0.18,
    "dpmpp_2s_ancestral_cfg_pp": 0.11,
    "restart": 0.22,
}


@pytest.mark.parametrize("model,schedule", CASES)
@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_solver_lands_near_euler_100(name, model, schedule):
    sigmas = oracle_sigmas(model, schedule)
    out = run(name, model, sigmas)
    assert torch.isfinite(out).all()
    err = (out - euler_reference(model, sigmas, to_zero=False)).abs().max().item()
    assert err <= TOL[name], f"{name} {model} {schedule}: {err:.3g}"


@pytest.mark.parametrize("model,schedule", CASES)
def test_dpm_solver_converges(model, schedule):
    """With many evaluations / tight tolerances both agree with a fine Euler run to the last positive sigma."""
    sigmas = oracle_sigmas(model, schedule)
    fine = euler_reference(model, sigmas, 2000, to_zero=False)
    fast = run("dpm_fast", model, torch.linspace(float(sigmas[0]), float(sigmas[-2]), 61))
    assert (fast - fine).abs().max().item() <= 0.015
    adaptive = run("dpm_adaptive", model, sigmas, rtol=0.005, atol=0.0005)
    assert (adaptive - fine).abs().max().item() <= 0.05


@pytest.mark.parametrize("model,schedule", CASES)
@pytest.mark.parametrize("name", ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
                                  "dpmpp_2s_ancestral_cfg_pp"])
def test_cfg_pp_without_guidance_lands_near_euler_100(name, model, schedule):
    sigmas = oracle_sigmas(model, schedule)
    out = run(name, model, sigmas, Unguided(model), eta=0.0)
    assert torch.isfinite(out).all()
    err = (out - euler_reference(model, sigmas)).abs().max().item()
    assert err <= TOL[name], f"{name} {model} {schedule}: {err:.3g}"


@pytest.mark.parametrize("model,schedule", CASES)
@pytest.mark.parametrize("name,plain", [("euler_cfg_pp", "euler"), ("euler_ancestral_cfg_pp", "euler_ancestral"),
                                        ("dpmpp_2m_cfg_pp", "dpmpp_2m"),
                                        ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral")])
def test_cfg_pp_without_guidance_is_comfyuis_plain_sampler(name, plain, model, schedule):
    """Without guidance a CFG++ sampler is its plain counterpart: ComfyUI's own final latent (oracle, 1e-4)."""
    if name == "euler_ancestral_cfg_pp" and model != "sd1_eps":
        pytest.skip("on flow models Euler a CFG++ splits its ancestral step in sigma / alpha (DDIM-style), "
                    "ComfyUI's Euler a uses the rectified-flow split")
    key = f"{model}|{schedule}|10|{plain}"
    out = run(name, model, O.sigmas_used(key), Unguided(model))
    assert (out - O.expected_final(key)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model", O.MODELS)
@pytest.mark.parametrize("name", ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_step_renoises_along_the_unconditional_noise(name, model):
    """CFG++'s defining step: x_next = alpha_next * D_guided + sigma_next * eps_uncond, with
    eps_uncond = (x - alpha * D_uncond) / sigma (alpha = 1, or 1 - sigma on flow models)."""
    if name == "dpmpp_2m_cfg_pp" and model != "sd1_eps":
        pytest.skip("ComfyUI's DPM++ 2M CFG++ has only the epsilon-model form")
    full = oracle_sigmas(model, "karras")
    sigmas = full[2:4].clone()
    den = O.AnalyticDenoiser(model)
    x0 = O.initial_noise() * sigmas[0]
    guided = den(x0, sigmas[0].expand(2))
    uncond = den.last_uncond
    flow = model != "sd1_eps"
    a0, a1 = (1 - sigmas[0], 1 - sigmas[1]) if flow else (1.0, 1.0)
    expected = a1 * guided + sigmas[1] * (x0 - a0 * uncond) / sigmas[0]
    out = run(name, model, sigmas, eta=0.0)
    assert (out - expected).abs().max().item() <= 1e-4
    assert (out - run(name.replace("_cfg_pp", ""), model, sigmas, eta=0.0)).abs().max().item() > 0.1


@pytest.mark.parametrize("model", O.MODELS)
def test_dpmpp_2s_cfg_pp_step_is_the_unconditional_step_plus_guidance(model):
    full = oracle_sigmas(model, "karras")
    sigmas = full[2:4].clone()
    den = O.AnalyticDenoiser(model)
    x0 = O.initial_noise() * sigmas[0]
    guidance = den(x0, sigmas[0].expand(2)) - den.last_uncond
    scale = (1 - sigmas[1]) if model != "sd1_eps" else 1.0
    expected = run("dpmpp_2s_ancestral", model, sigmas, UncondOnly(model), eta=0.0) + scale * guidance
    out = run("dpmpp_2s_ancestral_cfg_pp", model, sigmas, eta=0.0)
    assert (out - expected).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------ Restart
@pytest.mark.parametrize("model,schedule", CASES)
def test_restart_under_20_steps_is_comfyuis_heun_near_euler_100(model, schedule):
    sigmas = oracle_sigmas(model, schedule)
    out = run("restart", model, sigmas)
    assert torch.isfinite(out).all()
    assert (out - O.expected_final(f"{model}|{schedule}|10|heun")).abs().max().item() <= 1e-4  # ComfyUI's Heun
    err = (out - euler_reference(model, sigmas)).abs().max().item()
    assert err <= TOL["restart"], f"restart {model} {schedule}: {err:.3g}"


@pytest.mark.parametrize("model,schedule", CASES)
def test_restart_renoises_to_the_marginal_of_the_higher_sigma(model, schedule):
    """At 20 steps A1111's Restart takes 11 Karras steps plus one restart of 9 steps back up from sigma~ 0.1 to
    2 (sigma / alpha): the latent entering the first evaluation after the jump must be distributed as the data
    noised to that sigma, N(alpha mu, alpha^2 s^2 + sigma^2), whatever the seed."""
    sigmas = oracle_sigmas(model, schedule, 20)
    flow = model != "sd1_eps"
    zs, final = [], []
    for k in range(8):
        den = Recording(model)
        steps = []
        noise = torch.randn(tuple(O.oracle()["problem"]["shape"]), generator=torch.Generator().manual_seed(k))
        out = run("restart", model, sigmas, den, seed=100 + k, noise=noise,
                  callback=lambda i, x, d, s: steps.append(i))
        assert torch.isfinite(out).all()
        assert steps == list(range(20))
        jumps = [j for j in range(1, len(den.seen)) if den.seen[j][0] > den.seen[j - 1][0] * 1.5]
        assert len(jumps) == 1
        sigma, x = den.seen[jumps[0]]
        assert sigma / (1 - sigma if flow else 1.0) == pytest.approx(2.0, rel=0.25)
        alpha = 1 - sigma if flow else 1.0
        mu = den.mu_u + den.cfg * (den.mu_c - den.mu_u)
        zs.append(((x - alpha * mu) / (alpha ** 2 * den.s2 + sigma ** 2) ** 0.5).flatten())
        final.append(((out - mu) / den.s2 ** 0.5).flatten())
    z = torch.cat(zs)
    assert abs(z.mean().item()) < 0.05
    assert abs(z.std().item() - 1) < 0.03
    # and the samples end distributed as the data, N(mu, s^2), up to the schedule's discretisation
    f = torch.cat(final)
    assert abs(f.mean().item()) < 0.05
    assert abs(f.std().item() - 1) < 0.1


# ------------------------------------------------------------------------------------------------ noise
STOCHASTIC = [
    ("euler_ancestral_cfg_pp", 10, {}),
    ("dpmpp_2s_ancestral_cfg_pp", 10, {}),
    ("restart", 20, {}),
    ("dpm_fast", 10, {"eta": 1.0}),
    ("dpm_adaptive", 10, {"eta": 1.0}),
]


@pytest.mark.parametrize("model", O.MODELS)
@pytest.mark.parametrize("name,steps,options", STOCHASTIC)
def test_stochastic_samplers_are_reproducible_from_the_seed(name, steps, options, model):
    sigmas = oracle_sigmas(model, "karras", steps)
    den = Unguided(model) if "cfg_pp" in name else None
    a = run(name, model, sigmas, den, seed=7, **options)
    b = run(name, model, sigmas, Unguided(model) if den is not None else None, seed=7, **options)
    c = run(name, model, sigmas, Unguided(model) if den is not None else None, seed=8, **options)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3


def test_every_sampler_reports_each_step():
    sigmas = oracle_sigmas("sd1_eps", "karras")
    for name in ("euler_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpm_fast", "restart"):
        seen = []
        run(name, "sd1_eps", sigmas, callback=lambda i, x, d, s: seen.append(i))
        assert seen == list(range(len(seen))) and len(seen) >= 4, name
