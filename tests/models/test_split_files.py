"""ComfyUI's split layout: a FLUX transformer-only file in models/checkpoints (or diffusion_models), its VAE in
models/vae and its text encoders (CLIP-L, T5) in models/text_encoders, with no diffusers folder anywhere: combined
by their tensors into the same pipeline the folder makes, pixel for pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import save_file

from imagesmith.core.errors import MissingModelFile
from imagesmith.core.requests import GenerateRequest
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.convert import META_CONFIGS, flux_to_bfl, vae_to_ldm


def _meta(name: str, config) -> dict[str, str]:
    return {META_CONFIGS: json.dumps({name: {k: v for k, v in dict(config).items() if not k.startswith("_")}},
                                     default=list)}


@pytest.fixture(scope="module")
def split_home(tiny_models, tmp_path_factory):
    from diffusers import FluxPipeline
    folder = tiny_models.settings.models_dir / "checkpoints" / "tiny-flux"
    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    settings = Settings(home=tmp_path_factory.mktemp("split"))
    settings.ensure_home()
    m = settings.models_dir
    cfg = dict(pipe.transformer.config)
    (m / "diffusion_models").mkdir()
    save_file({k: v.contiguous() for k, v in flux_to_bfl(pipe.transformer.state_dict(), cfg).items()},
              str(m / "diffusion_models" / "flux-dev-split.safetensors"), metadata=_meta("transformer", cfg))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()},
              str(m / "vae" / "ae.safetensors"), metadata=_meta("vae", pipe.vae.config))
    te = m / "text_encoders"
    (te / "t5").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}, str(te / "clip_l.safetensors"),
              metadata=_meta("text_encoder", pipe.text_encoder.config.to_dict()))
    t5 = {k: v.contiguous() for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(te / "t5xxl_fp16.safetensors"), metadata=_meta("text_encoder", pipe.text_encoder_2.config.to_dict()))
    (te / "t5" / "spiece.model").write_bytes(tiny_models.paths["t5-spiece-flux"].read_bytes())
    return settings


def _draw(settings: Settings, model: str) -> np.ndarray:
    req = GenerateRequest(prompt="a red lighthouse", model=model, width=64, height=64, steps=2, cfg_scale=3.5,
                          seed=11)
    return np.asarray(Engine(settings, device="cpu").generate(req).images[0])


def test_split_files_are_combined_by_their_tensors(split_home, tiny_home):
    engine = Engine(split_home, device="cpu")
    entry = engine.registry.get("flux-dev-split", "checkpoint")
    assert entry.companion is None and entry.split_files is not None
    te = split_home.models_dir / "text_encoders"
    assert entry.split_files == {"vae": split_home.models_dir / "vae" / "ae.safetensors",
                                 "text_encoder": te / "clip_l.safetensors",
                                 "text_encoder_2": te / "t5xxl_fp16.safetensors"}
    assert np.array_equal(_draw(split_home, "flux-dev-split"), _draw(tiny_home, "tiny-flux"))


def test_a_missing_part_is_named(split_home, tmp_path):
    import shutil
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    shutil.copytree(split_home.models_dir / "diffusion_models", settings.models_dir / "diffusion_models")
    shutil.copytree(split_home.models_dir / "text_encoders", settings.models_dir / "text_encoders")
    with pytest.raises(MissingModelFile, match="a VAE in models/vae and the text encoders"):
        _draw(settings, "flux-dev-split")  # no VAE: not combined, and the message says what to add
