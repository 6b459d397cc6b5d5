"""IP-Adapter: a reference image guides an SD1/SD2/SDXL UNet as a prompt would (Ye et al. 2023).

The user's files: the adapter (``models/ipadapter/*.safetensors``, the original layout: ``image_proj.*`` and
``ip_adapter.{1,3,5,...}.to_k_ip/to_v_ip``; a pickle is refused) and a CLIP vision encoder
(``models/clip_vision/``: a transformers folder, or a single safetensors file as ComfyUI keeps them, its
configuration read from the tensors' shapes). diffusers' UNet loader turns the adapter into its image projection
and IP attention processors; loading and unloading happen under the model's lock, as LoRAs do, so a job without
a reference runs the plain UNet again.

Per reference: the image through the encoder (its projected embedding for a plain adapter, the penultimate hidden
states for a Plus one), the unconditional side a zero embedding (plain) or the encoding of a black image (Plus),
as diffusers and the reference implementation do; its weight is the IP attention's scale, set to 0 outside the
reference's step window."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..core.errors import BadRequest, UnsafeModelFile

_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
"""attention heads of the CLIP vision towers IP-Adapters use, by width (ViT-L, ViT-H, ViT-bigG): the one number a
single-file checkpoint's shapes do not tell"""


def load_adapter_state(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a safetensors file (the layout diffusers' loader takes),
    or from a torch file (``.bin``/``.pth``: the FaceID releases exist only so) read as data by
    :mod:`imagesmith.models.legacy_pth`, never unpickled."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    if path.suffix.lower() in (".bin", ".pth", ".pt"):
        from ..models.legacy_pth import UnsafePickle, read_pth_state_dict
        try:
            flat = read_pth_state_dict(path)
        except UnsafePickle as exc:
            raise UnsafeModelFile(f"IP-Adapter {path.name}: not read ({exc}); imagesmith never unpickles a model "
                                  "file") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise BadRequest(f"IP-Adapter {path.name} cannot be read: {exc}") from None
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = value
    elif path.suffix.lower() != ".safetensors":
        raise UnsafeModelFile(f"IP-Adapter {path.name}: imagesmith reads IP-Adapters from .safetensors, or from "
                              "torch files as data; this is neither")
    else:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, _, rest = key.partition(".")
                    if part in state:
                        state[part][rest] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise BadRequest(f"IP-Adapter {path.name} cannot be read: {exc}") from None
    if not state["image_proj"] or not state["ip_adapter"]:
        raise BadRequest(f"{path.name} is not an IP-Adapter (no image_proj.* and ip_adapter.* tensors)")
    return state


def adapter_kind(state: dict) -> str:
    """``plain``, ``Plus``, ``full face``, ``FaceID`` or ``FaceID Plus`` (:func:`imagesmith.models.probe.ip_adapter_kind`)."""
    from ..models.probe import ip_adapter_kind
    return ip_adapter_kind(f"image_proj.{k}" for k in state["image_proj"])


def adapter_widths(state: dict) -> tuple[int, int, bool]:
    """(cross-attention width it adds to, image-embedding width it reads, whether it reads hidden states: Plus).
    FaceID: the identity embedding's width (FaceID Plus: the CLIP hidden states' width, for the face crop)."""
    k = next(v for key, v in state["ip_adapter"].items() if key.endswith("to_k_ip.weight"))
    proj = state["image_proj"]
    kind = adapter_kind(state)
    if kind == "FaceID":
        return int(k.shape[1]), int(proj["proj.0.weight"].shape[1]), False
    if kind == "FaceID Plus":
        return int(k.shape[1]), int(proj["perceiver_resampler.proj_in.weight"].shape[1]), True
    if "latents" in proj:
        return int(k.shape[1]), int(proj["proj_in.weight"].shape[1]), True
    if "proj.weight" in proj:
        return int(k.shape[1]), int(proj["proj.weight"].shape[1]), False
    if "proj.0.weight" in proj and "proj.3.weight" in proj:  # "full face": an MLP over the hidden states
        return int(k.shape[1]), int(proj["proj.0.weight"].shape[1]), True
    raise BadRequest("this IP-Adapter's image projection is of no layout imagesmith knows")


def faceid_id_width(state: dict) -> int:
    """The identity embedding's width a FaceID adapter reads (512 for ArcFace)."""
    proj = state["image_proj"]
    if "proj.0.weight" in proj:
        return int(proj["proj.0.weight"].shape[1])
    return int(proj["proj.0.weight" if "proj.0.weight" in proj else "proj.2.weight"].shape[1])


# ------------------------------------------------------------------------------------------ the image encoder
@dataclass
class ImageEncoder:
    model: torch.nn.Module
    processor: object

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def fits(self, width: int, plus: bool) -> bool:
        return (self.hidden_size if plus else self.projection_dim) == width


def load_image_encoder(path: str | Path, *, dtype: torch.dtype, device) -> ImageEncoder:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    path = Path(path)
    if path.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
        size = int(model.config.image_size)
        processor = (CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
                     if (path / "preprocessor_config.json").is_file()
                     else CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    else:
        if path.suffix.lower() != ".safetensors":
            raise UnsafeModelFile(f"CLIP vision {path.name}: .safetensors only; a pickle file is never opened")
        from safetensors.torch import load_file
        sd = load_file(str(path))
        patch = sd["vision_model.embeddings.patch_embedding.weight"]
        hidden, size_p = int(patch.shape[0]), int(patch.shape[-1])
        positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
        config = CLIPVisionConfig(
            hidden_size=hidden, patch_size=size_p, image_size=int(round((positions - 1) ** 0.5)) * size_p,
            num_hidden_layers=layers, num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)),
            intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            projection_dim=int(sd["visual_projection.weight"].shape[0]), hidden_act="gelu")
        model = CLIPVisionModelWithProjection(config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if [k for k in missing if "position_ids" not in k]:
            raise BadRequest(f"CLIP vision {path.name} lacks {len(missing)} tensors (first: {missing[0]})")
        size = config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ImageEncoder(model.to(device=device, dtype=dtype).eval(), processor)


def encoder_widths(path: str | Path) -> tuple[int, int] | None:
    """(projection dim, hidden size) of a CLIP vision folder or file without loading it; None if unreadable."""
    path = Path(path)
    try:
        if path.is_dir():
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            cfg = cfg.get("vision_config", cfg)
            return int(cfg["projection_dim"]), int(cfg["hidden_size"])
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return (int(f.get_slice("visual_projection.weight").get_shape()[0]),
                    int(f.get_slice("vision_model.embeddings.patch_embedding.weight").get_shape()[0]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError, Exception):  # noqa: BLE001 - a listing helper
        return None


def image_embeds(encoder: ImageEncoder, image: Image.Image, *, plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, unconditional) embeddings, [1, 1, D] (plain) or [1, 1, T, D] (Plus), float32 on the CPU."""
    model = encoder.model
    param = next(model.parameters())
    pixels = encoder.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    pixels = pixels.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        if plus:
            cond = model(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            cond = model(pixels).image_embeds
            uncond = torch.zeros_like(cond)
    return cond.float().cpu()[None], uncond.float().cpu()[None]


# ------------------------------------------------------------------------------------------ the UNet's side
def ensure_loaded(unet, state: dict, adapters: list[tuple[str, dict]]) -> None:
    """Make ``unet`` carry exactly ``adapters`` ((key, state dict) in unit order), loading or unloading as needed;
    ``state`` is the model holder's (remembers what is loaded)."""
    wanted = tuple(key for key, _ in adapters)
    if state.get("ip_adapters", ()) == wanted:
        return
    if state.get("ip_adapters"):
        unload(unet)
        state["ip_adapters"] = ()
    if adapters:
        width = int(unet.config.cross_attention_dim)
        for key, sd in adapters:
            cross = adapter_widths(sd)[0]
            if cross != width:
                raise BadRequest(f"IP-Adapter {Path(key.split('@')[0]).stem} is for a UNet of cross-attention width "
                                 f"{cross} ({_arch_of(cross)}); this model's is {width} ({_arch_of(width)})")
        unet._load_ip_adapter_weights([sd for _, sd in adapters], low_cpu_mem_usage=False)
        layers = unet.encoder_hid_proj.image_projection_layers
        for i, (key, sd) in enumerate(adapters):
            if adapter_kind(sd) == "FaceID Plus":  # PlusV2 adds the identity tokens back (its "shortcut")
                v2 = "v2" in Path(key.split("@")[0]).stem.lower()
                layers[i] = PackedFaceIDPlus(layers[i], faceid_id_width(sd), shortcut=v2)
        state["ip_adapters"] = wanted


class PackedFaceIDPlus(torch.nn.Module):
    """diffusers' FaceID Plus projection reads the face's CLIP hidden states from an attribute it expects set before
    each call; here they travel with the identity embedding, packed in one tensor ``[N, id + T * D]``, so they follow
    the batch (cond and uncond halves, several images) exactly as the embedding does."""

    def __init__(self, inner, id_width: int, *, shortcut: bool):
        super().__init__()
        self.inner, self.id_width = inner, id_width
        inner.shortcut = shortcut

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden = self.inner.proj_in.in_features
        self.inner.clip_embeds = packed[:, self.id_width:].reshape(packed.shape[0], 1, -1, hidden)
        try:
            return self.inner(packed[:, :self.id_width])
        finally:
            self.inner.clip_embeds = None


def pack_faceid_plus(identity: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """[1, 1, id] and [1, 1, T, D] -> the [1, 1, id + T * D] :class:`PackedFaceIDPlus` reads."""
    return torch.cat([identity, hidden.flatten(2)], dim=-1)


def _arch_of(width: int) -> str:
    return {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(width, "unknown")


def unload(unet) -> None:
    """The plain UNet again: no image projection, the IP attention processors replaced by plain ones."""
    from diffusers.models.attention_processor import (AttnProcessor2_0, IPAdapterAttnProcessor,
                                                      IPAdapterAttnProcessor2_0)
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    procs = {name: AttnProcessor2_0() if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)) else p
             for name, p in unet.attn_processors.items()}
    unet.set_attn_processor(procs)


def reads_hidden_states(unet, index: int) -> bool:
    """Whether adapter ``index`` takes the encoder's penultimate hidden states (Plus, full face) rather than its
    projected embedding (plain), as diffusers decides it."""
    from diffusers.models.embeddings import ImageProjection
    layers = getattr(getattr(unet, "encoder_hid_proj", None), "image_projection_layers", [])
    return index < len(layers) and not isinstance(layers[index], ImageProjection)


def set_scales(unet, scales: list[float]) -> None:
    """Each adapter's weight in every IP attention processor (0: that reference does nothing this step)."""
    for proc in unet.attn_processors.values():
        scale = getattr(proc, "scale", None)
        if isinstance(scale, list) and len(scale) == len(scales):
            scale[:] = scales
