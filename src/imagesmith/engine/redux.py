"""FLUX.1 Redux: reference images on FLUX, as extra prompt tokens.

A SigLIP vision encoder (ComfyUI's ``sigclip_vision_patch14_384.safetensors`` in ``models/clip_vision``) reads
the reference; the Redux embedder (``flux1-redux-dev.safetensors``: ``redux_up`` / ``redux_down``, in
``models/ipadapter`` or ComfyUI's ``models/style_models``) maps each of its patch features to the T5 width, and
those tokens are appended to the prompt's T5 tokens, as ComfyUI's StyleModelApply and diffusers'
FluxPriorReduxPipeline do. The unit's weight multiplies the tokens (ComfyUI's "multiply" strength); weight 0
leaves the prompt as it was; start/end limit the steps that see them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..core.errors import BadRequest, UnsafeModelFile

SIGLIP_SO400M_HEADS = {1152: 16}
"""heads by width where the shapes cannot tell (SigLIP so400m: 1152 wide, 16 heads of 72)"""


def is_redux(shapes: dict[str, list[int]]) -> bool:
    return "redux_up.weight" in shapes and "redux_down.weight" in shapes


def is_siglip(shapes: dict[str, list[int]]) -> bool:
    """SigLIP's vision tower: an attention-pooling head, no CLIP pre-layernorm."""
    return any(k.startswith("vision_model.head.") for k in shapes) and not any("pre_layrnorm" in k for k in shapes)


def load_redux(path: str | Path):
    """diffusers' ReduxImageEncoder with the file's weights (its widths read from them), or from a diffusers
    FluxPriorReduxPipeline folder's ``image_embedder/``."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        return ReduxImageEncoder.from_pretrained(str(path / "image_embedder"), local_files_only=True,
                                                 use_safetensors=True).eval()
    if path.suffix.lower() != ".safetensors":
        raise UnsafeModelFile(f"Redux {path.name}: .safetensors only; a pickle file is never opened")
    sd = load_file(str(path))
    up, down = sd["redux_up.weight"], sd["redux_down.weight"]
    model = ReduxImageEncoder(redux_dim=int(up.shape[1]), txt_in_features=int(down.shape[0]))
    model.load_state_dict(sd, strict=True)
    return model.eval()


@dataclass
class SiglipEncoder:
    model: torch.nn.Module
    processor: object

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def load_siglip(path: str | Path, *, dtype: torch.dtype, device) -> SiglipEncoder:
    """A SigLIP vision tower from a single file (ComfyUI's layout, ``vision_model.*``) or a transformers folder;
    a single file's config comes from its metadata when it has one, else from its shapes."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    path = Path(path)
    if path.is_dir():
        model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True)
    else:
        if path.suffix.lower() != ".safetensors":
            raise UnsafeModelFile(f"SigLIP {path.name}: .safetensors only; a pickle file is never opened")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
        if meta.get("imagesmith.configs"):
            cfg = json.loads(meta["imagesmith.configs"]).get("vision_model", {})
            config = SiglipVisionConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        else:
            patch = sd["vision_model.embeddings.patch_embedding.weight"]
            hidden, size_p = int(patch.shape[0]), int(patch.shape[-1])
            positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
            layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
            config = SiglipVisionConfig(
                hidden_size=hidden, patch_size=size_p, image_size=int(round(positions ** 0.5)) * size_p,
                num_hidden_layers=layers, num_attention_heads=SIGLIP_SO400M_HEADS.get(hidden, max(1, hidden // 64)),
                intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]))
        model = SiglipVisionModel(config)
        wanted = set(model.state_dict())  # transformers 5 names the tower's tensors without "vision_model."
        mapped = {}
        for k, v in sd.items():
            for cand in (k, k.removeprefix("vision_model."), "vision_model." + k):
                if cand in wanted:
                    mapped[cand] = v
                    break
        missing, _ = model.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing:
            raise BadRequest(f"SigLIP {path.name} lacks {len(missing)} tensors (first: {missing[0]})")
    size = int(model.config.image_size)
    processor = SiglipImageProcessor(size={"height": size, "width": size})
    return SiglipEncoder(model.to(device=device, dtype=dtype).eval(), processor)


def redux_tokens(encoder: SiglipEncoder, embedder, image: Image.Image) -> torch.Tensor:
    """The reference's tokens at the T5 width, [1, patches, D], float32 on the CPU."""
    param = next(encoder.model.parameters())
    pixels = encoder.processor.preprocess(images=image.convert("RGB"), do_resize=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(pixel_values=pixels.pixel_values.to(param.device, param.dtype)).last_hidden_state
        e = next(embedder.parameters())
        tokens = embedder(hidden.to(e.device, e.dtype)).image_embeds
    return tokens.float().cpu()
