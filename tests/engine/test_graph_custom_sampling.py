"""ComfyUI's custom sampling nodes (KSamplerSelect, BasicScheduler, RandomNoise / DisableNoise, BasicGuider /
CFGGuider, SamplerCustomAdvanced, SamplerCustom): the same sampler, schedule, noise and guidance as a KSampler give
the KSampler's pixels (KSampler's own figures are checked against ComfyUI's in the sampler tests), and each part
acts as ComfyUI's does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagesmith.engine.generate import Engine

from fixtures.graph import graph_runner
from fixtures.tiny import home_with

BASE = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a table", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
    "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "cs"}},
}


def ksampler(seed=3, steps=4, cfg=6.0, sampler="euler", scheduler="karras", denoise=1.0, latent=("4", 0)):
    return {**BASE, "9": {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise,
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": list(latent)}}}


def custom(seed=3, steps=4, cfg=6.0, sampler="euler", scheduler="karras", denoise=1.0, latent=("4", 0),
           guider="CFGGuider", noise="RandomNoise", output=0):
    prompt = {**BASE,
              "20": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
              "21": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": scheduler,
                                                                "steps": steps, "denoise": denoise}},
              "22": ({"class_type": "RandomNoise", "inputs": {"noise_seed": seed}} if noise == "RandomNoise"
                     else {"class_type": "DisableNoise", "inputs": {}}),
              "23": ({"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                            "negative": ["3", 0], "cfg": cfg}}
                     if guider == "CFGGuider" else
                     {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["2", 0]}}),
              "9": {"class_type": "SamplerCustomAdvanced", "inputs": {
                  "noise": ["22", 0], "guider": ["23", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
                  "latent_image": list(latent)}}}
    prompt["10"] = {"class_type": "VAEDecode", "inputs": {"samples": ["9", output], "vae": ["1", 2]}}
    return prompt


@pytest.fixture(scope="module")
def run(tiny_home, tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("custom-sampling")
    Image.fromarray((np.indices((64, 64)).sum(0) * 3 % 255).astype(np.uint8)).convert("RGB").save(root / "in.png")
    engine = Engine(home_with(tmp_path_factory.mktemp("cs-home"), tiny_home, "checkpoints/tiny-sd15"), device="cpu")
    return graph_runner(engine, root, ["in.png"])


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("sampler, scheduler", [("euler", "karras"), ("dpmpp_2m", "normal"),
                                                ("euler_ancestral", "simple")])
def test_custom_sampling_is_the_ksampler_split_in_parts(run, sampler, scheduler):
    assert _diff(run(custom(sampler=sampler, scheduler=scheduler)), run(ksampler(sampler=sampler,
                                                                                 scheduler=scheduler))) == 0


def test_basic_guider_is_cfg_one_and_the_seed_and_noise_matter(run):
    assert _diff(run(custom(guider="BasicGuider")), run(ksampler(cfg=1.0))) == 0
    plain = run(custom())
    assert _diff(run(custom(seed=4)), plain) > 4
    silent = run(custom(noise="DisableNoise"))  # no noise added: the empty latent denoised as it is
    assert _diff(silent, plain) > 4 and silent.std() < plain.std()


def test_denoise_on_an_encoded_picture_and_the_denoised_output(run):
    enc = {"30": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
           "31": {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}}
    a = run({**custom(denoise=0.5, latent=("31", 0)), **enc})
    b = run({**ksampler(denoise=0.5, latent=("31", 0)), **enc})
    assert _diff(a, b) == 0
    # the last step's x0 estimate: on a schedule that ends at 0 it is the output itself
    assert _diff(run(custom(output=1)), run(custom(output=0))) <= 1


def test_clip_text_encode_flux_is_clip_text_encode_with_guidance(tiny_home, tmp_path):
    """CLIPTextEncodeFlux with the same prompt for CLIP-L and T5 and guidance 3.5 is CLIPTextEncode + FluxGuidance
    3.5, pixel for pixel; another T5 prompt gives another picture."""
    engine = Engine(home_with(tmp_path / "home", tiny_home, "checkpoints/tiny-flux"), device="cpu")
    run = graph_runner(engine, tmp_path, [])

    def graph(encode: dict) -> dict:
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-flux"}},
                **encode,
                "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "9": {"class_type": "KSampler", "inputs": {
                    "seed": 2, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1,
                    "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
                "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
                "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "f"}}}
    text = "a red apple on a wooden table"
    pipe = engine.pipeline(engine.checkpoint("tiny-flux")).value
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (kw["encoder_hidden_states"].clone(), kw["pooled_projections"].clone())), with_kwargs=True)
    try:
        plain = run(graph({"2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
                           "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0],
                                                                          "guidance": 3.5}}}))
        seen.clear()
        both = run(graph({"3": {"class_type": "CLIPTextEncodeFlux", "inputs": {
            "clip": ["1", 1], "clip_l": text, "t5xxl": text, "guidance": 3.5}}}))
        same_t5, same_pooled = seen[0]
        seen.clear()
        run(graph({"3": {"class_type": "CLIPTextEncodeFlux", "inputs": {
            "clip": ["1", 1], "clip_l": text, "t5xxl": "a blue teapot in the snow at night", "guidance": 3.5}}}))
        other_t5, other_pooled = seen[0]
    finally:
        hook.remove()
    assert _diff(plain, both) == 0
    # the T5 prompt is the tokens' (another one: other tokens), the CLIP-L prompt the pooled vector's (the same)
    assert not torch.equal(other_t5, same_t5) and torch.equal(other_pooled, same_pooled)


def test_image_composite_masked_pastes_through_the_mask():
    """ComfyUI's ImageCompositeMasked: the source at (x, y), through the mask where given, clipped at the edges;
    resize_source scales it to the destination first."""
    from imagesmith.engine.graph.nodes import _image_composite_masked
    dest = torch.zeros(1, 8, 8, 3)
    src = torch.ones(1, 4, 4, 3)
    out = _image_composite_masked(None, dest, src, 2, 3, False)[0]
    assert out[0, 3:7, 2:6].min() == 1 and out.sum() == 16 * 3
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1  # only the source's left half
    half = _image_composite_masked(None, dest, src, 6, 0, False, mask)[0]
    assert half[0, :4, 6:8].min() == 1 and half.sum() == 8 * 3  # its left half, the rest beyond the edge
    whole = _image_composite_masked(None, dest, src, 0, 0, True)[0]
    assert whole.min() == 1  # scaled to the destination
