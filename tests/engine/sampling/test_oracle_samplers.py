"""Every sampler against ComfyUI 0.3.64's own final latents on the oracle's analytic problem: 27 samplers x 6
schedules x (SD1 epsilon, SD3 flow), within 1e-4 max abs in float32."""

import pytest
import torch

from imagesmith.engine.sampling.base import SamplerContext
from imagesmith.engine.sampling.k_multistep import SAMPLERS as MULTI
from imagesmith.engine.sampling.k_single import SAMPLERS as SINGLE
from fixtures import sampling_oracle as O

KSAMPLERS = {**SINGLE, **MULTI}


@pytest.mark.parametrize("key", O.sampler_cases())
def test_sampler_matches_comfyui(key):
    model, _schedule, _steps, name = key.split("|")
    assert name in KSAMPLERS, f"sampler {name} is missing"
    sigmas = O.sigmas_used(key)
    denoiser = O.AnalyticDenoiser(model)
    ctx = SamplerContext(model_sampling=O.model_sampling(model), seed=42)
    x = O.initial_noise() * sigmas[0]
    with torch.no_grad():
        out = KSAMPLERS[name](denoiser, x, sigmas, ctx)
    expected = O.expected_final(key)
    err = (out - expected).abs().max().item()
    assert err <= 1e-4, f"{key}: max abs {err:.3g}"
