"""probe(): kind, arch and format from headers and configs only, on real key layouts (synthetic
full-size headers) and on the tiny fixture models (real files written by diffusers/peft/our export)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

import model_headers as H
from imagesmith.core.errors import UnsafeModelFile
from imagesmith.models.probe import probe, read_header, refuse_pickle


@pytest.mark.parametrize("name,tensors,kind,arch,note", [
    ("sd15", H.SD15, "checkpoint", "sd1", None),
    ("sd15-inpainting", H.SD15_INPAINT, "checkpoint", "sd1", "inpainting"),
    ("sd21-768-v", H.SD2, "checkpoint", "sd2", "v-prediction"),
    ("sdxl-base", H.SDXL, "checkpoint", "sdxl", None),
    ("sdxl-unet-only", H.SDXL_UNET_ONLY, "checkpoint", "sdxl", "UNet only"),
    ("sd3-medium-incl-clips-t5", H.SD3, "checkpoint", "sd3", "Medium"),
    ("sd3-diffusers-transformer", H.SD3_DIFFUSERS, "checkpoint", "sd3", "transformer only"),
    ("flux1-dev", H.FLUX_DEV, "checkpoint", "flux", "dev"),
    ("flux1-schnell-comfy", H.FLUX_SCHNELL_COMFY, "checkpoint", "flux", "schnell"),
    ("flux-diffusers-transformer", H.FLUX_DIFFUSERS, "checkpoint", "flux", "diffusers transformer layout"),
    ("vae-ft-mse-840000-ema-pruned", H.VAE_SD, "vae", "sd1", "SD1/SD2/SDXL"),
    ("sdxl_vae", H.VAE_SD, "vae", "sdxl", None),
    ("ae", H.VAE_FLUX, "vae", "flux", None),
    ("some-16ch-vae", H.VAE_FLUX, "vae", "unknown", "SD3 or FLUX"),
    ("lora-kohya-sd1", H.LORA_KOHYA_SD1, "lora", "sd1", "kohya"),
    ("lora-kohya-sd2", H.LORA_KOHYA_SD2, "lora", "sd2", "kohya"),
    ("lora-kohya-sdxl", H.LORA_KOHYA_SDXL, "lora", "sdxl", "rank 16"),
    ("lora-kohya-sdxl-unet", H.LORA_KOHYA_SDXL_UNET_ONLY, "lora", "sdxl", None),
    ("lora-kohya-flux", H.LORA_KOHYA_FLUX, "lora", "flux", None),
    ("lora-peft-flux", H.LORA_PEFT_FLUX, "lora", "flux", "peft"),
    ("lora-peft-sd3", H.LORA_PEFT_SD3, "lora", "sd3", None),
    ("lora-peft-sdxl", H.LORA_PEFT_SDXL_UNET, "lora", "sdxl", None),
    ("lora-comfy-flux", H.LORA_COMFY_FLUX, "lora", "flux", None),
    ("loha", H.LORA_LYCORIS_LOHA, "lora", "sd1", "LyCORIS"),
    ("emb-sd1", H.EMB_SD1, "embedding", "sd1", "2 vectors"),
    ("emb-sd2", H.EMB_SD2, "embedding", "sd2", None),
    ("emb-sdxl", H.EMB_SDXL, "embedding", "sdxl", "clip_l + clip_g"),
    ("control_v11p_sd15_canny", H.CONTROLNET_SD15, "controlnet", "sd1", "original"),
    ("controlnet-sdxl-diffusers", H.CONTROLNET_SDXL_DIFFUSERS, "controlnet", "sdxl", "diffusers"),
    ("4x-UltraSharp", H.ESRGAN, "upscaler", "unknown", None),
    ("RealESRGAN_x4plus-old-arch", H.ESRGAN_OLD, "upscaler", "unknown", None),
])
def test_real_layouts(tmp_path, name, tensors, kind, arch, note):
    path = H.write_header_file(tmp_path / f"{name}.safetensors", tensors)
    r = probe(path)
    assert (r.kind, r.arch, r.format) == (kind, arch, "single-file"), r
    if note:
        assert any(note in n for n in r.notes), r.notes


def test_probe_reads_only_the_header(tmp_path):
    """A full-size SDXL header over a sparse (zero) data region probes instantly: no weights read."""
    path = H.write_header_file(tmp_path / "big.safetensors", {**H.SDXL, "big": [50000, 50000]})
    assert path.stat().st_size > 4e9  # logical size; the file is a hole on disk
    assert probe(path).arch == "sdxl"


def test_components_and_native_size(tmp_path):
    r = probe(H.write_header_file(tmp_path / "a.safetensors", H.SDXL))
    assert set(r.components) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert r.native_size == 1024
    r = probe(H.write_header_file(tmp_path / "b.safetensors", H.FLUX_DEV))
    assert r.components == ["transformer"] and any("transformer only" in n for n in r.notes)


@pytest.mark.parametrize("content,note", [
    (b"", "too short"), (b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}", "not JSON"),
    (b"\xff" * 16, "not a safetensors file"),
])
def test_corrupt_files_are_unknown_not_errors(tmp_path, content, note):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    r = probe(path)
    assert r.kind == "unknown" and any(note in n for n in r.notes), r.notes


def test_unknown_layout(tmp_path):
    r = probe(H.write_header_file(tmp_path / "x.safetensors", {"foo.bar": [3]}))
    assert (r.kind, r.arch) == ("unknown", "unknown") and "foo.bar" in r.notes[0]


# ------------------------------------------------------------------------------ tiny fixture files
@pytest.mark.parametrize("name,kind,arch,fmt", [
    ("tiny-sd15", "checkpoint", "sd1", "diffusers"),
    ("tiny-sd15-single", "checkpoint", "sd1", "single-file"),
    ("tiny-sdxl", "checkpoint", "sdxl", "diffusers"),
    ("tiny-sdxl-single", "checkpoint", "sdxl", "single-file"),
    ("tiny-sd3", "checkpoint", "sd3", "diffusers"),
    ("tiny-sd3-single", "checkpoint", "sd3", "single-file"),
    ("tiny-flux", "checkpoint", "flux", "diffusers"),
    ("tiny-flux-single", "checkpoint", "flux", "single-file"),
    ("tiny-lora-peft", "lora", "sd1", "single-file"),
    ("tiny-lora-kohya", "lora", "sd1", "single-file"),
    ("tiny-lora-sdxl-peft", "lora", "sdxl", "single-file"),
    ("tiny-lora-sdxl-kohya", "lora", "sdxl", "single-file"),
    ("tiny-vae", "vae", "sd1", "diffusers"),
    ("tiny-vae-single", "vae", "sd1", "single-file"),
    ("tiny-controlnet", "controlnet", "sd1", "diffusers"),
    ("tiny-controlnet-single", "controlnet", "sd1", "single-file"),
    ("tiny-embedding", "embedding", "unknown", "single-file"),
])
def test_tiny_fixture_models(tiny_models, name, kind, arch, fmt):
    r = probe(tiny_models.paths[name])
    assert (r.kind, r.arch, r.format) == (kind, arch, fmt), r


def test_exported_single_file_carries_its_configs(tiny_models):
    r = probe(tiny_models.paths["tiny-sd15-single"])
    assert r.embedded_configs and r.native_size == 64  # tiny UNet sample_size 8 x 8
    assert set(r.components) == {"unet", "vae", "text_encoder"}
    assert not probe(tiny_models.paths["tiny-lora-peft"]).embedded_configs


def test_lora_formats_are_told_apart(tiny_models):
    assert any("kohya" in n for n in probe(tiny_models.paths["tiny-lora-kohya"]).notes)
    assert any("peft" in n for n in probe(tiny_models.paths["tiny-lora-peft"]).notes)


# ------------------------------------------------------------------------------ diffusers folders
def _folder(root: Path, index: dict | None = None, config: dict | None = None, unet: dict | None = None) -> Path:
    root.mkdir(parents=True)
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


@pytest.mark.parametrize("index,unet,arch", [
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 768, "sample_size": 64}, "sd1"),
    ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024, "sample_size": 96}, "sd2"),
    ({"_class_name": "StableDiffusionXLPipeline"}, {"cross_attention_dim": 2048, "sample_size": 128}, "sdxl"),
    ({"_class_name": "StableDiffusion3Pipeline"}, None, "sd3"),
    ({"_class_name": "FluxPipeline"}, None, "flux"),
    ({"_class_name": "KandinskyPipeline"}, None, "unknown"),
])
def test_pipeline_folders(tmp_path, index, unet, arch):
    r = probe(_folder(tmp_path / "m", index=index, unet=unet))
    assert (r.kind, r.arch, r.format) == ("checkpoint", arch, "diffusers")
    if unet:
        assert r.native_size == unet["sample_size"] * 8


@pytest.mark.parametrize("config,kind,arch", [
    ({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048, "addition_embed_type": "text_time"},
     "checkpoint", "sdxl"),
    ({"_class_name": "FluxTransformer2DModel", "guidance_embeds": False}, "checkpoint", "flux"),
    ({"_class_name": "SD3Transformer2DModel"}, "checkpoint", "sd3"),
    ({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.13025}, "vae", "sdxl"),
    ({"_class_name": "AutoencoderKL", "latent_channels": 16, "shift_factor": 0.1159}, "vae", "flux"),
    ({"_class_name": "ControlNetModel", "cross_attention_dim": 768}, "controlnet", "sd1"),
    ({"_class_name": "Something"}, "unknown", "unknown"),
])
def test_component_folders(tmp_path, config, kind, arch):
    r = probe(_folder(tmp_path / "m", config=config))
    assert (r.kind, r.arch) == (kind, arch)


def test_empty_folder_is_unknown(tmp_path):
    (tmp_path / "e").mkdir()
    assert probe(tmp_path / "e").kind == "unknown"


# ------------------------------------------------------------------------------ pickles
class _Boom:
    """Unpickling this creates a file: proof of code execution if anything ever unpickles it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_refuse_pickle_never_unpickles(tmp_path, suffix):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
    with pytest.raises(UnsafeModelFile) as err:
        probe(path)
    msg = str(err.value)
    assert path.name in msg and ".safetensors" in msg and "convert" in msg.lower()
    with pytest.raises(UnsafeModelFile):
        refuse_pickle(path)
    assert not marker.exists()


def test_pickle_with_an_innocent_suffix_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.weights"
    path.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
    with pytest.raises(UnsafeModelFile):
        refuse_pickle(path)
    disguised = tmp_path / "model.safetensors"  # a pickle named .safetensors: not a safetensors header
    disguised.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
    assert probe(disguised).kind == "unknown"
    assert not marker.exists()


def test_refuse_pickle_accepts_safetensors(tmp_path):
    path = H.write_header_file(tmp_path / "ok.safetensors", H.EMB_SD1)
    refuse_pickle(path)  # no error
    assert read_header(path).shapes == {"emb_params": [2, 768]}
