"""Qwen-Image and Qwen-Image-Edit on tiny models of the real classes (QwenImageTransformer2DModel, the 3-D
AutoencoderKLQwenImage, a Qwen2.5-VL text encoder with its vision tower): the engine's sampling layer against
diffusers' own QwenImagePipeline / QwenImageEditPipeline (peers we did not write) for the same noise, what reaches
the transformer, how the probe names the folders, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.tiny import build_qwen_image
from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.probe import QWEN_EDIT_NOTE, probe

QWEN, EDIT, PLUS = "tiny-qwen-image", "tiny-qwen-image-edit", "tiny-qwen-image-edit-plus"
# transformer-only files as ComfyUI's models/diffusion_models and city96's GGUFs hold them (model.diffusion_model.
# names); the edit ones are told by their file names, as the real downloads are
FILE, FILE_FP8, FILE_Q8, FILE_EDIT = ("qwen_image_tiny", "qwen_image_tiny_fp8_e4m3fn", "qwen-image-tiny-Q8_0",
                                      "qwen_image_edit_2509_tiny")


@pytest.fixture(scope="module")
def qwen_home(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("qwen-home"))
    settings.ensure_home()
    ckpt = settings.models_dir / "checkpoints"
    for name, edit in ((QWEN, None), (EDIT, "edit"), (PLUS, "plus")):
        build_qwen_image(0, edit=edit).save_pretrained(ckpt / name, safe_serialization=True)
    from safetensors.torch import load_file, save_file

    from fixtures.tiny import write_gguf
    from imagesmith.models.convert import META_CONFIGS
    state = {"model.diffusion_model." + k: v.contiguous()
             for k, v in load_file(str(ckpt / QWEN / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    cfg = json.loads((ckpt / QWEN / "transformer" / "config.json").read_text())
    meta = {META_CONFIGS: json.dumps({"transformer": {k: v for k, v in cfg.items() if not k.startswith("_")}})}
    save_file(state, str(ckpt / f"{FILE}.safetensors"), metadata=meta)
    save_file(state, str(ckpt / f"{FILE_EDIT}.safetensors"), metadata=meta)
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()},
              str(ckpt / f"{FILE_FP8}.safetensors"), metadata=meta)
    write_gguf(ckpt / f"{FILE_Q8}.gguf", state, "qwen_image", "Q8_0", meta)
    return settings


@pytest.fixture(scope="module")
def engine(qwen_home):
    return Engine(qwen_home, device="cpu")


def _picture(colour=(200, 60, 40)) -> Image.Image:
    im = Image.new("RGB", (64, 48), colour)
    im.paste((20, 90, 200), (8, 24, 40, 44))
    return im


def _file(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.float32)


def _capture(engine, name):
    pipe = engine.pipeline(engine.checkpoint(name)).value
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append({"hidden_states": kwargs["hidden_states"].clone(),
                                             "img_shapes": kwargs["img_shapes"],
                                             "text": kwargs["encoder_hidden_states"].clone()}), with_kwargs=True)
    return seen, hook


def test_probe_names_qwen_image_and_the_edit_models(qwen_home):
    ckpt = qwen_home.models_dir / "checkpoints"
    plain, edit, plus = (probe(ckpt / n) for n in (QWEN, EDIT, PLUS))
    assert (plain.arch, plain.kind, plain.native_size) == ("qwen", "checkpoint", 1328)
    assert QWEN_EDIT_NOTE not in plain.notes
    assert edit.arch == plus.arch == "qwen" and QWEN_EDIT_NOTE in edit.notes and QWEN_EDIT_NOTE in plus.notes
    assert probe(ckpt / QWEN / "transformer").arch == "qwen"
    assert probe(ckpt / QWEN / "vae").kind == "vae"


def test_txt2img_equals_diffusers_qwen_image_pipeline(engine):
    """Euler on the simple schedule is the flow-matching Euler step diffusers' pipeline takes, over the same
    e^mu-shifted sigmas; true CFG with its per-token norm rescale; the VAE's per-channel latent statistics."""
    req = GenerateRequest(prompt="a red apple on a wooden table", negative_prompt="blurry low quality image",
                          model=QWEN, width=64, height=48, steps=4, cfg_scale=4.0, seed=7, sampler_name="euler",
                          scheduler="simple", noise="comfy")
    ours = _pixels(engine.generate(req))
    pipe = engine.pipeline(engine.checkpoint(QWEN)).value
    theirs = pipe(req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=4.0, width=64, height=48,
                  num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    theirs = np.round(theirs * 255)
    assert ours.std() > 5  # a picture, not a flat field
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()


@pytest.mark.parametrize("tokens, steps", [(12, 4), (4096, 20), (1024, 50)])
def test_the_schedule_is_diffusers_stretched_to_its_terminal(tokens, steps):
    """Qwen-Image's scheduler stretches its sigmas so the last before 0 is shift_terminal (0.02): the simple
    schedule on the same e^mu shift equals diffusers' FlowMatchEulerDiscreteScheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from imagesmith.engine.sampling.ksampler import plan_sigmas
    from imagesmith.engine.sampling.model_sampling import FlowModelSampling
    peer = FlowMatchEulerDiscreteScheduler.from_pretrained(
        Path(__file__).resolve().parents[2] / "src/imagesmith/models/configs/qwen-image/scheduler")
    assert peer.config.shift_terminal == 0.02  # the shipped config is Qwen-Image's own
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    peer.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = plan_sigmas(FlowModelSampling(mu=float(mu), multiplier=1.0, timesteps=10000, shift_terminal=0.02),
                       "euler", "simple", steps)
    assert abs(float(ours[-2]) - 0.02) < 1e-6 and float(ours[-1]) == 0.0
    assert torch.allclose(ours, peer.sigmas, atol=1e-6)
    plain = plan_sigmas(FlowModelSampling(mu=float(mu), multiplier=1.0, timesteps=10000), "euler", "simple", steps)
    assert float(plain[-2]) > 0.02 + 1e-3  # without it the schedule stops short of the terminal


def test_cfg_one_is_a_single_pass_and_the_negative_matters_otherwise(engine):
    base = GenerateRequest(prompt="a teapot in the garden at night", model=QWEN, width=32, height=32, steps=2,
                           seed=3, cfg_scale=1.0)
    seen, hook = _capture(engine, QWEN)
    try:
        engine.generate(base)
        assert len(seen) == 2  # one pass a step, no negative
        seen.clear()
        a = _pixels(engine.generate(base.model_copy(update={"cfg_scale": 4.0, "negative_prompt": "a cat"})))
        assert len(seen) == 4  # cond and uncond a step
    finally:
        hook.remove()
    b = _pixels(engine.generate(base.model_copy(update={"cfg_scale": 4.0, "negative_prompt": "a box, an apple"})))
    assert np.abs(a - b).mean() > 0.5


def test_batch_of_prompts_with_different_lengths_pads_and_masks_the_text(engine):
    """Two requests batched in one run: the shorter text is padded and masked, so each image is its request's own
    (the same as run alone)."""
    reqs = [GenerateRequest(prompt=p, model=QWEN, width=32, height=32, steps=2, seed=5, cfg_scale=1.0)
            for p in ("a cat", "an astronaut riding a horse on the moon")]
    together = engine.generate_many(reqs)
    alone = [engine.generate(r) for r in reqs]
    for t, a in zip(together, alone):
        assert np.abs(_pixels(t) - _pixels(a)).max() <= 1


def test_img2img_keeps_the_picture_at_low_strength(engine, tmp_path):
    """A random VAE does not give a picture back, so "kept" is measured against its own round trip of it."""
    init = _file(tmp_path, _picture(), "in.png")
    req = GenerateRequest(prompt="a photo of a cat", model=QWEN, init_image=init, width=64, height=48, steps=4,
                          seed=2, cfg_scale=1.0)
    low = _pixels(engine.generate(req.model_copy(update={"denoising_strength": 0.05})))
    high = _pixels(engine.generate(req.model_copy(update={"denoising_strength": 1.0})))
    vae = engine.pipeline(engine.checkpoint(QWEN)).value.vae
    pixels = torch.from_numpy(np.asarray(_picture(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    trip = engine.vae_decode_tensor(vae, engine.vae_encode(vae, pixels))[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(low - trip).mean() < 0.25 * np.abs(high - trip).mean()


@pytest.fixture
def small_references(monkeypatch):
    """Qwen-Image-Edit reads the picture at about 1 MP (diffusers' pipelines and ComfyUI's nodes alike): far too
    slow for tiny tests on a CPU, so both sides take it at 64x48's area here."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    from imagesmith.engine import qwen_image
    monkeypatch.setattr(qwen_image, "VAE_REFERENCE_AREA", 64 * 48)
    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(64 * 48, ratio))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 48)
    monkeypatch.setattr(qwen_image.reference_sizes, "__kwdefaults__", {"area": 64 * 48, "condition_area": 32 * 32})
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 32 * 32)


@pytest.mark.parametrize("name", [EDIT, PLUS])
def test_edit_reads_the_picture_as_tokens_and_equals_diffusers_edit_pipelines(engine, tmp_path, small_references,
                                                                              name):
    """The picture to edit reaches the Qwen2.5-VL encoder (beside the instruction) and the transformer (as latent
    tokens after the output's, on their own frame); the result equals diffusers' QwenImageEditPipeline's (Edit,
    2508) and QwenImageEditPlusPipeline's (2509/2511: a smaller picture for the encoder) for the same noise."""
    req = GenerateRequest(prompt="make it blue", negative_prompt=" ", model=name,
                          init_image=_file(tmp_path, _picture(), "in.png"), width=64, height=48, steps=3, seed=11,
                          cfg_scale=4.0, sampler_name="euler", scheduler="simple", noise="comfy")
    seen, hook = _capture(engine, name)
    try:
        ours = _pixels(engine.generate(req))
    finally:
        hook.remove()
    # 64x48 output: 4x3 tokens; the picture at 64x48's area and aspect, sides rounded to 32: 64x64, 4x4 tokens
    assert seen[0]["hidden_states"].shape[1] == 12 + 16
    assert seen[0]["img_shapes"][0] == [(1, 3, 4), (1, 4, 4)]
    pipe = engine.pipeline(engine.checkpoint(name)).value
    theirs = pipe(image=_picture(), prompt=req.prompt, negative_prompt=" ", true_cfg_scale=4.0, width=64,
                  height=48, num_inference_steps=3, generator=torch.Generator().manual_seed(11),
                  output_type="np").images[0]
    assert ours.std() > 5
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2, np.abs(ours - np.round(theirs * 255)).max()
    seen2, hook = _capture(engine, name)
    try:  # another picture: other reference tokens, and other text conditioning (the encoder sees the picture)
        other = _pixels(engine.generate(req.model_copy(update={
            "init_image": _file(tmp_path, _picture((30, 160, 60)), "b.png")})))
    finally:
        hook.remove()
    assert torch.equal(seen[0]["hidden_states"][:, :12], seen2[0]["hidden_states"][:, :12])  # the same noise
    from imagesmith.engine import qwen_image
    for colour, got in (((200, 60, 40), seen), ((30, 160, 60), seen2)):  # the reference: the picture's latent
        pixels = np.asarray(_picture(colour).resize((64, 64), Image.LANCZOS), np.float32) / 127.5 - 1
        latent = engine.vae_encode(pipe.vae, torch.from_numpy(pixels).permute(2, 0, 1)[None])
        assert torch.allclose(got[0]["hidden_states"][:, 12:], qwen_image.pack(pipe, latent), atol=1e-5)
    assert (seen[0]["text"] - seen2[0]["text"]).abs().max() > 1e-3
    assert not np.array_equal(ours, other)


def test_refusals(engine, tmp_path):
    pic = _file(tmp_path, _picture(), "in.png")
    with pytest.raises(BadRequest, match="multiples of 16"):
        engine.generate(GenerateRequest(prompt="x", model=QWEN, width=40, height=32, steps=1))
    with pytest.raises(BadRequest, match="Qwen-Image-Edit"):
        engine.generate(GenerateRequest(prompt="x", model=EDIT, width=32, height=32, steps=1))
    with pytest.raises(BadRequest, match="without a mask"):
        engine.generate(GenerateRequest(prompt="x", model=EDIT, init_image=pic, steps=1,
                                        mask=_file(tmp_path, Image.new("L", (64, 48), 255), "m.png")))
    with pytest.raises(BadRequest, match="ControlNets are for Qwen-Image"):  # (test_qwen_controlnet.py: Qwen-Image's)
        engine.generate(GenerateRequest(prompt="x", model=EDIT, init_image=pic, steps=1,
                                        controlnet=[{"model": "none", "image": pic}]))


def test_transformer_files_take_the_rest_from_the_folder(engine, qwen_home):
    """A Qwen-Image transformer file (full precision, ComfyUI's fp8, a Q8_0 GGUF) beside a Qwen-Image diffusers
    folder: named by the probe, its VAE, text encoder, tokenizer and scheduler from the folder; full precision
    draws the folder's own pixels, fp8 and Q8_0 close to them."""
    ckpt = qwen_home.models_dir / "checkpoints"
    res = probe(ckpt / f"{FILE}.safetensors")
    assert (res.kind, res.arch, res.components) == ("checkpoint", "qwen", ["transformer"])
    assert probe(ckpt / f"{FILE_FP8}.safetensors").notes[0] == "fp8 e4m3fn: upcast on load"
    assert probe(ckpt / f"{FILE_Q8}.gguf").notes[0] == "GGUF Q8_0"
    entries = {e.name: e for e in engine.registry.list("checkpoint")}
    assert entries[FILE].companion == ckpt / QWEN
    req = GenerateRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", width=64, height=48, steps=3,
                          cfg_scale=3.0, seed=5)
    ref = _pixels(engine.generate(req.model_copy(update={"model": QWEN})))
    same = _pixels(engine.generate(req.model_copy(update={"model": FILE})))
    assert np.abs(same - ref).max() <= 1, np.abs(same - ref).max()  # the same weights (CPU kernels' rounding)
    for name, floor in ((FILE_FP8, 40), (FILE_Q8, 50)):  # measured 49.2 and 57.7 dB
        got = _pixels(engine.generate(req.model_copy(update={"model": name})))
        psnr = 10 * np.log10(255.0 ** 2 / max(float(np.mean((got - ref) ** 2)), 1e-12))
        assert psnr > floor, (name, psnr)


def test_edit_transformer_file_runs_as_edit_plus_beside_a_plain_folder(engine, qwen_home, tmp_path,
                                                                       small_references):
    """qwen_image_edit_2509_*.safetensors: Edit-Plus by its name; beside the plain Qwen-Image folder (no
    processor) it gets a Qwen2-VL processor of the standard settings, and draws what the Edit-Plus folder of the
    same weights draws."""
    res = probe(qwen_home.models_dir / "checkpoints" / f"{FILE_EDIT}.safetensors")
    assert QWEN_EDIT_NOTE in res.notes and any("Edit-Plus" in n for n in res.notes)
    req = GenerateRequest(prompt="make it blue", init_image=_file(tmp_path, _picture(), "in.png"), width=64,
                          height=48, steps=2, seed=4, cfg_scale=1.0)
    pipe = engine.pipeline(engine.checkpoint(FILE_EDIT)).value
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    a = _pixels(engine.generate(req.model_copy(update={"model": FILE_EDIT})))
    b = _pixels(engine.generate(req.model_copy(update={"model": PLUS})))
    assert np.abs(a - b).max() <= 1


def test_qwen_transformer_config_is_read_off_the_real_shapes():
    """Qwen-Image's own transformer (60 blocks, 24 heads of 128, text 3584), built empty: the config imagesmith
    reads off a file's shapes is the one it was built from."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from imagesmith.models.loaders import _qwen_transformer_config
    real = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**real)
    shapes = {"model.diffusion_model." + k: list(v.shape) for k, v in model.state_dict().items()}
    got = _qwen_transformer_config(shapes)
    assert {k: got[k] for k in real} == real


def test_qwen_loras_in_diffusers_and_comfyui_formats(engine, qwen_home, tmp_path):
    """A Qwen-Image LoRA (peft on the transformer's attention and image MLP) saved by diffusers'
    QwenImagePipeline.save_lora_weights, and the same weights in the lightx2v/ComfyUI layout
    (diffusion_model.*.lora_down/lora_up, as the Lightning LoRAs ship): both named qwen by the probe, both change
    the picture the same way; weight 0 gives the base pixels."""
    from diffusers import QwenImagePipeline

    from fixtures.tiny import write_transformer_loras
    write_transformer_loras(QwenImagePipeline, engine.pipeline(engine.checkpoint(QWEN)).value.transformer,
                            ["to_q", "to_v", "add_k_proj", "img_mlp.net.2"], qwen_home.models_dir / "loras", "qwen")
    loras = qwen_home.models_dir / "loras"
    engine.registry.scan()
    assert probe(loras / "qwen-peft.safetensors").arch == "qwen"
    assert probe(loras / "qwen-comfy.safetensors").arch == "qwen"
    req = GenerateRequest(prompt="a red apple on a wooden table", model=QWEN, width=32, height=32, steps=2, seed=1,
                          cfg_scale=1.0)
    base = _pixels(engine.generate(req))
    peft_out = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:qwen-peft:1>"})))
    comfy_out = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:qwen-comfy:1>"})))
    off = _pixels(engine.generate(req.model_copy(update={"prompt": req.prompt + " <lora:qwen-peft:0>"})))
    assert np.abs(peft_out - base).mean() > 1
    assert np.abs(peft_out - comfy_out).max() <= 1
    assert np.abs(off - base).max() <= 1


def test_cli_lists_and_runs_the_qwen_models(qwen_home, tmp_path, capsys, monkeypatch):
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(qwen_home.home))
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(capsys, "models", "list", "--kind", "checkpoint")
    assert code == 0
    rows = {line.split("│")[1].strip(): line.split("│")[4].strip() for line in out.splitlines() if "│" in line}
    assert rows[QWEN] == "Qwen-Image checkpoint" and rows[EDIT] == "Qwen-Image-Edit checkpoint"
    assert rows[PLUS] == "Qwen-Image-Edit-Plus checkpoint" and rows[FILE_EDIT] == "Qwen-Image-Edit-Plus transformer"
    assert rows[FILE_Q8] == "Qwen-Image transformer, GGUF Q8_0" and rows[FILE_FP8] == "Qwen-Image transformer, fp8 e4m3fn"
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "generate", "make it blue", "--model", EDIT, "-W", "64", "-H", "48", "--steps", "1",
                             "-o", str(out_dir))
    assert code == 2 and "Qwen-Image-Edit" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
    code, out, err = run_cli(capsys, "generate", "a red apple", "--model", QWEN, "-W", "32", "-H", "32", "--steps", "2",
                             "-o", str(out_dir), "--seed", "3")
    assert code == 0, err
    (png,) = out_dir.glob("*.png")
    with Image.open(png) as im:
        assert im.size == (32, 32) and "Model: " + QWEN in im.info.get("parameters", "")


def test_prompt_editing_and_hires_fix_on_qwen(engine):
    """A1111's prompt editing switches the Qwen2.5-VL conditioning at the named step; the hires fix upscales and
    runs the second pass at the larger size."""
    from imagesmith.engine import qwen_image
    pipe = engine.pipeline(engine.checkpoint(QWEN)).value
    req = GenerateRequest(prompt="[a cat:an astronaut riding a horse:2]", model=QWEN, width=32, height=32, steps=4,
                          seed=2, cfg_scale=1.0, sampler_name="euler")
    seen, hook = _capture(engine, QWEN)
    try:
        engine.generate(req)
    finally:
        hook.remove()
    first, second = (qwen_image.encode_text(pipe, t, engine.device)[0] for t in ("a cat", "an astronaut riding a horse"))
    assert [s["text"].shape[1] for s in seen] == [first.shape[1]] * 2 + [second.shape[1]] * 2
    assert torch.allclose(seen[0]["text"], first) and torch.allclose(seen[3]["text"], second)
    hires = engine.generate(GenerateRequest(prompt="a cat", model=QWEN, width=32, height=32, steps=2, seed=2,
                                            cfg_scale=1.0, hires={"hr_scale": 2.0, "hr_upscaler": "Lanczos",
                                                                  "hr_denoising_strength": 0.5}))
    assert hires.images[0].size == (64, 64)


@pytest.fixture(scope="module")
def comfy_tree(qwen_home, tmp_path_factory):
    """Qwen-Image as ComfyUI users have it, with no diffusers folder anywhere: models/diffusion_models (the
    transformer, and an Edit-2509 one), models/text_encoders (Qwen2.5-VL under the Hugging Face checkpoint's names),
    models/vae (Wan 2.1's layout) and the install's own comfy/text_encoders/qwen25_tokenizer/."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fixtures.tiny import wan_vae_layout, write_qwen_tokenizer_folder
    from imagesmith.models.convert import META_CONFIGS
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    src = qwen_home.models_dir / "checkpoints"
    (models / "diffusion_models").mkdir(parents=True)
    for name in (FILE, FILE_EDIT):
        (models / "diffusion_models" / f"{name}.safetensors").write_bytes((src / f"{name}.safetensors").read_bytes())
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src / QWEN / "text_encoder"))
    hf = {}
    for k, v in te.state_dict().items():  # transformers 5's names back to the checkpoint's own
        if k.startswith("lm_head."):
            continue
        hf[k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")] = v.contiguous()
    (models / "text_encoders").mkdir()
    save_file(hf, str(models / "text_encoders" / "qwen_2.5_vl_tiny.safetensors"),
              metadata={META_CONFIGS: json.dumps({"text_encoder": te.config.to_dict()})})
    vae = AutoencoderKLQwenImage.from_pretrained(str(src / QWEN / "vae"))
    (models / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in wan_vae_layout(vae.state_dict()).items()},
              str(models / "vae" / "qwen_image_vae_tiny.safetensors"),
              metadata={META_CONFIGS: json.dumps({"vae": {k: v for k, v in vae.config.items()
                                                          if not k.startswith("_")}})})
    tokenizer = build_qwen_image(0).tokenizer
    write_qwen_tokenizer_folder(tokenizer, root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    home = tmp_path_factory.mktemp("split-home")
    settings = Settings(home=home, extra_model_paths=[models])
    settings.ensure_home()
    return settings, root


def test_comfyui_split_files_make_the_same_pipeline(engine, comfy_tree, tmp_path, small_references):
    """The transformer file with ComfyUI's separate VAE (Wan layout) and Qwen2.5-VL file, and the tokenizer found
    in the ComfyUI install: the same pictures as the diffusers folder of the same weights, for Qwen-Image and for
    an Edit-2509 file."""
    settings, root = comfy_tree
    split = Engine(settings, device="cpu")
    entry = split.registry.get(FILE, "checkpoint")
    assert entry.companion is None
    assert {k: Path(v).name for k, v in entry.split_files.items()} == {
        "vae": "qwen_image_vae_tiny.safetensors", "text_encoder": "qwen_2.5_vl_tiny.safetensors",
        "tokenizer": "qwen25_tokenizer"}
    vae_probe = probe(root / "models" / "vae" / "qwen_image_vae_tiny.safetensors")
    assert (vae_probe.kind, vae_probe.arch) == ("vae", "qwen") and "Wan layout" in vae_probe.notes[0]
    req = GenerateRequest(prompt="a red apple on a wooden table", negative_prompt="blurry", width=64, height=48,
                          steps=3, cfg_scale=3.0, seed=8)
    ours = _pixels(split.generate(req.model_copy(update={"model": FILE})))
    folder = _pixels(engine.generate(req.model_copy(update={"model": QWEN})))
    assert np.abs(ours - folder).max() <= 1, np.abs(ours - folder).max()
    edit = req.model_copy(update={"prompt": "make it blue", "init_image": _file(tmp_path, _picture(), "in.png"),
                                  "cfg_scale": 1.0})
    a = _pixels(split.generate(edit.model_copy(update={"model": FILE_EDIT})))
    b = _pixels(engine.generate(edit.model_copy(update={"model": PLUS})))
    assert np.abs(a - b).max() <= 1


def test_split_files_without_a_tokenizer_say_what_to_add(comfy_tree, tmp_path):
    from imagesmith.core.errors import MissingModelFile
    settings, root = comfy_tree
    models = tmp_path / "models"  # the same model files, outside any ComfyUI install
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
        for f in (root / "models" / sub).iterdir():
            (models / sub / f.name).symlink_to(f)
    lone = Settings(home=tmp_path / "home", extra_model_paths=[models])
    lone.ensure_home()
    with pytest.raises(MissingModelFile, match="qwen25_tokenizer"):
        Engine(lone, device="cpu").generate(GenerateRequest(prompt="x", model=FILE, width=32, height=32, steps=1))


QWEN_TEMPLATES = {  # ComfyUI's own Qwen-Image templates -> output node and size on the tiny models
    "image_qwen_image": {"60": [(336, 336)]},  # EmptySD3LatentImage 1328 / 4, to 16 px
    # the 128x96 photo at 1.68 / 16 "MP" of 1024^2 pixels (383x287: the Canny map), VAEEncode's 8 px crop
    "image_qwen_image_instantx_controlnet": {"60": [(376, 280)], "73": [(383, 287)]},
    # the 128x96 photo, its transparent right half repainted (ControlNetInpaintingAliMamaApply, SetLatentNoiseMask),
    # the original pasted back (163), the grown and blurred mask previewed (124)
    "image_qwen_image_instantx_inpainting_controlnet": {"60": [(128, 96)], "124": [(128, 96)], "163": [(128, 96)]},
    "image_qwen_image_edit": {"60": [(296, 216)]},  # the 128x96 photo at 1/16 MP (296x222), VAEEncode's 8 px crop
    "image_qwen_image_edit_2509": {"60": [(296, 216)]},  # its KSampler also starts from the photo's latent
}


@pytest.mark.parametrize("name", sorted(QWEN_TEMPLATES))
def test_comfyui_qwen_templates_run_on_the_split_files(comfy_tree, tmp_path, small_references, name):
    """ComfyUI's Qwen-Image, Qwen-Image-Edit and Edit-2509 templates (comfyui-workflow-templates), through the
    UI-to-API converter and the executor, on the ComfyUI file layout: UNETLoader, CLIPLoader type qwen_image,
    VAELoader, ModelSamplingAuraFlow, TextEncodeQwenImageEdit(Plus), CFGNorm, the Lightning LoRA slot."""
    pytest.importorskip("comfyui_workflow_templates")
    from fixtures.comfy_templates import run_template, shrink, template
    from imagesmith.engine.graph.nodes import NODES
    from imagesmith.engine.graph.ui import ui_to_api
    settings, root = comfy_tree
    if name == "image_qwen_image_instantx_controlnet":
        _instantx_file(settings, root)
    if name == "image_qwen_image_instantx_inpainting_controlnet":
        _instantx_file(settings, root, inpainting=True)
    lora = settings.models_dir / "loras" / "qwen-tiny-lora.safetensors"
    if not lora.exists():  # a rank-4 LoRA on the tiny transformer's attention, ComfyUI/lightx2v layout
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(3)
        save_file({f"diffusion_model.transformer_blocks.{b}.{m}.lora_{d}.weight":
                   torch.randn((4, 32) if d == "down" else (32, 4), generator=g) * 0.3
                   for b in (0, 1) for m in ("attn.to_q", "attn.add_v_proj") for d in ("down", "up")}, str(lora))
    engine = Engine(settings, device="cpu")
    ui = template(name)
    if name == "image_qwen_image_instantx_controlnet":
        ui = _canny_instead_of_depth(ui, NODES)
    prompt = shrink(name, ui_to_api(ui, NODES), "Lanczos")
    for node in prompt.values():
        kind, i = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            i["unet_name"] = f"{FILE_EDIT if 'edit' in name else FILE}.safetensors"
        elif kind == "CLIPLoader":
            i["clip_name"] = "qwen_2.5_vl_tiny.safetensors"
        elif kind == "VAELoader":
            i["vae_name"] = "qwen_image_vae_tiny.safetensors"
        elif kind == "LoraLoaderModelOnly":
            i["lora_name"] = "qwen-tiny-lora.safetensors"
        elif kind == "ControlNetLoader":
            i["control_net_name"] = "qwen-instantx-inpaint-tiny.safetensors" if "inpainting" in name else \
                "qwen-instantx-tiny.safetensors"
    inputs = tmp_path / "input"
    inputs.mkdir()
    names = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    for image in names:
        picture = Image.fromarray((np.indices((96, 128)).sum(0) * 2 % 255).astype(np.uint8)).convert("RGB")
        if "inpainting" in name:  # painted in ComfyUI's mask editor: the area to repaint is transparent
            picture.putalpha(Image.fromarray(np.where(np.indices((96, 128))[1] > 64, 0, 255).astype(np.uint8)))
        path = inputs / image.removesuffix(" [input]")  # "clipspace/...png [input]": the mask editor's folder
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    sizes = run_template(engine, name, prompt, tmp_path, inputs, [n.removesuffix(" [input]") for n in names])
    assert sizes == QWEN_TEMPLATES[name]


def _instantx_file(settings, root, inpainting: bool = False):
    """A tiny InstantX-style union (or inpainting) ControlNet made from the tiny transformer, as ComfyUI keeps it:
    one file in models/controlnet, no config."""
    path = root / "models" / "controlnet" / (
        "qwen-instantx-inpaint-tiny.safetensors" if inpainting else "qwen-instantx-tiny.safetensors")
    if path.exists():
        return
    from diffusers import QwenImageControlNetModel
    from safetensors.torch import save_file
    cn = QwenImageControlNetModel.from_transformer(build_qwen_image(0).transformer, num_layers=2,
                                                   attention_head_dim=16, num_attention_heads=2,
                                                   extra_condition_channels=4 if inpainting else 0)
    g = torch.Generator().manual_seed(2)
    state = {k: (torch.randn(v.shape, generator=g) * 0.1 if k.startswith(("controlnet_blocks", "controlnet_x"))
                 else v).contiguous() for k, v in cn.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def _canny_instead_of_depth(ui: dict, nodes) -> dict:
    """The InstantX template's control map comes from a Lotus-depth subgraph (a diffusion depth model through
    SamplerCustomAdvanced, which imagesmith's graph does not have); the template also carries ComfyUI's Canny node,
    bypassed and unwired: wired in place of the subgraph here, as a user switching to Canny does."""
    depth = next(n for n in ui["nodes"] if n["type"] not in nodes and len(n["type"]) == 36)  # the subgraph (a UUID)
    canny = next(n for n in ui["nodes"] if n["type"] == "Canny")
    for link in ui["links"]:
        if link[3] == depth["id"]:  # the scaled photo into the subgraph -> into Canny
            link[3], link[4] = canny["id"], 0
            canny["inputs"][0]["link"] = link[0]
        if link[1] == depth["id"]:  # its map out -> Canny's
            link[1], link[2] = canny["id"], 0
    canny["outputs"][0]["links"] = [link[0] for link in ui["links"] if link[1] == canny["id"]]
    canny["mode"] = 0
    ui["nodes"] = [n for n in ui["nodes"] if n is not depth]
    return ui


def test_wrong_qwen_parts_are_one_clear_line(comfy_tree, tmp_path):
    """A transformer file with no Qwen2.5-VL file anywhere says which files it needs; a CLIP file given to
    CLIPLoader as qwen_image, or a broken VAE file, names the file and why; nothing is half loaded."""
    from imagesmith.core.errors import ImagesmithError
    from imagesmith.engine.graph.executor import GraphContext
    from imagesmith.engine.graph.nodes import executor_for
    from imagesmith.models.loaders import load_qwen_vae_file
    settings, root = comfy_tree
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / f"{FILE}.safetensors").symlink_to(
        root / "models" / "diffusion_models" / f"{FILE}.safetensors")
    lone = Settings(home=tmp_path / "home", extra_model_paths=[models])
    lone.ensure_home()
    with pytest.raises(ImagesmithError) as info:
        Engine(lone, device="cpu").generate(GenerateRequest(prompt="x", model=FILE, width=32, height=32, steps=1))
    message = str(info.value)
    assert "qwen_image_vae" in message and "qwen_2.5_vl_7b" in message and len(message.splitlines()) == 1
    (models / "text_encoders").mkdir()
    from safetensors.torch import save_file
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)},
              str(models / "text_encoders" / "clip_l.safetensors"))
    engine = Engine(lone, device="cpu")
    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "qwen_image"}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 0]}}}
    ctx = GraphContext(engine=engine, output_dir=tmp_path / "o", temp_dir=tmp_path / "t", input_dir=tmp_path,
                       prompt=prompt)
    with pytest.raises(ImagesmithError, match="clip_l.safetensors: .* Qwen2.5-VL tensors missing"):
        executor_for(engine).run(prompt, ctx, ["2"])
    broken = tmp_path / "qwen_image_vae_broken.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.zeros(4, 1, 1, 1)}, str(broken))
    with pytest.raises(ImagesmithError, match="qwen_image_vae_broken.safetensors: not a Qwen-Image / Wan 2.1 VAE"):
        load_qwen_vae_file(broken, torch.float32)


def test_edit_plus_with_two_pictures_equals_diffusers(engine, tmp_path, small_references):
    """Qwen-Image-Edit-Plus's multi-picture edit ("Picture 1", "Picture 2" in the instruction): both pictures reach
    the text encoder and the transformer (two reference frames), and the result is diffusers'
    QwenImageEditPlusPipeline's for the same two pictures and noise; a model that takes one picture refuses more."""
    second = Image.new("RGB", (32, 96), (30, 160, 60))
    req = GenerateRequest(prompt="put the square of picture 1 on picture 2", negative_prompt=" ", model=PLUS,
                          init_image=_file(tmp_path, _picture(), "a.png"), edit_images=[_file(tmp_path, second, "b.png")],
                          width=64, height=48, steps=2, seed=6, cfg_scale=4.0, sampler_name="euler",
                          scheduler="simple", noise="comfy")
    seen, hook = _capture(engine, PLUS)
    try:
        ours = _pixels(engine.generate(req))
    finally:
        hook.remove()
    # output 4x3 tokens, then each picture at 64x48's area, its own aspect, sides rounded to 32: 64x64 and 32x96
    assert seen[0]["img_shapes"][0] == [(1, 3, 4), (1, 4, 4), (1, 6, 2)]
    assert seen[0]["hidden_states"].shape[1] == 12 + 16 + 12
    pipe = engine.pipeline(engine.checkpoint(PLUS)).value
    theirs = pipe(image=[_picture(), second], prompt=req.prompt, negative_prompt=" ", true_cfg_scale=4.0, width=64,
                  height=48, num_inference_steps=2, generator=torch.Generator().manual_seed(6),
                  output_type="np").images[0]
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2, np.abs(ours - np.round(theirs * 255)).max()
    with pytest.raises(BadRequest, match="multi-picture edit model"):
        engine.generate(req.model_copy(update={"model": EDIT}))
    with pytest.raises(BadRequest, match="init_image"):
        engine.generate(req.model_copy(update={"init_image": None}))
