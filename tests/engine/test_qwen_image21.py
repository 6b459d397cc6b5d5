"""Qwen-Image 2.1 on a tiny model of the real classes (QwenImage21Transformer2DModel with its block-causal
attention and KV cache, the RGBA AutoencoderKLQwenImage21, a Qwen3-VL encoder with its vision tower and
Qwen3VLProcessor): the engine's sampling layer against diffusers' own QwenImage21Pipeline (a peer we did not write)
for the same noise, with and without condition pictures; what reaches the transformer step by step; how the probe
names the folder and a transformer file; the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from fixtures.tiny import build_qwen_image21
from imagesmith.core.errors import BadRequest, UnsupportedModel
from imagesmith.core.requests import GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import QWEN21_NOTE, probe

GRIDDED, GRID = "tiny-qwen-image-21-grid", [1.0, 0.82, 0.6, 0.35, 0.12]
Q21, OPAQUE, FILE, FILE_Q8, FILE_FP8 = ("tiny-qwen-image-21", "tiny-qwen-image-21-opaque", "qwen_image_21_tiny",
                                        "qwen-image-21-tiny-Q8_0", "qwen_image_21_tiny_fp8_e4m3fn")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("qwen21-home"))
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    build_qwen_image21(0).save_pretrained(ckpt / Q21, safe_serialization=True)
    opaque = build_qwen_image21(0)
    with torch.no_grad():  # its decoder's alpha driven to 1 everywhere: an opaque picture, as a real one mostly is
        opaque.vae.decoder.conv_out.bias[3] = 50.0
    opaque.save_pretrained(ckpt / OPAQUE, safe_serialization=True)
    graded = build_qwen_image21(0)
    graded.register_to_config(sample_sigmas=GRID)  # a model author's own sampling grid
    graded.save_pretrained(ckpt / GRIDDED, safe_serialization=True)
    from safetensors.torch import load_file, save_file
    state = {"model.diffusion_model." + k: v.contiguous()
             for k, v in load_file(str(ckpt / Q21 / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    from imagesmith.models.convert import META_CONFIGS  # 16-wide heads: their rotary axes come from the config
    cfg = json.loads((ckpt / Q21 / "transformer" / "config.json").read_text())
    meta = {META_CONFIGS: json.dumps({"transformer": {k: v for k, v in cfg.items() if not k.startswith("_")}})}
    save_file(state, str(ckpt / f"{FILE}.safetensors"), metadata=meta)
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()},
              str(ckpt / f"{FILE_FP8}.safetensors"), metadata=meta)
    from fixtures.tiny import write_gguf
    write_gguf(ckpt / f"{FILE_Q8}.gguf", state, "qwen_image", "Q8_0", meta)  # city96's layout
    return settings


@pytest.fixture(scope="module")
def engine(home):
    return Engine(home, device="cpu")


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.float32)


def _pipe(engine, name=Q21):
    return engine.pipeline(engine.checkpoint(name)).value


def _diffusers(pipe, req: GenerateRequest, **kw) -> np.ndarray:
    out = pipe(req.prompt, negative_prompt=req.negative_prompt or None, true_cfg_scale=req.cfg_scale,
               width=req.width, height=req.height, num_inference_steps=req.steps,
               generator=torch.Generator().manual_seed(req.seed), output_type="np", **kw).images[0]
    return np.round(out * 255)


def _condition(tmp_path, name="cond.png", size=(80, 48), colour=(200, 60, 40, 255)) -> str:
    im = Image.new("RGBA", size, colour)
    im.paste((20, 90, 200, 90), (8, 24, 40, 44))  # a half-transparent patch: the VAE reads alpha
    path = tmp_path / name
    im.save(path)
    return str(path)


def test_probe_names_the_folder_its_parts_and_a_transformer_file(home):
    ckpt = home.models_dir / "checkpoints"
    folder = probe(ckpt / Q21)
    assert (folder.kind, folder.arch, folder.native_size) == ("checkpoint", "qwen21", 1024)
    assert QWEN21_NOTE in folder.notes
    assert (probe(ckpt / Q21 / "transformer").arch, probe(ckpt / Q21 / "vae").kind) == ("qwen21", "vae")
    single = probe(ckpt / f"{FILE}.safetensors")
    assert (single.kind, single.arch, single.components) == ("checkpoint", "qwen21", ["transformer"])
    assert "Qwen-Image 2.1 transformer (2 blocks)" in single.notes
    index = json.loads((ckpt / Q21 / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"


def test_txt2img_equals_diffusers_qwen_image21_pipeline(engine):
    """Euler on the simple schedule is the flow-matching Euler step diffusers takes over the same e^mu-shifted
    sigmas; true CFG without a rescale; the VAE's per-channel statistics; RGBA out (a random decoder's alpha is
    not opaque, so the picture keeps it)."""
    req = GenerateRequest(prompt="a red apple on a wooden table", negative_prompt="blurry low quality image",
                          model=Q21, width=64, height=96, steps=4, cfg_scale=4.0, seed=7, sampler_name="euler",
                          scheduler="simple", noise="comfy")
    result = engine.generate(req)
    ours, theirs = _pixels(result), _diffusers(_pipe(engine), req)
    assert result.images[0].mode == "RGBA" and ours.shape == theirs.shape == (96, 64, 4)
    assert ours.std() > 5 and ours[..., 3].std() > 1
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()


def test_condition_pictures_equal_diffusers_and_change_the_picture(engine, tmp_path):
    """One and two condition pictures: read by Qwen3-VL in its picture slots and VAE-encoded (alpha included) as
    tokens before the target's, at the output's area in their own aspect (diffusers' output_resolution)."""
    one, two = _condition(tmp_path), _condition(tmp_path, "b.png", (48, 64), (30, 160, 60, 200))
    req = GenerateRequest(prompt="Picture 1 on a shelf", negative_prompt="blurry", model=Q21, width=64, height=64,
                          steps=3, cfg_scale=3.0, seed=11, sampler_name="euler", scheduler="simple", noise="comfy")
    pipe = _pipe(engine)
    plain = _pixels(engine.generate(req))
    with Image.open(one) as a, Image.open(two) as b:
        pictures = [a.copy(), b.copy()]
    for paths in ([one], [one, two]):
        ours = _pixels(engine.generate(req.model_copy(update={"edit_images": paths})))
        theirs = _diffusers(pipe, req, image=pictures[:len(paths)], output_resolution=64)
        assert np.abs(ours - theirs).max() <= 2, (len(paths), np.abs(ours - theirs).max())
        assert np.abs(ours - plain).mean() > 1  # the pictures are read


def test_the_text_and_pictures_are_computed_once_then_cached(engine, tmp_path):
    """The transformer's first call a side of CFG runs the whole sequence ("extract"); every later call only the
    target's tokens ("cached"); a second run starts its own cache."""
    pipe = _pipe(engine)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["kv_cache_mode"], kwargs["hidden_states"].shape[1],
                                             kwargs["encoder_hidden_states"].shape[1])), with_kwargs=True)
    req = GenerateRequest(prompt="a lamp", negative_prompt="dark", model=Q21, width=64, height=64, steps=3,
                          cfg_scale=4.0, seed=1, edit_images=[_condition(tmp_path)])
    try:
        engine.generate(req)
        first = list(seen)
        seen.clear()
        engine.generate(req.model_copy(update={"cfg_scale": 1.0}))
    finally:
        hook.remove()
    assert [m for m, _, _ in first] == ["extract", "extract"] + ["cached"] * 4  # cond, uncond; 3 steps
    assert all(tokens == first[0][1] for _, tokens, _ in first)  # the picture's tokens always there, target last
    assert [m for m, _, _ in seen] == ["extract", "cached", "cached"]  # one pass a step without CFG


def test_batch_of_different_prompts_gives_each_its_own_picture(engine):
    """Requests batched in one run: each text runs with its own rows and cache (padding one would move the
    target's rotary positions), so each picture is the one it gets alone."""
    reqs = [GenerateRequest(prompt=p, model=Q21, width=32, height=32, steps=2, seed=5, cfg_scale=1.0)
            for p in ("a cat", "an astronaut riding a horse on the moon")]
    together = engine.generate_many(reqs)
    alone = [engine.generate(r) for r in reqs]
    for t, a in zip(together, alone):
        assert np.abs(_pixels(t) - _pixels(a)).max() <= 1
    assert np.abs(_pixels(together[0]) - _pixels(together[1])).mean() > 1


def test_img2img_keeps_the_picture_at_low_strength(engine, tmp_path):
    """init_image is img2img's start on Qwen-Image 2.1 (its condition pictures are edit_images). A random VAE does
    not give a picture back, so "kept" is measured against its own round trip of the RGBA picture."""
    source = Image.new("RGBA", (64, 64), (200, 60, 40, 255))
    source.paste((20, 90, 200, 255), (8, 24, 40, 60))
    init = tmp_path / "in.png"
    source.save(init)
    req = GenerateRequest(prompt="a photo of a cat", model=Q21, init_image=str(init), width=64, height=64, steps=4,
                          seed=2, cfg_scale=1.0)
    low = _pixels(engine.generate(req.model_copy(update={"denoising_strength": 0.05})))
    high = _pixels(engine.generate(req.model_copy(update={"denoising_strength": 1.0})))
    vae = _pipe(engine).vae
    pixels = torch.from_numpy(np.asarray(source, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    trip = engine.vae_decode_tensor(vae, engine.vae_encode(vae, pixels))[0].permute(1, 2, 0).numpy() * 255
    assert trip.shape == low.shape == (64, 64, 4)
    assert np.abs(low - trip).mean() < 0.25 * np.abs(high - trip).mean()


def test_an_opaque_picture_comes_back_rgb_and_hires_fix_runs(engine):
    """A picture whose alpha is opaque everywhere is an ordinary RGB picture (JPEG-able, as every other model's);
    the hires fix re-encodes it (RGBA into the VAE) at sides in multiples of 32."""
    req = GenerateRequest(prompt="a red apple", model=OPAQUE, width=64, height=64, steps=2, seed=3, cfg_scale=1.0)
    image = engine.generate(req).images[0]
    assert image.mode == "RGB" and np.asarray(image, np.float32).std() > 5
    big = engine.generate(GenerateRequest.model_validate({**req.model_dump(), "hires": {
        "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_denoising_strength": 0.5}})).images[0]
    assert big.size == (96, 96) and big.mode == "RGB"


def test_transformer_files_take_the_rest_from_the_folder(engine):
    """Qwen-Image 2.1's transformer as one file (ComfyUI's prefix), in fp8 and as a Q8_0 GGUF beside a Qwen-Image
    2.1 folder: the folder's pixels (the fp8 and GGUF ones within their precision)."""
    req = GenerateRequest(prompt="a blue cup", model=Q21, width=32, height=32, steps=2, seed=4, cfg_scale=1.0)
    folder = _pixels(engine.generate(req))
    single = _pixels(engine.generate(req.model_copy(update={"model": FILE})))
    assert np.abs(folder - single).max() <= 1
    for name in (FILE_Q8, FILE_FP8):
        got = _pixels(engine.generate(req.model_copy(update={"model": name})))
        assert 0 < np.abs(folder - got).mean() < 3, (name, np.abs(folder - got).mean())


def test_the_transformer_config_is_read_off_the_real_shapes():
    """Qwen-Image 2.1's own transformer (diffusers' defaults: 32 blocks of 32 heads of 128, text 4096, a 3x SwiGLU),
    built empty: the config imagesmith reads off a file's shapes is the one it was built from."""
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel

    from imagesmith.models.loaders import _qwen21_transformer_config
    with init_empty_weights():
        model = QwenImage21Transformer2DModel()
    real = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    shapes = {"model.diffusion_model." + k: list(v.shape) for k, v in model.state_dict().items()}
    got = _qwen21_transformer_config(shapes)
    assert {k: got[k] for k in real if k != "eps"} == {k: v for k, v in real.items() if k != "eps"}


def test_a_transformer_file_with_heads_it_cannot_place_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from imagesmith.models.loaders import load_transformer_file
    from imagesmith.models.probe import read_header
    state = {k: torch.zeros(s) for k, s in {
        "img_in.weight": (32, 64), "txt_in.in_layer.weight": (32, 16), "txt_in.text_norm.weight": (16,),
        "proj_out.weight": (64, 32), "modulation.1.weight": (128, 32),
        "transformer_blocks.0.attn.norm_q.weight": (16,), "transformer_blocks.0.img_mlp.proj.weight": (96, 32),
        "transformer_blocks.0.img_mlp.gate_layer.weight": (96, 32)}.items()}
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    assert probe(path).arch == "qwen21"
    with pytest.raises(UnsupportedModel, match="16-wide heads"):
        load_transformer_file(path, "qwen21", read_header(path), torch.float32)


def test_refusals(engine, tmp_path):
    pic = _condition(tmp_path)
    with pytest.raises(BadRequest, match="multiples of 32"):
        engine.generate(GenerateRequest(prompt="x", model=Q21, width=48, height=32, steps=1))
    with pytest.raises(ValidationError, match="at most 3"):  # a 422 in the API
        GenerateRequest(prompt="x", model=Q21, width=32, height=32, steps=1, edit_images=[pic] * 4)
    with pytest.raises(Exception, match="ControlNet"):
        engine.generate(GenerateRequest(prompt="x", model=Q21, width=32, height=32, steps=1,
                                        controlnet=[{"model": "none", "image": pic}]))


def test_cli_lists_and_runs_it_with_a_condition_picture(home, tmp_path, capsys, monkeypatch):
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(capsys, "models", "list", "--kind", "checkpoint")
    assert code == 0
    rows = {line.split("│")[1].strip(): line.split("│")[4].strip() for line in out.splitlines() if "│" in line}
    assert rows[Q21] == "Qwen-Image 2.1 checkpoint" and rows[FILE] == "Qwen-Image 2.1 transformer"
    assert rows[FILE_Q8] == "Qwen-Image 2.1 transformer, GGUF Q8_0"
    assert rows[FILE_FP8] == "Qwen-Image 2.1 transformer, fp8 e4m3fn"
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "generate", "Picture 1 in the snow", "--model", Q21, "-W", "32", "-H", "32",
                             "--steps", "2", "--seed", "3", "--edit-image", _condition(tmp_path), "-o", str(out_dir))
    assert code == 0, err
    (png,) = out_dir.glob("*.png")
    with Image.open(png) as im:
        assert im.size == (32, 32) and im.mode == "RGBA" and "Model: " + Q21 in im.info.get("parameters", "")


def test_loras_in_diffusers_and_comfyui_formats(engine, home):
    """A Qwen-Image 2.1 LoRA (peft on the attention and the SwiGLU) saved by diffusers' own
    QwenImage21Pipeline.save_lora_weights, and the same weights in ComfyUI's layout (diffusion_model.*.lora_down /
    lora_up): both named Qwen-Image 2.1 by the probe (not Qwen-Image: the shapes differ), both change the picture
    the same way; weight 0 gives the base pixels."""
    from diffusers import QwenImage21Pipeline

    from fixtures.tiny import write_transformer_loras
    loras = home.models_dir / "loras"
    write_transformer_loras(QwenImage21Pipeline, _pipe(engine).transformer, ["to_q", "to_v", "img_mlp.gate_layer"],
                            loras, "q21")
    engine.registry.scan()
    assert probe(loras / "q21-peft.safetensors").arch == probe(loras / "q21-comfy.safetensors").arch == "qwen21"
    req = GenerateRequest(prompt="a red apple on a wooden table", model=Q21, width=32, height=32, steps=2, seed=1,
                          cfg_scale=1.0)
    base = _pixels(engine.generate(req))
    peft_out = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:q21-peft:1>"})))
    comfy_out = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:q21-comfy:1>"})))
    off = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:q21-peft:0>"})))
    assert np.abs(peft_out - base).mean() > 1
    assert np.abs(peft_out - comfy_out).max() <= 1
    assert np.abs(off - base).max() <= 1


def test_inpainting_repaints_the_hole_and_keeps_the_rest(engine, tmp_path):
    source = Image.new("RGB", (64, 64), (200, 60, 40))
    source.save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "m.png")
    for only_masked in (False, True):
        out = engine.generate(GenerateRequest(prompt="a cat", model=Q21, init_image=str(tmp_path / "in.png"),
                                              mask=str(tmp_path / "m.png"), denoising_strength=1.0, steps=3, seed=1,
                                              cfg_scale=1.0, inpaint_full_res=only_masked)).images[0]
        got = np.asarray(out.convert("RGB"), np.float32)
        kept = np.asarray(source, np.float32)
        assert out.size == (64, 64)
        assert np.abs(got - kept)[:8].mean() < 1 and np.abs(got - kept)[24:40, 24:40].mean() > 20


def test_the_authors_sampling_grid_is_the_automatic_schedule(engine):
    """A folder whose pipeline config carries the author's ``sample_sigmas``: with the schedule left to the model
    (A1111's 'Automatic', the default) imagesmith samples that grid, shifted for the size as diffusers does, its
    length the number of steps (the infotext says so), and equals diffusers' own default call; a named schedule
    gets imagesmith's sigmas for the requested steps."""
    req = GenerateRequest(prompt="a paper lantern", negative_prompt="dark", model=GRIDDED, width=64, height=64,
                          steps=20, cfg_scale=3.0, seed=5, sampler_name="euler", noise="comfy")
    pipe = _pipe(engine, GRIDDED)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        result = engine.generate(req)
        grid_calls = len(calls)
        calls.clear()
        engine.generate(req.model_copy(update={"scheduler": "simple", "steps": 3}))
    finally:
        hook.remove()
    assert grid_calls == 2 * len(GRID) and len(calls) == 2 * 3  # cond and uncond a step
    assert "Steps: 5," in result.records[0].infotext
    theirs = pipe(req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=3.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert np.abs(_pixels(result) - np.round(theirs * 255)).max() <= 2
