"""Loaders: every architecture from a diffusers folder and from a single file, offline; companions,
T5 tokenizers, VAEs, ControlNets, LoRAs on loaded pipelines, shipped configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagesmith.core.errors import MissingModelFile, UnsafeModelFile
from imagesmith.core.settings import Settings
from imagesmith.models import loaders
from imagesmith.models.registry import Registry

CHECKPOINTS = ["tiny-sd15", "tiny-sd15-single", "tiny-sdxl", "tiny-sdxl-single", "tiny-sd3", "tiny-sd3-single",
               "tiny-flux", "tiny-flux-single"]


@pytest.fixture(scope="module")
def registry(tiny_home):
    return Registry(tiny_home)


@pytest.fixture(scope="module")
def pipes(registry):
    """Each tiny checkpoint loaded once for this module."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = loaders.load_pipeline(registry.get(name, "checkpoint"), torch_dtype=torch.float32)
        return cache[name]
    return get


def run(pipe, size=32, **kw):
    kw.setdefault("prompt", "a red apple")
    return pipe(num_inference_steps=1, height=size, width=size, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_checkpoint_loads_and_runs_one_step(pipes, name):
    import PIL.Image
    pipe = pipes(name)
    expected = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name.split("-")[1]]
    assert type(pipe).__name__ == expected
    image = pipe(prompt="a red apple", num_inference_steps=1, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    assert np.asarray(image).std() > 0
    if name.startswith("tiny-sd15"):
        assert pipe.safety_checker is None


@pytest.mark.parametrize("folder,single", [("tiny-sd15", "tiny-sd15-single"), ("tiny-sdxl", "tiny-sdxl-single"),
                                           ("tiny-sd3", "tiny-sd3-single"), ("tiny-flux", "tiny-flux-single")])
def test_single_file_gives_the_same_pixels_as_the_folder(pipes, folder, single):
    a, b = run(pipes(folder)), run(pipes(single))
    assert np.array_equal(a, b)


def test_flux_single_takes_the_rest_from_the_companion(registry, pipes):
    e = registry.get("tiny-flux-single", "checkpoint")
    assert e.companion == registry.get("tiny-flux", "checkpoint").path
    pipe = pipes("tiny-flux-single")
    assert pipe.transformer.config.guidance_embeds  # the file's own (embedded) transformer config
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer")


def _copy_home(tiny_models, tmp_path, names: list[str]) -> Settings:
    s = Settings(home=tmp_path / "home")
    s.ensure_home()
    for n in names:
        src = tiny_models.paths[n]
        dst = s.models_dir / src.parent.name / src.name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return s


def test_transformer_only_file_without_companion_says_what_is_missing(tiny_models, tmp_path):
    s = _copy_home(tiny_models, tmp_path, ["tiny-flux-single"])
    e = Registry(s).get("tiny-flux-single", "checkpoint")
    with pytest.raises(MissingModelFile) as err:
        loaders.load_pipeline(e)
    msg = str(err.value)
    assert "FLUX" in msg and "model_index.json" in msg and "text encoders" in msg


def test_missing_t5_tokenizer_names_the_file_and_where(tiny_models, tmp_path):
    s = _copy_home(tiny_models, tmp_path, ["tiny-flux"])
    folder = s.models_dir / "checkpoints" / "tiny-flux"
    shutil.rmtree(folder / "tokenizer_2")
    (folder / "tokenizer_2").mkdir()
    e = Registry(s).get("tiny-flux", "checkpoint")
    with pytest.raises(MissingModelFile) as err:
        loaders.load_pipeline(e)
    msg = str(err.value)
    assert "spiece.model" in msg and str(folder / "tokenizer_2") in msg and "text_encoders/t5" in msg
    # the user drops spiece.model where the message said: it loads (sentencepiece only, no protobuf)
    t5 = s.models_dir / "text_encoders" / "t5"
    t5.mkdir(parents=True)
    shutil.copy(tiny_models.paths["t5-spiece-flux"], t5 / "spiece.model")
    pipe = loaders.load_pipeline(Registry(s).get("tiny-flux", "checkpoint"))
    assert pipe.tokenizer_2("a cat").input_ids[-1] == 1  # </s>
    assert run(pipe).shape == (1, 32, 32, 3)


def test_t5_tokenizer_from_spiece_matches_sentencepiece(tiny_models):
    import sentencepiece as spm
    model = tiny_models.paths["t5-spiece-sd3"]
    tok = loaders.t5_tokenizer_from_spiece(model, extra_ids=4)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text in ["a photo of a cat on a table", "an astronaut riding a horse", "Ünïcode, and   spaces!"]:
        assert tok(text).input_ids == sp.encode(text) + [1]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # T5 layout: extra ids last, reversed


def test_folder_with_only_pickle_weights_is_refused(tiny_models, tmp_path):
    s = _copy_home(tiny_models, tmp_path, ["tiny-sd15"])
    unet = s.models_dir / "checkpoints" / "tiny-sd15" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UnsafeModelFile, match=r"diffusion_pytorch_model\.bin"):
        loaders.load_pipeline(Registry(s).get("tiny-sd15", "checkpoint"))


def test_lora_formats_apply_identically(registry, pipes):
    """The peft file and its kohya conversion change the image, and change it the same way,
    through both the UNet and the text encoder."""
    pipe = pipes("tiny-sd15")
    base = run(pipe)
    out = {}
    for name in ("tiny-lora-peft", "tiny-lora-kohya"):
        pipe.load_lora_weights(str(registry.get(name, "lora").path), adapter_name=name.replace("-", "_"))
        pipe.set_adapters([name.replace("-", "_")], [1.0])
        out[name] = run(pipe)
    assert any("lora" in n for n, _ in pipe.text_encoder.named_modules())
    pipe.delete_adapters(["tiny_lora_peft", "tiny_lora_kohya"])
    assert not np.array_equal(base, out["tiny-lora-peft"])
    assert np.abs(out["tiny-lora-peft"] - out["tiny-lora-kohya"]).max() < 1e-5
    assert np.array_equal(run(pipe), base)


def test_vae_folder_and_single_file_load_the_same_weights(registry, tiny_models):
    a = loaders.load_vae(registry.get("tiny-vae", "vae"), torch_dtype=torch.float32)
    b = loaders.load_vae(registry.get("tiny-vae-single", "vae"), torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    half = loaders.load_vae(registry.get("tiny-vae", "vae"), torch_dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_controlnet_folder_and_single_file_load_the_same_weights(registry):
    a = loaders.load_controlnet(registry.get("tiny-controlnet", "controlnet"), torch_dtype=torch.float32)
    b = loaders.load_controlnet(registry.get("tiny-controlnet-single", "controlnet"), torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vae_from_a_checkpoint_folder(registry):
    vae = loaders.load_vae(registry.get("tiny-sd15", "checkpoint"))
    assert vae.config.latent_channels == 4


# ------------------------------------------------------------------------------ shipped configs
def test_shipped_configs_have_the_real_sizes():
    """Instantiated on the meta device, the shipped configs give the published parameter counts."""
    from accelerate import init_empty_weights
    import diffusers
    import transformers
    expected = {
        ("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480,
        ("sd2", "unet"): 865_910_724, ("sd2", "text_encoder"): 340_387_840,
        ("sdxl", "unet"): 2_567_463_684, ("sdxl", "text_encoder_2"): 694_659_840,
        ("sd3", "transformer"): 2_028_328_000, ("flux-dev", "transformer"): 11_901_408_320,
    }
    for (arch, comp), count in expected.items():
        d = loaders.CONFIGS_DIR / arch / comp
        lib, cls = json.loads((loaders.CONFIGS_DIR / arch / "model_index.json").read_text())[comp]
        with init_empty_weights():
            if lib == "diffusers":
                k = getattr(diffusers, cls)
                m = k.from_config(k.load_config(str(d)))
            else:
                m = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(str(d)))
        assert sum(p.numel() for p in m.parameters()) == count, (arch, comp)


def test_assembled_config_folder_has_working_tokenizers(tmp_path):
    from transformers import CLIPTokenizer
    d = loaders.assemble_config_folder(tmp_path / "xl", "sdxl")
    tok = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert CLIPTokenizer.from_pretrained(str(d / "tokenizer_2")).pad_token == "!"
    assert json.loads((d / "unet" / "config.json").read_text())["cross_attention_dim"] == 2048
    schnell = loaders.assemble_config_folder(tmp_path / "fx", "flux", _header({"double_blocks.0.img_attn.qkv.weight": [9, 3]}))
    assert json.loads((schnell / "transformer" / "config.json").read_text())["guidance_embeds"] is False


def _header(shapes):
    from imagesmith.models.probe import SafetensorsHeader
    return SafetensorsHeader(shapes=shapes, dtypes={k: "F16" for k in shapes})


def test_shipped_config_follows_the_file_shapes(tmp_path):
    """An inpainting checkpoint (9 input channels) gets a 9-channel UNet config; SD3.5 Large gets its depth."""
    d = loaders.assemble_config_folder(tmp_path / "inp", "sd1",
                                       _header({"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]}))
    assert json.loads((d / "unet" / "config.json").read_text())["in_channels"] == 9
    shapes = {f"model.diffusion_model.joint_blocks.{i}.x_block.attn.ln_q.weight": [64] for i in range(38)}
    shapes["model.diffusion_model.pos_embed"] = [1, 36864, 2432]
    d = loaders.assemble_config_folder(tmp_path / "l", "sd3", _header(shapes))
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["caption_projection_dim"], cfg["qk_norm"],
            cfg["pos_embed_max_size"]) == (38, 38, 2432, "rms_norm", 192)


# ------------------------------------------------------------------------------ offline proof
OFFLINE_SCRIPT = r"""
import socket, sys, torch
def refuse(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from pathlib import Path
from imagesmith.core.settings import Settings
from imagesmith.models.registry import Registry
from imagesmith.models.loaders import load_pipeline, load_vae, load_controlnet
r = Registry(Settings(home=Path(sys.argv[1])))
for name in sys.argv[2:]:
    pipe = load_pipeline(r.get(name, "checkpoint"))
    out = pipe(prompt="x", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3), name
load_vae(r.get("tiny-vae-single", "vae"))
load_controlnet(r.get("tiny-controlnet-single", "controlnet"))
print("OK")
"""


def test_loading_never_reaches_the_network(tiny_models, tmp_path):
    hf_home = tmp_path / "empty-hf-home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_CACHE": str(hf_home / "hub"), "OMP_NUM_THREADS": "1"}
    names = ["tiny-sd15-single", "tiny-sdxl-single", "tiny-flux-single", "tiny-sd3", "tiny-sd15"]
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tiny_models.settings.home), *names],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    assert not any(hf_home.rglob("*")), "something was written to HF_HOME"


@pytest.mark.parametrize("keep", ["no-vae", "unet-only"])
def test_partial_sd_files_take_the_rest_from_the_companion(tiny_models, tmp_path, keep):
    """A1111 'no VAE' files and UNet-only files: the missing parts come from the SD1 diffusers folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    s = _copy_home(tiny_models, tmp_path, ["tiny-sd15"])
    src = tiny_models.paths["tiny-sd15-single"]
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        drop = ("first_stage_model.",) if keep == "no-vae" else ("first_stage_model.", "cond_stage_model.")
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(drop)}
    save_file(state, str(s.models_dir / "checkpoints" / "partial.safetensors"), metadata=meta)
    r = Registry(s)
    e = r.get("partial", "checkpoint")
    assert e.companion == r.get("tiny-sd15", "checkpoint").path
    assert "vae" not in e.components
    pipe = loaders.load_pipeline(e)
    full = loaders.load_pipeline(r.get("tiny-sd15", "checkpoint"))
    assert np.array_equal(run(pipe), run(full))
