"""The engine on the sampling layer, end to end on the tiny SD1.5 model: the same image as a plain diffusers
pipeline where the algorithms coincide, reproducible stochastic samplers, the noise modes, img2img's two
meanings of strength, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine


def psnr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def req(**kw) -> GenerateRequest:
    base = dict(prompt="a red apple", model="tiny-sd15", width=64, height=64, steps=12, seed=7, cfg_scale=5)
    base.update(kw)
    return GenerateRequest(**base)


@pytest.mark.parametrize("sampler,schedule,cls,kwargs", [
    ("Euler", "normal", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "zero"}),
])
def test_same_image_as_plain_diffusers(engine, tiny_models, sampler, schedule, cls, kwargs):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_models.paths["tiny-sd15"]), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **kwargs)
    ours = engine.generate(req(sampler_name=sampler, scheduler=schedule, noise="comfy")).images[0]
    cond, uncond = engine.prompt_encoder.encode_pair_sd("a red apple", "", pipe.tokenizer, pipe.text_encoder,
                                                         model_key="e2e")
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=12,
                  guidance_scale=5, width=64, height=64).images[0]
    assert psnr(ours, theirs) >= 45


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "dpm_2_ancestral",
                                     "er_sde", "sa_solver", "lcm", "seeds_2"])
@pytest.mark.parametrize("noise", ["a1111-cpu", "comfy"])
def test_stochastic_samplers_are_reproducible_from_the_seed(engine, sampler, noise):
    a = engine.generate(req(sampler_name=sampler, steps=6, noise=noise)).images[0]
    torch.manual_seed(1234)  # the global RNG must not matter
    b = engine.generate(req(sampler_name=sampler, steps=6, noise=noise)).images[0]
    c = engine.generate(req(sampler_name=sampler, steps=6, noise=noise, seed=8)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert psnr(a, c) < 40


def test_dpmpp_sde_is_reproducible_across_processes(tiny_home, engine):
    """Diffusers' SDE scheduler seeded its Brownian tree from torch's global state: three CLI runs gave three
    images. Two fresh processes must now agree bit for bit."""
    code = ("import sys, numpy as np; from imagesmith.engine.generate import Engine; "
            "from imagesmith.core.requests import GenerateRequest; from imagesmith.core.settings import Settings; "
            f"s = Settings(home=r'{tiny_home.home}'); "
            "r = Engine(s, device='cpu').generate(GenerateRequest(prompt='a red apple', model='tiny-sd15', width=64,"
            " height=64, steps=6, seed=7, cfg_scale=5, sampler_name='DPM++ SDE', scheduler='Karras')); "
            "sys.stdout.write(np.asarray(r.images[0]).tobytes().hex())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    here = engine.generate(req(sampler_name="DPM++ SDE", scheduler="Karras", steps=6)).images[0]
    assert outs[0] == outs[1] == np.asarray(here).tobytes().hex()


def test_comfy_noise_draws_once_over_the_batch(engine):
    batch = engine.generate(req(batch_size=2, noise="comfy", sampler_name="Euler"))
    alone = engine.generate(req(noise="comfy", sampler_name="Euler")).images[0]
    # image 0 of a ComfyUI batch is the first half of one draw: the single image's noise
    assert psnr(batch.images[0], alone) >= 45
    # image 1 is not seed + 1 (A1111's way)
    a1111 = engine.generate(req(seed=8, sampler_name="Euler", noise="comfy")).images[0]
    assert psnr(batch.images[1], a1111) < 40
    assert "Noise: comfy" in batch.records[0].infotext and "RNG:" not in batch.records[0].infotext
    # ComfyUI's seed is the run's: both images of the batch record it
    assert [r.seed for r in batch.records] == [7, 7]
    assert "RNG: CPU" in engine.generate(req(sampler_name="Euler")).records[0].infotext  # A1111's key


def test_img2img_strength_a1111_and_comfy(engine, tmp_path):
    init = engine.generate(req(sampler_name="Euler", steps=8)).images[0]
    path = tmp_path / "init.png"
    init.save(path)
    runs = {}
    for noise in ("a1111-cpu", "comfy"):
        steps = []
        engine.generate(req(init_image=str(path), denoising_strength=0.5, steps=20, sampler_name="Euler",
                            noise=noise), progress=lambda e: steps.append(e.step))
        runs[noise] = len(steps)
    # A1111 runs int(0.5 * 20) + 1 = 11 steps of the 20-step schedule; ComfyUI the last 20 of a 40-step one
    assert runs == {"a1111-cpu": 11, "comfy": 20}


@pytest.mark.parametrize("field,value,needle", [
    ("sampler_name", "fancy", "unknown sampler 'fancy'"),
    ("scheduler", "fancy", "unknown schedule 'fancy'"),
    ("steps", 0, "steps"),
    ("seed", 2 ** 64, "seed"),
    ("noise", "gpu", "noise"),
])
def test_bad_sampling_input_is_refused_at_the_edge(field, value, needle):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match=needle):
        req(**{field: value})


def test_a_combination_that_cannot_work_is_refused(engine):
    with pytest.raises(BadRequest, match="flow"):
        from imagesmith.core.sampling_names import resolve_sampling
        resolve_sampling("PLMS", "karras", flow=True)
    with pytest.raises(BadRequest, match="CUDA"):
        engine.generate(req(noise="a1111-gpu"))


def test_every_sampler_with_every_schedule_runs_on_sd15(engine):
    from imagesmith.core.sampling_names import SAMPLER_NAMES, SCHEDULE_NAMES
    seen = set()
    for i, s in enumerate(SAMPLER_NAMES):
        sched = SCHEDULE_NAMES[1 + i % (len(SCHEDULE_NAMES) - 1)].name  # every schedule used at least once
        r = engine.generate(req(sampler_name=s.name, scheduler=sched, steps=4))
        assert f"Sampler: {s.label}, Schedule type: " in r.records[0].infotext
        arr = np.asarray(r.images[0])
        assert arr.std() > 1, (s.name, sched)  # a picture, not a flat field
        seen.add(sched)
    assert len(seen) == len(SCHEDULE_NAMES) - 1


def test_each_sampler_name_runs_its_own_algorithm(engine):
    """On one schedule every sampler in the list makes its own latents, except the pairs that are one algorithm by
    definition (ComfyUI's DDIM is Euler; DDIM CFG++ is Euler CFG++; they differ only in their default schedule):
    a name wired to another sampler's function fails here. Each function's numbers are ComfyUI's (test_oracle)."""
    from imagesmith.core.sampling_names import SAMPLER_NAMES
    # the only names expected to give the same numbers here; A1111's Restart adds its restarts from 20 steps on
    same = {"ddim": "euler", "ddim_cfg_pp": "euler_cfg_pp", "restart": "heun"}
    latents = {s.name: engine.generate(req(sampler_name=s.name, scheduler="karras", steps=6)).latents
               for s in SAMPLER_NAMES}
    for name, twin in same.items():
        assert torch.equal(latents[name], latents[twin]), (name, twin)
    distinct = [n for n in latents if n not in same]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            assert not torch.allclose(latents[a], latents[b], atol=1e-6), (a, b)
    assert len(distinct) >= 35
    at20 = {n: engine.generate(req(sampler_name=n, scheduler="karras", steps=20)).latents for n in ("heun", "restart")}
    assert not torch.allclose(at20["heun"], at20["restart"], atol=1e-6)


def test_the_result_carries_the_latents_before_the_vae(engine):
    r = engine.generate(req(batch_size=2, batch_count=2, sampler_name="Euler", steps=4))
    assert tuple(r.latents.shape) == (4, 4, 8, 8)
    vae = engine._pipeline_entry(engine.registry.get("tiny-sd15", "checkpoint")).value.vae
    again = engine._vae_decode(vae, r.latents[3:4])[0]
    assert np.array_equal(np.asarray(again), np.asarray(r.images[3]))


def test_cfg_rescale():
    from imagesmith.engine.sampling.denoisers import rescaled_cfg
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([3.0, 0.5])
    # phi 0 is plain CFG in x0 space
    assert torch.allclose(rescaled_cfg(x, sigma, c, u, 7.0, 0.0), u + 7.0 * (c - u), atol=1e-4)
    # phi 1: the guided v has the conditional v's standard deviation, per image
    out = rescaled_cfg(x, sigma, c, u, 7.0, 1.0)
    s = sigma.reshape(-1, 1, 1, 1)
    root, xs = (s ** 2 + 1) ** 0.5, x / (s ** 2 + 1)
    v_out, v_c = (xs - out) * root / s, (xs - c) * root / s
    assert torch.allclose(v_out.std(dim=(1, 2, 3)), v_c.std(dim=(1, 2, 3)), rtol=1e-4)


def test_cfg_rescale_in_the_engine(engine):
    plain = engine.generate(req(sampler_name="Euler", cfg_scale=9))
    zero = engine.generate(req(sampler_name="Euler", cfg_scale=9, cfg_rescale=0.0))
    some = engine.generate(req(sampler_name="Euler", cfg_scale=9, cfg_rescale=0.7))
    assert torch.equal(plain.latents, zero.latents)
    # the tiny random model's guidance is weak, so the change is small, but it is there (measured: 0.72 %)
    change = ((some.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert change > 0.003 and "CFG rescale: 0.7" in some.records[0].infotext


def test_v_prediction_denoised_is_x0():
    """The v-prediction parameterisation (Salimans & Ho 2022) in the variance-exploding view: from x0 and noise,
    build x and the true v; the model sampling must give x0 back exactly."""
    from imagesmith.engine.sampling.model_sampling import DiscreteModelSampling
    ms = DiscreteModelSampling.scaled_linear(prediction="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([7.0, 0.3])
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sig_vp = 1 / (1 + s ** 2) ** 0.5, s / (1 + s ** 2) ** 0.5
    v = alpha * eps - sig_vp * x0
    assert torch.allclose(ms.denoised(sigma, v, x0 + s * eps), x0, atol=1e-5)


def test_v_prediction_model_same_image_as_diffusers(engine, tiny_models):
    """An SD2-style v-prediction model (the tiny SD1.5 weights with a v-prediction scheduler config) through the
    engine and through diffusers' pipeline with Euler: the same picture."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_models.paths["tiny-sd15"]), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                                                  timestep_spacing="linspace")
    engine.adopt("tiny-vpred", pipe, "sd2")
    ours = engine.generate(req(model="tiny-vpred", sampler_name="Euler", scheduler="normal", noise="comfy"))
    cond, uncond = engine.prompt_encoder.encode_pair_sd("a red apple", "", pipe.tokenizer, pipe.text_encoder,
                                                         model_key="vpred")
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=12,
                  guidance_scale=5, width=64, height=64).images[0]
    assert psnr(ours.images[0], theirs) >= 45
    eps_model = engine.generate(req(sampler_name="Euler", scheduler="normal", noise="comfy")).images[0]
    assert psnr(ours.images[0], eps_model) < 40  # the prediction type was honoured, not ignored


def test_samplers_command_lists_every_sampler_and_schedule(capsys):
    import json

    from imagesmith.cli import main
    try:
        main(["samplers", "--json"])
    except SystemExit as exc:
        assert not exc.code
    data = json.loads(capsys.readouterr().out)
    names = {s["name"]: s for s in data["samplers"]}
    assert len(names) == 41 and all(s["implemented"] for s in names.values())
    assert names["dpmpp_2m"]["label"] == "DPM++ 2M" and names["dpmpp_2m"]["automatic_schedule"] == "karras"
    assert names["plms"]["flow_models"] is False and names["euler"]["flow_models"] is True
    assert [s["name"] for s in data["schedules"]][:2] == ["automatic", "normal"] and len(data["schedules"]) == 13


def test_an_fp16_vae_that_asks_for_upcasting_runs_in_fp32_and_goes_back(engine):
    """SDXL's VAE overflows in fp16 (force_upcast in its config): decode and encode run in fp32, and the shared
    module is fp16 again afterwards."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, force_upcast=True).to(torch.float16)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    images = engine._vae_decode(vae, torch.randn(1, 4, 8, 8))
    assert seen == [torch.float32] and vae.dtype == torch.float16 and images[0].size == (8, 8)
    latent = engine._vae_encode(vae, images)
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all() and vae.dtype == torch.float16
