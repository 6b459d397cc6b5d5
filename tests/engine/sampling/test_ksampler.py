"""ComfyUI's KSampler / KSamplerAdvanced semantics of the sampling layer, on the oracle's analytic denoiser:
denoise, start/end steps with and without leftover noise, the noise mask, the noise modes, and bad input."""

import pytest
import torch

from imagesmith.core.errors import BadRequest
from imagesmith.engine.sampling import ksampler as K
from imagesmith.engine.sampling.schedules import make_sigmas
from fixtures import sampling_oracle as O

MS = O.model_sampling("sd1_eps")


def test_denoise_takes_the_tail_of_a_longer_schedule():
    full = make_sigmas("karras", MS, 40)
    got = K.plan_sigmas(MS, "euler", "karras", 20, denoise=0.5)
    assert torch.equal(got, full[-21:])
    # int(steps / denoise) as ComfyUI: 10 / 0.3 -> 33 steps, the last 11 sigmas
    assert torch.equal(K.plan_sigmas(MS, "euler", "normal", 10, denoise=0.3), make_sigmas("normal", MS, 33)[-11:])


def test_samplers_that_discard_the_penultimate_sigma():
    plain = make_sigmas("karras", MS, 11)
    got = K.plan_sigmas(MS, "dpm_2", "karras", 10)
    assert len(got) == 11 and torch.equal(got, torch.cat([plain[:-2], plain[-1:]]))


def test_a1111_img2img_enters_the_schedule_late():
    full = K.plan_sigmas(MS, "euler", "karras", 20)
    assert torch.equal(K.a1111_img2img_sigmas(MS, "euler", "karras", 20, 0.5), full[9:])  # 11 steps
    assert torch.equal(K.a1111_img2img_sigmas(MS, "euler", "karras", 20, 1.0), full)
    assert len(K.a1111_img2img_sigmas(MS, "euler", "karras", 20, 0.01)) == 2  # at least one step


def test_start_end_and_leftover_noise_hand_off():
    """SDXL base -> refiner: the base stops at step 15 keeping its noise, the refiner starts there; together
    they equal one uninterrupted run (Euler is deterministic)."""
    sigmas = K.plan_sigmas(MS, "euler", "karras", 20)
    den = O.AnalyticDenoiser("sd1_eps")
    noise = O.initial_noise()
    whole = K.sample(den, MS, "euler", sigmas, noise=noise, seed=1)
    base = K.clip_steps(sigmas, start_at_step=0, end_at_step=15, return_with_leftover_noise=True)
    assert len(base) == 16 and base[-1] > 0
    half = K.sample(den, MS, "euler", base, noise=noise, seed=1)
    rest = K.clip_steps(sigmas, start_at_step=15, end_at_step=10000)
    done = K.sample(den, MS, "euler", rest, noise=noise, latent=half, seed=1, add_noise=False)
    assert (done - whole).abs().max() < 1e-4
    # without leftover noise the base ends on 0: a finished (different) picture
    forced = K.clip_steps(sigmas, end_at_step=15)
    assert forced[-1] == 0
    with pytest.raises(BadRequest, match="start_at_step"):
        K.clip_steps(sigmas, start_at_step=5, end_at_step=5)


def test_the_noise_mask_keeps_the_unmasked_latent():
    den = O.AnalyticDenoiser("sd1_eps")
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    sigmas = K.plan_sigmas(MS, "dpmpp_2m", "karras", 10, denoise=0.6)
    out = K.sample(den, MS, "dpmpp_2m", sigmas, noise=O.initial_noise(), latent=latent, seed=1, denoise_mask=mask)
    assert torch.allclose(out[..., 4:], latent[..., 4:], atol=1e-5)
    assert (out[..., :4] - latent[..., :4]).abs().mean() > 0.1


def test_noise_modes():
    shape = (2, 4, 8, 8)
    comfy = K.initial_noise("comfy", shape, [5, 6])
    assert torch.equal(comfy, torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    a1111 = K.initial_noise("a1111-cpu", shape, [5, 6])
    assert torch.equal(a1111[1], torch.randn(shape[1:], generator=torch.Generator().manual_seed(6)))
    big = K.initial_noise("comfy", shape, [2 ** 64 - 1])  # 64-bit seeds
    assert torch.isfinite(big).all()
    with pytest.raises(BadRequest, match="CUDA"):
        K.initial_noise("a1111-gpu", shape, [5, 6], device="cpu")
    with pytest.raises(BadRequest, match="unknown noise"):
        K.initial_noise("philox", shape, [1])


def test_a1111_ancestral_noise_without_ensd_repeats_the_initial_noise():
    """A1111's known quirk, kept for fidelity: with ENSD 0 the first ancestral draw of image i is the noise its
    seed drew at the start (which is why NovelAI users set ENSD 31337)."""
    x = torch.zeros(2, 4, 8, 8)
    first = K.a1111_noise_sampler(x, [5, 6])(None, None)
    assert torch.equal(first, K.initial_noise("a1111-cpu", (2, 4, 8, 8), [5, 6]))
    shifted = K.a1111_noise_sampler(x, [5, 6], eta_noise_seed_delta=31337)(None, None)
    assert torch.equal(shifted[0], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5 + 31337)))


@pytest.mark.parametrize("steps,denoise,needle", [(0, None, "steps"), (10, 0.0, "denoise"), (10, 1.5, "denoise")])
def test_bad_ranges(steps, denoise, needle):
    with pytest.raises(BadRequest, match=needle):
        K.plan_sigmas(MS, "euler", "karras", steps, denoise=denoise)


def test_a_0d_sigma_stays_a_scalar_beside_latents_on_any_device():
    """Samplers keep sigmas as 0-d CPU tensors while the latents sit on the GPU; a 0-d tensor broadcasts from
    the CPU, a [1, 1, 1, 1] one does not. The H200 run that found this: benchmarks/results/gpu_modes.json."""
    from imagesmith.engine.sampling.base import append_dims, to_d
    from imagesmith.engine.sampling.model_sampling import _append_dims
    sigma = torch.tensor(2.5)
    assert append_dims(sigma, 4).shape == () and _append_dims(sigma, 4).shape == ()
    assert append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    x, d = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(to_d(x, sigma, d), (x - d) / 2.5)
    assert torch.allclose(to_d(x, sigma * torch.ones(2), d), (x - d) / 2.5)


def test_brownian_increments_come_back_where_the_latents_are():
    from imagesmith.engine.sampling.noise import brownian_noise_sampler
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    draw = brownian_noise_sampler(x, 0.1, 10.0, [1, 2])
    w = draw(torch.tensor(5.0), torch.tensor(4.0))
    assert w.shape == x.shape and w.device == x.device and w.std() > 0.5
