"""ComfyUI's core nodes, as the common workflows use them, on imagesmith's engine. Each keeps ComfyUI's name,
inputs (types, defaults, ranges, choices), outputs and ``/object_info`` schema, so API prompts and UI workflows
written for ComfyUI run unchanged. ``NODES`` maps class names to definitions; ``model_lists`` gives the dynamic
choices (model files relative to their folder, with extensions, as ComfyUI shows them)."""

from __future__ import annotations

import json
import math
import re
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ... import __version__
from ...core.errors import BadRequest, NotFound
from ...core.imageio import load_image, save_png_atomic
from ...core.metadata import build_infotext, make_png_chunks
from ...core.sampling_names import SAMPLER_NAMES, SCHEDULE_NAMES, sampler_label, schedule_label
from ..loras import ResolvedLora, apply_loras
from ..sampling.ksampler import available_samplers
from .sample import custom_sigmas, ksample, resolved_loras, schedule_sampling, vae_module
from .spec import MAX_SEED, Input, Node
from .text_encoders import (TYPES as CLIP_TYPES, companion_for, load_encoders, pipeline_view, qwen_text_pipeline,
                            text_encoder_files)
from .values import (ClipValue, ClipVisionValue, Cond, ControlNetValue, LoraUse, ModelValue, StyleModelValue,
                     UpscaleModelValue, VaeValue)

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
NAME_RE = re.compile(r"^[\w .()\[\]+,@=-]{1,200}$")


def comfy_samplers() -> list[str]:
    done = set(available_samplers())
    return [s.name for s in SAMPLER_NAMES if s.comfy and s.name in done]


def comfy_schedulers() -> list[str]:
    return [s.name for s in SCHEDULE_NAMES if s.comfy]


def model_lists(registry, upscalers: list[str], input_dir: Path | None = None) -> dict[str, list[str]]:
    """The dynamic choices: registry files by folder (relative paths with extensions, as ComfyUI lists them),
    upscalers, and the caller's input images."""
    def names(kind: str) -> list[str]:
        return sorted({(e.rel_path or e.name) for e in registry.list(kind)}, key=str.lower)
    out = {"checkpoints": names("checkpoint"), "loras": names("lora"), "vae": names("vae"),
           "controlnet": names("controlnet"), "embeddings": names("embedding"),
           "upscale_models": [n for n in upscalers if n != "Lanczos"] + ["Lanczos"],
           "samplers": comfy_samplers(), "schedulers": comfy_schedulers(), "input": input_files(input_dir),
           "diffusion_models": sorted({(e.rel_path or e.name) for e in registry.list("checkpoint")
                                       if e.format == "single-file" and e.components
                                       and not any(c.startswith("text_encoder") for c in e.components)},
                                      key=str.lower),
           "text_encoders": sorted(text_encoder_files(registry.settings), key=str.lower),
           "clip_vision": names("clip_vision"),
           "style_models": sorted({(e.rel_path or e.name) for e in registry.list("ipadapter") if e.arch == "flux"},
                                  key=str.lower)}
    out["unet_gguf"] = [n for n in out["diffusion_models"] if n.lower().endswith(".gguf")]  # ComfyUI-GGUF's list
    return out


def output_choices(output_dir: Path | None) -> list[str]:
    """LoadImageOutput's choices: the caller's saved images, as ComfyUI names them (``name [output]``)."""
    return [f"{name} [output]" for name in input_files(output_dir)]


def input_files(input_dir: Path | None) -> list[str]:
    if input_dir is None or not input_dir.is_dir():
        return []
    return sorted(str(p.relative_to(input_dir)).replace("\\", "/") for p in input_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                  and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ helpers

def _entry(engine, kind: str, name: str):
    if kind == "checkpoint":
        return engine.checkpoint(name)
    return engine.registry.get(name, kind)


def _lora(engine, name: str, strength: float) -> LoraUse:
    e = engine.registry.get(name, "lora")
    return LoraUse(e.name, str(e.path), e.arch, Path(e.path).stat().st_mtime_ns, float(strength))


def to_image(t: torch.Tensor) -> Image.Image:
    """One [H, W, C] IMAGE row -> PIL, as ComfyUI's SaveImage makes it: 255 x, clipped, truncated (not rounded),
    so the saved pixels are ComfyUI's own."""
    arr = np.clip(t.float().cpu().numpy() * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0])


def from_image(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def _resize_bchw(x: torch.Tensor, height: int, width: int, method: str) -> torch.Tensor:
    if method == "lanczos":
        rows = [from_image(to_image(r.permute(1, 2, 0)).resize((width, height), Image.LANCZOS)).permute(2, 0, 1)
                for r in x]
        return torch.stack(rows)
    if method == "bislerp":
        method = "bilinear"
    mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}[method]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(x, size=(height, width), mode=mode, **kwargs)


def _center_crop(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's 'center' crop before a resize: keep the target's aspect ratio."""
    h, w = x.shape[-2:]
    old, new = w / h, width / height
    if old > new:
        cut = round((w - w * new / old) / 2)
        return x[..., :, cut:w - cut]
    if old < new:
        cut = round((h - h * old / new) / 2)
        return x[..., cut:h - cut, :]
    return x


def _upscale(x: torch.Tensor, method: str, width: int, height: int, crop: str) -> torch.Tensor:
    if crop == "center":
        x = _center_crop(x, width, height)
    return _resize_bchw(x, height, width, method)


def _vae_module(ctx, vae: VaeValue):
    return vae_module(ctx.engine, vae)


def safe_name(name: str, what: str) -> str:
    """A file or folder name from a client, checked as a name (never joined as a path)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", "..") or name.startswith("."):
        raise BadRequest(f"{what} {name!r} is not a plain file name")
    return name


def safe_subfolder(sub: str) -> list[str]:
    if not sub:
        return []
    parts = sub.replace("\\", "/").split("/")
    return [safe_name(p, "subfolder") for p in parts if p]


# ------------------------------------------------------------------------------------------------ loaders

def _checkpoint_loader(ctx, ckpt_name):
    entry = _entry(ctx.engine, "checkpoint", ckpt_name)
    return ModelValue(entry), ClipValue(entry), VaeValue(entry=entry)


def _vae_loader(ctx, vae_name):
    e = ctx.engine.registry.get(vae_name, "vae")
    return (VaeValue(name=e.rel_path or e.name),)


def _unet_loader(ctx, unet_name, weight_dtype="default"):
    """A diffusion model alone (FLUX/SD3 transformer, UNet); its VAE and text encoders come from their own
    loaders. fp8 weight types run at the engine's dtype where the device cannot compute in fp8."""
    return (ModelValue(_entry(ctx.engine, "checkpoint", unet_name)),)


def _clip_loader(*names_and_type):
    def run(ctx, *args, **kw):
        files = tuple(kw[n] for n in names_and_type)
        arch = CLIP_TYPES.get(kw.get("type", "stable_diffusion"))
        if arch is None:
            raise BadRequest(f"CLIP type {kw.get('type')!r} is not supported: {', '.join(CLIP_TYPES)}")
        if arch == "qwen":  # Qwen-Image's Qwen2.5-VL file: built from its own file, no folder needed
            from ...models.registry import ModelEntry
            qwen_text_pipeline(ctx.engine, files[0])  # loads it now: a wrong file is a clear error here
            path = text_encoder_files(ctx.engine.settings)[files[0]]
            return (ClipValue(ModelEntry(name=path.stem, kind="unknown", arch="qwen", path=path), files=files),)
        entry = companion_for(ctx.engine.registry, arch)
        load_encoders(ctx.engine, entry, arch, files)  # every file fits its role, or a clear error now
        return (ClipValue(entry, files=files),)
    return run


def _lora_loader(ctx, model, clip, lora_name, strength_model, strength_clip):
    from dataclasses import replace
    lora = _lora(ctx.engine, lora_name, 1.0)
    return (model.with_lora(replace(lora, strength=strength_model)) if strength_model != 0 else model,
            clip.with_lora(replace(lora, strength=strength_clip)) if strength_clip != 0 else clip)


def _lora_model_only(ctx, model, lora_name, strength_model):
    return (model.with_lora(_lora(ctx.engine, lora_name, strength_model)) if strength_model != 0 else model,)


def _clip_set_last_layer(ctx, clip, stop_at_clip_layer):
    from dataclasses import replace
    return (replace(clip, clip_skip=-int(stop_at_clip_layer)),)


def _controlnet_loader(ctx, control_net_name):
    e = ctx.engine.registry.get(control_net_name, "controlnet")
    return (ControlNetValue(e.rel_path or e.name),)


def _clip_vision_loader(ctx, clip_name):
    e = ctx.engine.registry.get(clip_name, "clip_vision")
    return (ClipVisionValue(e.rel_path or e.name),)


def _clip_vision_encode(ctx, clip_vision, image, crop="center"):
    """A SigLIP encoder's last hidden states of each image (what FLUX Redux reads); ``crop`` center: the image's
    centre square, as ComfyUI's clip_preprocess crops it; none: squashed to the encoder's square."""
    entry = ctx.engine.registry.get(clip_vision.name, "clip_vision")
    if not any("SigLIP" in n for n in entry.notes):
        raise BadRequest(f"CLIPVisionEncode: {clip_vision.name} is a CLIP encoder; imagesmith's graph encodes with "
                         "SigLIP ones (FLUX Redux's); IP-Adapters take CLIP encoders through the native API")
    encoder = ctx.engine.siglip_encoder(entry)
    param = next(encoder.model.parameters())
    states = []
    for frame in image.clamp(0, 1):
        picture = Image.fromarray((frame[..., :3].cpu().numpy() * 255).round().astype(np.uint8))
        if crop == "center":
            side = min(picture.size)
            x, y = (picture.width - side) // 2, (picture.height - side) // 2
            picture = picture.crop((x, y, x + side, y + side))
        pixels = encoder.processor.preprocess(images=picture, do_resize=True, return_tensors="pt").pixel_values
        with torch.inference_mode():
            states.append(encoder.model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state.float()
                          .cpu())
    return ({"last_hidden_state": torch.cat(states), "encoder": clip_vision.name},)


def _style_model_loader(ctx, style_model_name):
    e = ctx.engine.registry.get(style_model_name, "ipadapter")
    if e.arch != "flux":
        raise BadRequest(f"StyleModelLoader: {style_model_name} is not a FLUX Redux style model")
    return (StyleModelValue(e.rel_path or e.name),)


def _style_model_apply(ctx, conditioning, style_model, clip_vision_output, strength=1.0, strength_type="multiply"):
    """FLUX Redux: the reference's tokens appended to every conditioning entry's text tokens, at text position 0, as
    ComfyUI's StyleModelApply. ``multiply`` scales the tokens by ``strength``; ``attn_bias`` keeps them and biases
    the attention paid to them by log(strength) instead (0: never looked at; the prompt's and the picture's tokens
    read them, they themselves read freely), in ComfyUI's layout: an additive mask over the text tokens plus one
    row and column standing for every image token (``attn_bias`` in the entry)."""
    if strength_type not in ("multiply", "attn_bias"):
        raise BadRequest(f"StyleModelApply: strength_type must be multiply or attn_bias, not {strength_type!r}")
    embedder = ctx.engine.redux_embedder(ctx.engine.registry.get(style_model.name, "ipadapter"))
    hidden = clip_vision_output["last_hidden_state"]
    width = int(embedder.redux_up.weight.shape[1])
    if hidden.shape[-1] != width:
        raise BadRequest(f"StyleModelApply: {style_model.name} reads vision features {width} wide; "
                         f"{clip_vision_output['encoder']} gives {hidden.shape[-1]}")
    e = next(embedder.parameters())
    with torch.inference_mode():
        tokens = embedder(hidden.to(e.device, e.dtype)).image_embeds.float().cpu()
    tokens = tokens.flatten(0, 1).unsqueeze(0)
    if strength_type == "multiply":
        tokens = tokens * float(strength)
    out = []
    for c in conditioning:
        if c.arch != "flux" or "txt_ids" not in c.extra:
            raise BadRequest(f"StyleModelApply: FLUX Redux extends FLUX conditioning, not {c.arch}'s")
        embeds = torch.cat([c.embeds, tokens.to(c.embeds.dtype)], dim=1)
        ids = c.extra["txt_ids"]
        zeros = torch.zeros(embeds.shape[1], ids.shape[-1], dtype=ids.dtype, device=ids.device)
        extra = {**c.extra, "txt_ids": zeros}
        if "attn_bias" in c.extra or strength_type == "attn_bias" and float(strength) != 1.0:
            factor = float(strength) if strength_type == "attn_bias" else 1.0
            extra["attn_bias"] = redux_attention_bias(c.extra.get("attn_bias"), c.embeds.shape[1],
                                                      tokens.shape[1], factor)
        out.append(Cond(embeds, c.arch, c.pooled, extra))
    return (out,)


def redux_attention_bias(old: torch.Tensor | None, n_text: int, n_new: int, factor: float) -> torch.Tensor:
    """The additive attention mask after ``n_new`` reference tokens join ``n_text`` text tokens: [T + 1, T + 1]
    over the text tokens and one position standing for all image tokens (ComfyUI's layout, its image size 1 x 1).
    The old mask's blocks are kept around the new tokens; every row but the new tokens' own reads them at
    log(factor)."""
    if old is None:
        old = torch.zeros(n_text + 1, n_text + 1)
    if old.shape != (n_text + 1, n_text + 1):
        raise BadRequest(f"StyleModelApply: the conditioning's attention mask covers {old.shape[0] - 1} text tokens, "
                         f"it has {n_text}")
    t, n = n_text, n_new
    new = torch.zeros(t + n + 1, t + n + 1)
    new[:t, :t], new[:t, t + n:] = old[:t, :t], old[:t, t:]
    new[t + n:, :t], new[t + n:, t + n:] = old[t:, :t], old[t:, t:]
    bias = float("-inf") if factor == 0 else math.log(factor)
    new[:t, t:t + n] = bias
    new[t + n:, t:t + n] = bias
    return new


def _upscale_model_loader(ctx, model_name):
    ctx.engine.upscalers().get(model_name)  # must exist
    return (UpscaleModelValue(model_name),)


# ------------------------------------------------------------------------------------------------ text

def encode_text(ctx, clip: ClipValue, text: str, *, t5_text: str | None = None) -> Cond:
    """``text`` through the CLIP's encoders as ComfyUI's CLIPTextEncode does; for FLUX, ``t5_text`` (when given) is
    what T5 reads instead (CLIPTextEncodeFlux's two prompts)."""
    engine = ctx.engine
    entry = clip.entry
    arch = entry.arch
    if arch == "qwen":
        return encode_qwen(ctx, clip, text)
    holder = engine.pipeline(entry)
    encoders = load_encoders(engine, entry, arch, clip.files) if clip.files else {}
    with holder.use():
        pipe = holder.value
        loras = resolved_loras(clip.loras)
        if loras or holder.state.get("lora_adapters"):
            apply_loras(pipe, holder.state, loras, arch)
        lora_key = [(l.path, l.weight) for l in loras if l.weight != 0]
        model_key = f"{entry.path}@{Path(entry.path).stat().st_mtime_ns if Path(entry.path).exists() else 0}"
        if encoders:  # ComfyUI's CLIP loaders: these files' encoders over the folder's tokenizers
            model_key += "|" + ",".join(clip.files)
            pipe = pipeline_view(pipe, encoders)
        inversions = engine.textual_inversions(pipe, arch) if "embedding:" in text.lower() else None
        with torch.inference_mode():
            if arch in ("sd1", "sd2", "house"):
                z = engine.prompt_encoder.encode_sd(text, pipe.tokenizer, pipe.text_encoder, model_key=model_key,
                                                    loras=lora_key, clip_skip=clip.clip_skip, device=engine.device,
                                                    dtype=engine.dtype, syntax="comfy", embeddings=inversions)
                return Cond(z.float().cpu(), arch)
            if arch == "sdxl":
                z, pooled = engine.prompt_encoder.encode_sdxl(
                    text, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                    model_key=model_key, loras=lora_key, clip_skip=clip.clip_skip, device=engine.device,
                    dtype=engine.dtype, syntax="comfy", embeddings=inversions)
                return Cond(z.float().cpu(), arch, pooled.float().cpu())
            from ..prompts import plain_prompt
            if arch == "sd3":
                pe, _, pooled, _ = pipe.encode_prompt(plain_prompt(text), None, None, device=engine.device,
                                                      do_classifier_free_guidance=False)
                return Cond(pe.float().cpu(), arch, pooled.float().cpu())
            if arch == "flux":
                pe, pooled, txt_ids = pipe.encode_prompt(plain_prompt(text), None if t5_text is None else
                                                         plain_prompt(t5_text), device=engine.device)
                return Cond(pe.float().cpu(), arch, pooled.float().cpu(), {"txt_ids": txt_ids})
    raise BadRequest(f"CLIPTextEncode cannot encode for {arch} models")


def encode_qwen(ctx, clip: ClipValue, text: str, images: list[torch.Tensor] = (), *,
                cls_name: str = "QwenImagePipeline", references: list[torch.Tensor] = ()) -> Cond:
    """Qwen-Image conditioning: the Qwen2.5-VL hidden states of the prompt (and of the pictures, for the edit
    nodes), their padding mask, and the pictures' latents to append as reference tokens."""
    from ..prompts import plain_prompt
    from ..qwen_image import encode_text as qwen_encode
    engine = ctx.engine
    pictures = [to_image(im[0]) for im in images]
    with torch.inference_mode():
        if clip.files:
            embeds, mask = qwen_encode(qwen_text_pipeline(engine, clip.files[0], cls_name), plain_prompt(text),
                                       engine.device, pictures)
        else:  # a Qwen-Image checkpoint's own encoder (CheckpointLoaderSimple)
            holder = engine.pipeline(clip.entry)
            with holder.use():
                pipe = holder.value
                if type(pipe).__name__ != cls_name:
                    import diffusers

                    from ...models.loaders import qwen_processor
                    processor = getattr(pipe, "processor", None) or qwen_processor(pipe.tokenizer)
                    extra = {} if cls_name == "QwenImagePipeline" else {"processor": processor}
                    pipe = getattr(diffusers, cls_name)(scheduler=None, vae=None, text_encoder=pipe.text_encoder,
                                                        tokenizer=pipe.tokenizer, transformer=None, **extra)
                embeds, mask = qwen_encode(pipe, plain_prompt(text), engine.device, pictures)
    extra: dict = {}
    if mask is not None:
        extra["text_mask"] = mask.cpu()
    if references:
        extra["reference_latents"] = list(references)
    return Cond(embeds.float().cpu(), "qwen", extra=extra)


def _scaled_to_area(image: torch.Tensor, area: int, multiple: int = 1) -> torch.Tensor:
    """ComfyUI's edit nodes: the picture at about ``area`` pixels, its aspect kept ("area" resampling)."""
    h0, w0 = image.shape[1:3]
    scale = (area / (w0 * h0)) ** 0.5
    w = max(multiple, round(w0 * scale / multiple) * multiple)
    h = max(multiple, round(h0 * scale / multiple) * multiple)
    return _resize_bchw(image[..., :3].permute(0, 3, 1, 2).float(), h, w, "area").permute(0, 2, 3, 1).clamp(0, 1)


def _reference_latent(ctx, vae, image: torch.Tensor) -> torch.Tensor:
    """A picture's latent for Qwen-Image-Edit's reference tokens, cropped to 16 px (whole 2x2 latent patches)."""
    h, w = image.shape[1] // 16 * 16, image.shape[2] // 16 * 16
    y, x = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
    crop = image[:, y:y + h, x:x + w, :3]
    return ctx.engine.vae_encode(_vae_module(ctx, vae), crop.permute(0, 3, 1, 2) * 2 - 1).float()


def _text_encode_qwen_edit(ctx, clip, prompt, vae=None, image=None):
    """ComfyUI's TextEncodeQwenImageEdit: the picture at about 1 MP for the text encoder and, with a VAE, as the
    reference latent."""
    if clip.entry.arch != "qwen":
        raise BadRequest("TextEncodeQwenImageEdit needs a Qwen-Image CLIP (CLIPLoader type qwen_image)")
    if image is None:
        return ([encode_qwen(ctx, clip, prompt)],)
    from .. import qwen_image as Q
    scaled = _scaled_to_area(image, Q.VAE_REFERENCE_AREA)  # about 1 MP
    refs = [_reference_latent(ctx, vae, scaled)] if vae is not None else []
    return ([encode_qwen(ctx, clip, prompt, [scaled], cls_name="QwenImageEditPipeline", references=refs)],)


def _text_encode_qwen_edit_plus(ctx, clip, prompt, vae=None, image1=None, image2=None, image3=None):
    """ComfyUI's TextEncodeQwenImageEditPlus: up to three pictures, each at about 384x384 for the text encoder
    ("Picture 1: ...") and, with a VAE, at about 1 MP (sides in multiples of 8) as a reference latent."""
    if clip.entry.arch != "qwen":
        raise BadRequest("TextEncodeQwenImageEditPlus needs a Qwen-Image CLIP (CLIPLoader type qwen_image)")
    pictures = [im for im in (image1, image2, image3) if im is not None]
    if not pictures:
        return ([encode_qwen(ctx, clip, prompt)],)
    from .. import qwen_image as Q
    small = [_scaled_to_area(im, Q.PLUS_CONDITION_AREA) for im in pictures]  # about 384x384
    refs = [_reference_latent(ctx, vae, _scaled_to_area(im, Q.VAE_REFERENCE_AREA, 8)) for im in pictures] \
        if vae else []
    return ([encode_qwen(ctx, clip, prompt, small, cls_name="QwenImageEditPlusPipeline", references=refs)],)


def _clip_text_encode(ctx, text, clip):
    return ([encode_text(ctx, clip, text)],)


def _conditioning_combine(ctx, conditioning_1, conditioning_2):
    return (list(conditioning_1) + list(conditioning_2),)


def _conditioning_set_area(ctx, conditioning, width, height, x, y, strength):
    area = (height // 8, width // 8, y // 8, x // 8)
    return ([c.but(area=area, strength=strength, set_area_to_bounds=False) for c in conditioning],)


def _conditioning_set_mask(ctx, conditioning, mask, strength, set_cond_area):
    m = mask if mask.ndim == 3 else mask[None]
    return ([c.but(mask=m, mask_strength=strength, set_area_to_bounds=set_cond_area != "default")
             for c in conditioning],)


def _conditioning_zero_out(ctx, conditioning):
    out = []
    for c in conditioning:
        out.append(Cond(torch.zeros_like(c.embeds), c.arch, None if c.pooled is None else torch.zeros_like(c.pooled),
                        dict(c.extra)))
    return (out,)


UNION_TYPES = {"openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2, "canny/lineart/anime_lineart/mlsd": 3,
               "normal": 4, "segment": 5, "tile": 6, "repaint": 7}
"""ComfyUI's SetUnionControlNetType choices: xinsir's SDXL Union/ProMax control types, by their index"""


def _set_union_type(ctx, control_net, type):
    from dataclasses import replace
    return (replace(control_net, union_type=UNION_TYPES.get(type)),)


def _clip_text_encode_flux(ctx, clip, clip_l, t5xxl, guidance):
    """ComfyUI's CLIPTextEncodeFlux: one prompt for CLIP-L (the pooled vector), another for T5 (the tokens), and
    the distilled guidance."""
    if clip.entry.arch != "flux":
        raise BadRequest(f"CLIPTextEncodeFlux needs a FLUX CLIP (DualCLIPLoader type flux), not {clip.entry.arch}'s")
    return ([encode_text(ctx, clip, clip_l, t5_text=t5xxl).but(guidance=float(guidance))],)


def _flux_guidance(ctx, conditioning, guidance):
    return ([c.but(guidance=float(guidance)) for c in conditioning],)


def _controlnet_apply(ctx, conditioning, control_net, image, strength):
    if strength == 0:
        return (conditioning,)
    hint = image.permute(0, 3, 1, 2)[:1].float()
    return ([c.but(controls=tuple(c.extra.get("controls", ())) + ((control_net, hint, strength, 0.0, 1.0),))
             for c in conditioning],)


def _controlnet_apply_advanced(ctx, positive, negative, control_net, image, strength, start_percent, end_percent,
                               vae=None):
    if strength == 0:
        return positive, negative
    hint = image.permute(0, 3, 1, 2)[:1].float()
    unit = (control_net, hint, strength, start_percent, end_percent, vae)  # FLUX/SD3 ones: encoded by this VAE
    return tuple([c.but(controls=tuple(c.extra.get("controls", ())) + (unit,)) for c in side]
                 for side in (positive, negative))


def _controlnet_inpainting_alimama(ctx, positive, negative, control_net, vae, image, mask, strength, start_percent,
                                   end_percent):
    """ControlNetInpaintingAliMamaApply: a ControlNet unit with the mask beside the picture (white = repaint), for
    the inpainting ControlNets that read it (InstantX's Qwen-Image one); others get the picture alone."""
    if strength == 0:
        return positive, negative
    hint = image.permute(0, 3, 1, 2)[:1].float()
    m = mask.reshape(-1, 1, *mask.shape[-2:])[:1].float()
    unit = (control_net, hint, strength, start_percent, end_percent, vae, m)
    return tuple([c.but(controls=tuple(c.extra.get("controls", ())) + (unit,)) for c in side]
                 for side in (positive, negative))


# ------------------------------------------------------------------------------------------------ latents

def _empty_latent(channels: int):
    def run(ctx, width, height, batch_size):
        return ({"samples": torch.zeros(batch_size, channels, height // 8, width // 8)},)
    return run


def _ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
    return (ksample(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                    denoise=denoise),)


def _ksampler_advanced(ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    return (ksample(ctx, model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                    add_noise=add_noise == "enable", start_at_step=start_at_step, end_at_step=end_at_step,
                    leftover_noise=return_with_leftover_noise == "enable"),)


# ComfyUI's custom sampling: the sampler, the schedule, the noise and the guider as separate values
def _sd_turbo_scheduler(ctx, model, steps, denoise):
    """ComfyUI's SDTurboScheduler: SD/SDXL Turbo's steps at timesteps 999, 899, ..., 99 (the last ``int(10 *
    denoise)`` of them), then 0."""
    if denoise <= 0:
        return (torch.zeros(0),)
    ms = schedule_sampling(ctx, model)
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + int(steps)]
    sigmas = ms.sigma(timesteps.float()).float()
    return (torch.cat([sigmas, sigmas.new_zeros(1)]),)


def _ksampler_select(ctx, sampler_name):
    return ({"sampler": sampler_name},)


def _basic_scheduler(ctx, model, scheduler, steps, denoise):
    return (custom_sigmas(ctx, model, scheduler, steps, denoise),)


def _random_noise(ctx, noise_seed):
    return ({"seed": int(noise_seed)},)


def _disable_noise(ctx):
    return ({"seed": None},)


def _basic_guider(ctx, model, conditioning):
    return ({"model": model, "positive": conditioning, "negative": [], "cfg": 1.0},)


def _cfg_guider(ctx, model, positive, negative, cfg):
    return ({"model": model, "positive": positive, "negative": negative, "cfg": float(cfg)},)


def _custom(ctx, guider: dict, seed, sampler: dict, sigmas, latent: dict) -> tuple[dict, dict]:
    """(output, denoised_output) of a custom sampling run: the guider's model and conditioning over ``sigmas``."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise BadRequest("SIGMAS must be a list of sigmas (BasicScheduler's output)")
    denoised: list = []
    out = ksample(ctx, guider["model"], seed or 0, max(len(sigmas) - 1, 1), guider["cfg"], sampler["sampler"],
                  "normal", guider["positive"], guider["negative"], latent, add_noise=seed is not None,
                  sigmas=sigmas, denoised_out=denoised)
    return out, ({**out, "samples": denoised[0]} if denoised else out)


def _sampler_custom_advanced(ctx, noise, guider, sampler, sigmas, latent_image):
    return _custom(ctx, guider, noise["seed"], sampler, sigmas, latent_image)


def _sampler_custom(ctx, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
    guider = {"model": model, "positive": positive, "negative": negative, "cfg": float(cfg)}
    return _custom(ctx, guider, int(noise_seed) if add_noise else None, sampler, sigmas, latent_image)


def _vae_decode(ctx, samples, vae):
    pixels = ctx.engine.vae_decode_tensor(_vae_module(ctx, vae), samples["samples"])
    return (pixels.permute(0, 2, 3, 1).contiguous(),)


def _crop8(pixels: torch.Tensor) -> torch.Tensor:
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    if (h, w) != pixels.shape[1:3]:
        y, x = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, y:y + h, x:x + w, :]
    return pixels


def _vae_encode(ctx, pixels, vae):
    pixels = _crop8(pixels)[..., :3]
    latent = ctx.engine.vae_encode(_vae_module(ctx, vae), pixels.permute(0, 3, 1, 2) * 2 - 1)
    return ({"samples": latent.float()},)


def _inpaint_model_conditioning(ctx, positive, negative, vae, pixels, mask, noise_mask=True):
    """ComfyUI's InpaintModelConditioning: the picture's latent to sample from (with the mask as its noise mask when
    ``noise_mask``), and, in both conditionings, the picture with the hole mid-grey, encoded, and the mask: what
    inpainting models (FLUX Fill, SD inpainting checkpoints) read beside the latent."""
    pixels = _crop8(pixels)[..., :3]
    h, w = pixels.shape[1:3]
    m = torch.nn.functional.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(), size=(h, w),
                                        mode="bilinear")
    keep = (1.0 - m.round()).permute(0, 2, 3, 1)
    grey = (pixels - 0.5) * keep + 0.5
    module = _vae_module(ctx, vae)
    concat = ctx.engine.vae_encode(module, grey.permute(0, 3, 1, 2) * 2 - 1).float()
    latent = {"samples": ctx.engine.vae_encode(module, pixels.permute(0, 3, 1, 2) * 2 - 1).float()}
    if noise_mask:
        latent["noise_mask"] = m
    extra = {"concat_latent_image": concat, "concat_mask": m}
    return [c.but(**extra) for c in positive], [c.but(**extra) for c in negative], latent


def _instruct_pix_to_pix_conditioning(ctx, positive, negative, vae, pixels):
    """ComfyUI's InstructPixToPixConditioning: the picture's latent in both conditionings (what FLUX Canny/Depth dev
    read beside their latent: the control map), and an empty latent of its size to sample."""
    pixels = _crop8(pixels)[..., :3]
    latent = ctx.engine.vae_encode(_vae_module(ctx, vae), pixels.permute(0, 3, 1, 2) * 2 - 1).float()
    return ([c.but(concat_latent_image=latent) for c in positive], [c.but(concat_latent_image=latent) for c in negative],
            {"samples": torch.zeros_like(latent)})


def _differential_diffusion(ctx, model, strength=1.0):
    from dataclasses import replace
    return (replace(model, differential=True),)


def _vae_encode_for_inpaint(ctx, pixels, vae, mask, grow_mask_by=6):
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    m = torch.nn.functional.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                                        size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()[..., :3]
    if (h, w) != pixels.shape[1:3]:
        y, x = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, y:y + h, x:x + w, :]
        m = m[:, :, y:y + h, x:x + w]
    if grow_mask_by > 0:  # ComfyUI grows the mask with a box kernel so the seam is repainted too
        k = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        pad = grow_mask_by // 2
        grown = torch.clamp(torch.nn.functional.conv2d(m.round(), k, padding=pad), 0, 1)[..., :h, :w]
    else:
        grown = m
    keep = (1.0 - m.round()).squeeze(1)[..., None]
    pixels = (pixels - 0.5) * keep + 0.5  # masked pixels to mid grey before encoding
    latent = ctx.engine.vae_encode(_vae_module(ctx, vae), pixels.permute(0, 3, 1, 2) * 2 - 1)
    return ({"samples": latent.float(), "noise_mask": grown},)


def _set_latent_noise_mask(ctx, samples, mask):
    return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()},)


def _latent_upscale(ctx, samples, upscale_method, width, height, crop):
    s = samples["samples"]
    if width == 0 and height == 0:
        return (samples,)
    if width == 0:
        width = max(64, round(s.shape[-1] * height / s.shape[-2]) * 8)
    elif height == 0:
        height = max(64, round(s.shape[-2] * width / s.shape[-1]) * 8)
    return ({**samples, "samples": _upscale(s, upscale_method, width // 8, height // 8, crop)},)


def _latent_upscale_by(ctx, samples, upscale_method, scale_by):
    s = samples["samples"]
    w, h = round(s.shape[-1] * scale_by), round(s.shape[-2] * scale_by)
    return ({**samples, "samples": _upscale(s, upscale_method, w, h, "disabled")},)


# ------------------------------------------------------------------------------------------------ images

def _load_image(ctx, image, upload=None):
    return _picture_and_mask(ctx, input_path(ctx.input_dir, image))


def _picture_and_mask(ctx, path: Path):
    """IMAGE and MASK of an image file (ComfyUI's mask: 1 - alpha; none: a 64x64 zero mask)."""
    im = load_image(path, settings=ctx.engine.settings, mode=None, what="image")
    im = ImageOps.exif_transpose(im)
    rgb = from_image(im)[None]
    if "A" in im.getbands():
        alpha = torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)
        mask = 1.0 - alpha
    else:
        mask = torch.zeros(64, 64)
    return rgb, mask[None]


def _embedding_fingerprint(ctx, text=None, **_):
    """The files behind the ``embedding:`` names in a text (added, changed or removed: encoded again)."""
    if not isinstance(text, str) or "embedding:" not in text.lower():
        return None
    stamps = []
    for folder in ctx.engine.settings.model_dirs("embeddings"):
        if folder.is_dir():
            stamps += sorted([str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
                             for f in folder.rglob("*.safetensors"))
    return stamps


def _load_image_fingerprint(ctx, image=None, **_):
    try:
        st = input_path(ctx.input_dir, image).stat()
        return [st.st_size, st.st_mtime_ns]
    except (OSError, BadRequest, NotFound):
        return None


def input_path(input_dir: Path, name: str) -> Path:
    """An input image by ComfyUI's name (``sub/file.png`` or ``file.png [input]``), inside the caller's folder."""
    name = re.sub(r"\s*\[(input|output|temp)\]$", "", str(name))
    parts = name.replace("\\", "/").split("/")
    path = input_dir.joinpath(*safe_subfolder("/".join(parts[:-1])), safe_name(parts[-1], "image"))
    if not path.is_file():
        raise NotFound(f"input image {name!r} does not exist (upload it with /upload/image)")
    return path


def _load_image_output(ctx, image, upload=None):
    """ComfyUI's LoadImageOutput: an image this user saved (``name [output]``), read from their output folder."""
    return _picture_and_mask(ctx, input_path(ctx.output_dir, image))


PREFERRED_KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
                                 (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
                                 (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672))
"""FLUX.1 Kontext's trained sizes (width, height), as BFL publish them"""


def _flux_kontext_image_scale(ctx, image):
    """ComfyUI's FluxKontextImageScale: to the Kontext size nearest the image's aspect ratio (Lanczos, centre
    crop)."""
    aspect = image.shape[2] / image.shape[1]
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    x = _upscale(image.permute(0, 3, 1, 2), "lanczos", width, height, "center")
    return (x.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_stitch(ctx, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
    """ComfyUI's ImageStitch: ``image2`` beside ``image1`` (right/left/down/up), scaled to match its height or
    width when asked, with a spacing strip between; without ``image2``, ``image1`` as it is."""
    if image2 is None:
        return (image1,)
    horizontal = direction in ("right", "left")
    a, b = image1[..., :3], image2[..., :3]
    if match_image_size:
        h, w = b.shape[1:3]
        if horizontal and h != a.shape[1]:
            b = _resize_bchw(b.permute(0, 3, 1, 2), a.shape[1], max(1, round(w * a.shape[1] / h)), "lanczos")
            b = b.permute(0, 2, 3, 1)
        elif not horizontal and w != a.shape[2]:
            b = _resize_bchw(b.permute(0, 3, 1, 2), max(1, round(h * a.shape[2] / w)), a.shape[2], "lanczos")
            b = b.permute(0, 2, 3, 1)
    elif (horizontal and a.shape[1] != b.shape[1]) or (not horizontal and a.shape[2] != b.shape[2]):
        raise BadRequest("ImageStitch: the images do not line up; turn match_image_size on")
    if b.shape[0] != a.shape[0]:
        b = b[:1].expand(a.shape[0], -1, -1, -1)
    parts = [a, b] if direction in ("right", "down") else [b, a]
    if spacing_width > 0:
        value = {"white": 1.0, "black": 0.0, "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
                 "blue": (0.0, 0.0, 1.0)}.get(spacing_color, 1.0)
        shape = (a.shape[0], a.shape[1], int(spacing_width), 3) if horizontal else (a.shape[0], int(spacing_width),
                                                                                    a.shape[2], 3)
        strip = torch.ones(shape) * torch.tensor(value if isinstance(value, tuple) else (value,) * 3)
        parts = [parts[0], strip, parts[1]]
    return (torch.cat(parts, dim=2 if horizontal else 1).clamp(0, 1),)


def _image_composite_masked(ctx, destination, source, x, y, resize_source, mask=None):
    """ComfyUI's ImageCompositeMasked: ``source`` pasted on ``destination`` at (x, y) (its top-left, whole pixels),
    through ``mask`` where given (1: source), the source first scaled to the destination's size when asked."""
    dest = destination[..., :3].clone()
    src = source[..., :3]
    if resize_source:
        src = _resize_bchw(src.permute(0, 3, 1, 2), dest.shape[1], dest.shape[2], "bilinear").permute(0, 2, 3, 1)
    if src.shape[0] != dest.shape[0]:
        src = src[:1].expand(dest.shape[0], -1, -1, -1)
    h, w = dest.shape[1:3]
    x, y = max(0, min(int(x), w)), max(0, min(int(y), h))
    sh, sw = min(src.shape[1], h - y), min(src.shape[2], w - x)
    if sh <= 0 or sw <= 0:
        return (dest,)
    if mask is None:
        m = torch.ones(dest.shape[0], sh, sw, 1)
    else:
        m = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                            size=(src.shape[1], src.shape[2]), mode="bilinear")
        m = m.permute(0, 2, 3, 1)[:, :sh, :sw]
        m = m[:1].expand(dest.shape[0], -1, -1, -1) if m.shape[0] != dest.shape[0] else m
    region = dest[:, y:y + sh, x:x + sw]
    dest[:, y:y + sh, x:x + sw] = src[:, :sh, :sw] * m + region * (1 - m)
    return (dest.clamp(0, 1),)


def _mask_preview(ctx, mask):
    """ComfyUI's MaskPreview: the mask shown as a grey picture (a temp preview, as PreviewImage)."""
    picture = mask.reshape(-1, 1, *mask.shape[-2:]).float().clamp(0, 1).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    return _preview_image(ctx, picture)


def _reference_latent_node(ctx, conditioning, latent=None):
    """ComfyUI's ReferenceLatent: the latent joins each entry's reference pictures (FLUX Kontext's, and Qwen-Image
    Edit's), which the model reads as extra tokens."""
    if latent is None:
        return (conditioning,)
    return ([c.but(reference_latents=[*c.extra.get("reference_latents", []), latent["samples"]])
             for c in conditioning],)


def _load_image_mask(ctx, image, channel, upload=None):
    path = input_path(ctx.input_dir, image)
    im = load_image(path, settings=ctx.engine.settings, mode=None, what="image")
    im = ImageOps.exif_transpose(im)
    bands = {"red": "R", "green": "G", "blue": "B", "alpha": "A"}
    band = bands[channel]
    if band not in im.getbands():
        im = im.convert("RGBA")
    m = torch.from_numpy(np.asarray(im.getchannel(band), dtype=np.float32) / 255.0)
    if channel == "alpha":
        m = 1.0 - m
    return (m[None],)


def _image_scale(ctx, image, upscale_method, width, height, crop):
    if width == 0 and height == 0:
        return (image,)
    h0, w0 = image.shape[1:3]
    if width == 0:
        width = max(1, round(w0 * height / h0))
    elif height == 0:
        height = max(1, round(h0 * width / w0))
    x = _upscale(image.permute(0, 3, 1, 2), upscale_method, width, height, crop)
    return (x.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_scale_by(ctx, image, upscale_method, scale_by):
    h0, w0 = image.shape[1:3]
    x = _resize_bchw(image.permute(0, 3, 1, 2), round(h0 * scale_by), round(w0 * scale_by), upscale_method)
    return (x.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_scale_total(ctx, image, upscale_method, megapixels, resolution_steps=1):
    h0, w0 = image.shape[1:3]
    scale = (megapixels * 1024 * 1024 / (w0 * h0)) ** 0.5
    step = max(1, int(resolution_steps))
    w, h = max(step, round(w0 * scale / step) * step), max(step, round(h0 * scale / step) * step)
    x = _resize_bchw(image.permute(0, 3, 1, 2), h, w, upscale_method)
    return (x.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_scale_to_max_dimension(ctx, image, upscale_method, largest_size):
    """ImageScaleToMaxDimension: the longer side to ``largest_size``, the other in proportion (rounded)."""
    h0, w0 = image.shape[1:3]
    if h0 > w0:
        w, h = round(w0 / h0 * largest_size), largest_size
    elif w0 > h0:
        w, h = largest_size, round(h0 / w0 * largest_size)
    else:
        w = h = largest_size
    x = _resize_bchw(image.permute(0, 3, 1, 2), max(1, h), max(1, w), upscale_method)
    return (x.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_pad_for_outpaint(ctx, image, left, top, right, bottom, feathering):
    b, h, w, c = image.shape
    out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
    out[:, top:top + h, left:left + w, :] = image
    mask = torch.ones(h + top + bottom, w + left + right)
    inner = torch.zeros(h, w)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        ys = torch.arange(h)[:, None].float()
        xs = torch.arange(w)[None, :].float()
        d = torch.full((h, w), float(feathering))
        if top:
            d = torch.minimum(d, ys)
        if bottom:
            d = torch.minimum(d, h - 1 - ys)
        if left:
            d = torch.minimum(d, xs.expand(h, w))
        if right:
            d = torch.minimum(d, (w - 1 - xs).expand(h, w))
        v = (feathering - d) / feathering
        inner = v * v
    mask[top:top + h, left:left + w] = inner
    return out, mask[None]


def _upscale_with_model(ctx, upscale_model, image):
    up = ctx.engine.upscalers().get(upscale_model.name)
    scale = getattr(up, "native_scale", 1) or 1
    rows = [from_image(up.upscale(to_image(r), scale)) for r in image]
    return (torch.stack(rows),)


# ------------------------------------------------------------------------------------------------ masks

CHANNELS = ("red", "green", "blue", "alpha")


def _image_to_mask(ctx, image, channel):
    index = CHANNELS.index(channel)
    if index >= image.shape[-1]:
        return (torch.ones(image.shape[:3]) if channel == "alpha" else torch.zeros(image.shape[:3]),)
    return (image[..., index].clone(),)


def _mask_to_image(ctx, mask):
    m = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    return (m[..., None].expand(-1, -1, -1, 3).clone(),)


def _invert_mask(ctx, mask):
    return (1.0 - mask,)


def _solid_mask(ctx, value, width, height):
    return (torch.full((1, height, width), float(value)),)


def _grow_mask(ctx, mask, expand, tapered_corners):
    """ComfyUI's GrowMask: grey dilation (expand > 0) or erosion (< 0), one pixel a step, over a 3x3 cross
    (tapered corners) or square; soft masks stay soft."""
    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    cross = torch.tensor([0, 1, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    use = cross if tapered_corners else torch.ones(9, dtype=torch.bool)
    h, w = m.shape[-2:]
    for _ in range(abs(int(expand))):
        patches = torch.nn.functional.unfold(torch.nn.functional.pad(m, (1, 1, 1, 1), mode="replicate"), 3)
        patches = patches[:, use]  # [B, k, H*W]
        m = (patches.amax(1) if expand > 0 else patches.amin(1)).reshape(-1, 1, h, w)
    return (m[:, 0],)


def _image_blur(ctx, image, blur_radius, sigma):
    if blur_radius == 0:
        return (image,)
    size = blur_radius * 2 + 1
    x = torch.arange(size, dtype=torch.float32) - blur_radius
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    c = image.shape[-1]
    t = image.permute(0, 3, 1, 2)
    t = torch.nn.functional.pad(t, (blur_radius,) * 4, mode="reflect")
    t = torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    t = torch.nn.functional.conv2d(t, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return (t.permute(0, 2, 3, 1).clamp(0, 1),)


def _image_invert(ctx, image):
    return (1.0 - image,)


def _canny(ctx, image, low_threshold, high_threshold):
    """ComfyUI's Canny (kornia's canny) with OpenCV: grey by kornia's weights, a 5x5 Gaussian of sigma 1 and
    unnormalised Sobel gradients in floating point (replicated border, as kornia's), L2 magnitude, non-maximum
    suppression and hysteresis by OpenCV on the gradients (x8 in 16 bits). kornia works on [0, 1] pixels, so its
    thresholds are these on 0-255 pixels divided by 255 (checked against kornia in the tests)."""
    import cv2
    out = []
    for frame in image.clamp(0, 1).cpu().numpy().astype(np.float32):
        grey = (frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114) * 255.0
        grey = cv2.GaussianBlur(grey, (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)
        dx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
        dy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
        dx, dy = (np.clip(np.round(d * 8.0), -32768, 32767).astype(np.int16) for d in (dx, dy))
        edges = cv2.Canny(dx, dy, float(low_threshold) * 2040.0, float(high_threshold) * 2040.0, L2gradient=True)
        out.append(np.repeat((edges > 0).astype(np.float32)[..., None], 3, axis=-1))
    return (torch.from_numpy(np.stack(out)),)


# ------------------------------------------------------------------------------------------------ output

def _counter(folder: Path, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)_\.png$")
    best = 0
    if folder.is_dir():
        for p in folder.iterdir():
            m = pattern.match(p.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def graph_infotext(prompt: dict, node_id: str, width: int, height: int) -> str:
    """A1111 infotext for an image a graph made: the nearest sampler upstream, its prompts and checkpoint."""
    def node(link):
        return prompt.get(link[0]) if isinstance(link, list) and len(link) == 2 else None

    def upstream(nid, classes, seen=None):
        seen = seen or set()
        if nid in seen or nid not in prompt:
            return None
        seen.add(nid)
        n = prompt[nid]
        if n.get("class_type") in classes:
            return n
        for v in n.get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2:
                hit = upstream(v[0], classes, seen)
                if hit is not None:
                    return hit
        return None

    def text(link):
        n = node(link)
        while n is not None and n.get("class_type") in ("ConditioningCombine", "ConditioningSetArea",
                                                        "ConditioningSetMask", "FluxGuidance", "ControlNetApply"):
            n = node(n["inputs"].get("conditioning") or n["inputs"].get("conditioning_1"))
        t = n.get("inputs", {}).get("text") if n else None
        return t if isinstance(t, str) else ""

    s = upstream(node_id, ("KSampler", "KSamplerAdvanced"))
    if s is None:
        return ""
    i = s["inputs"]
    ckpt = upstream(node_id, ("CheckpointLoaderSimple",))
    params = {"Steps": i.get("steps"), "Sampler": sampler_label(i.get("sampler_name", "euler")),
              "Schedule type": schedule_label(i.get("scheduler", "normal")), "CFG scale": i.get("cfg"),
              "Seed": i.get("seed", i.get("noise_seed")), "Size": f"{width}x{height}",
              "Model": ckpt["inputs"].get("ckpt_name") if ckpt else None,
              "Denoising strength": i.get("denoise") if i.get("denoise", 1) != 1 else None,
              "Version": f"imagesmith {__version__}"}
    params = {k: v for k, v in params.items() if not isinstance(v, list)}
    return build_infotext(text(i.get("positive")), text(i.get("negative")), params)


def _save(ctx, images, filename_prefix, folder_root: Path, kind: str):
    prefix = filename_prefix.replace("\\", "/")
    prefix = re.sub(r"%[^%]*%", "", prefix).strip("/") or "ComfyUI"
    parts = prefix.split("/")
    sub = safe_subfolder("/".join(parts[:-1]))
    stem = safe_name(parts[-1], "filename_prefix")
    folder = folder_root.joinpath(*sub)
    folder.mkdir(parents=True, exist_ok=True)
    n = _counter(folder, stem)
    results = []
    for row in images:
        im = to_image(row)
        if ctx.screen is not None:  # the server's safety gate: blurred, or withheld (nothing written)
            im = ctx.screen(im)
            if im is None:
                continue
        chunks = make_png_chunks(graph_infotext(ctx.prompt, ctx.node, im.width, im.height),
                                 {"prompt_id": ctx.prompt_id, "node": ctx.node, "version": __version__})
        chunks["prompt"] = json.dumps(ctx.prompt)
        for key, value in (ctx.extra_pnginfo or {}).items():
            if isinstance(key, str) and 1 <= len(key) <= 79:
                chunks[key] = json.dumps(value)
        name = f"{stem}_{n:05}_.png"
        save_png_atomic(im, folder / name, text_chunks=chunks)
        n += 1
        results.append({"filename": name, "subfolder": "/".join(sub), "type": kind})
    return ({"ui": {"images": results}},)


def _save_image(ctx, images, filename_prefix="ComfyUI"):
    return _save(ctx, images, filename_prefix, ctx.output_dir, "output")


def _preview_image(ctx, images):
    return _save(ctx, images, "ComfyUI_temp_" + secrets.token_hex(3), ctx.temp_dir, "temp")


# ------------------------------------------------------------------------------------------------ sampling models

def _model_sampling_discrete(ctx, model, sampling, zsnr=False):
    from dataclasses import replace
    return (replace(model, sampling=("discrete", sampling, bool(zsnr))),)


def _model_sampling_sd3(ctx, model, shift):
    from dataclasses import replace
    return (replace(model, sampling=("sd3", float(shift))),)


def _model_sampling_aura_flow(ctx, model, shift):
    """ComfyUI's ModelSamplingAuraFlow (Qwen-Image's templates): a flow shift with timesteps = sigma."""
    from dataclasses import replace
    return (replace(model, sampling=("sd3", float(shift))),)


def _cfg_norm(ctx, model, strength, pre_cfg=False):
    """ComfyUI's CFGNorm (post-CFG): the guided x0 scaled, at each latent cell, down to the conditional x0's norm
    over the channels (never up), times ``strength``."""
    from dataclasses import replace
    if pre_cfg:
        raise BadRequest("CFGNorm: pre_cfg is not supported yet (the default post-CFG form is)")
    return (replace(model, post_cfg=("cfg_norm", float(strength))),)


def _model_sampling_flux(ctx, model, max_shift, base_shift, width, height):
    from dataclasses import replace
    return (replace(model, sampling=("flux", float(max_shift), float(base_shift), int(width), int(height))),)


# ------------------------------------------------------------------------------------------------ the set

def _i(default, lo, hi, step=1, **kw) -> Input:
    return Input("INT", default=default, min=lo, max=hi, step=step, **kw)


def _f(default, lo, hi, step=0.01, **kw) -> Input:
    return Input("FLOAT", default=default, min=lo, max=hi, step=step, **kw)


def _c(choices, default=None, **kw) -> Input:
    return Input("COMBO", choices=tuple(choices) if not isinstance(choices, str) else choices, default=default, **kw)


def _l(kind: str, **kw) -> Input:
    return Input(kind, **kw)


SIZE = {"width": _i(512, 16, MAX_RESOLUTION, 8), "height": _i(512, 16, MAX_RESOLUTION, 8),
        "batch_size": _i(1, 1, 4096)}
SAMPLING = {"sampler_name": _c("samplers"), "scheduler": _c("schedulers")}


def _nodes() -> dict[str, Node]:
    n = [
        Node("CheckpointLoaderSimple", "Load Checkpoint", "loaders", {"ckpt_name": _c("checkpoints")},
             (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")), _checkpoint_loader,
             description="Loads a diffusion model checkpoint."),
        Node("VAELoader", "Load VAE", "loaders", {"vae_name": _c("vae")}, (("VAE", "VAE"),), _vae_loader),
        Node("UNETLoader", "Load Diffusion Model", "advanced/loaders",
             {"unet_name": _c("diffusion_models"),
              "weight_dtype": _c(("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"))},
             (("MODEL", "MODEL"),), _unet_loader),
        # ComfyUI-GGUF's loader (the custom node GGUF workflows use): the same diffusion model, from a .gguf file
        Node("UnetLoaderGGUF", "Unet Loader (GGUF)", "bootleg", {"unet_name": _c("unet_gguf")},
             (("MODEL", "MODEL"),), _unet_loader),
        Node("CLIPLoader", "Load CLIP", "advanced/loaders",
             {"clip_name": _c("text_encoders"), "type": _c(("stable_diffusion", "qwen_image")),
              "device": _c(("default", "cpu"), optional=True)}, (("CLIP", "CLIP"),), _clip_loader("clip_name")),
        Node("DualCLIPLoader", "DualCLIPLoader", "advanced/loaders",
             {"clip_name1": _c("text_encoders"), "clip_name2": _c("text_encoders"), "type": _c(("sdxl", "flux")),
              "device": _c(("default", "cpu"), optional=True)}, (("CLIP", "CLIP"),),
             _clip_loader("clip_name1", "clip_name2")),
        Node("TripleCLIPLoader", "TripleCLIPLoader", "advanced/loaders",
             {"clip_name1": _c("text_encoders"), "clip_name2": _c("text_encoders"),
              "clip_name3": _c("text_encoders")}, (("CLIP", "CLIP"),),
             lambda ctx, **kw: _clip_loader("clip_name1", "clip_name2", "clip_name3")(ctx, type="sd3", **kw)),
        Node("LoraLoader", "Load LoRA", "loaders",
             {"model": _l("MODEL"), "clip": _l("CLIP"), "lora_name": _c("loras"),
              "strength_model": _f(1.0, -100.0, 100.0), "strength_clip": _f(1.0, -100.0, 100.0)},
             (("MODEL", "MODEL"), ("CLIP", "CLIP")), _lora_loader),
        Node("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders",
             {"model": _l("MODEL"), "lora_name": _c("loras"), "strength_model": _f(1.0, -100.0, 100.0)},
             (("MODEL", "MODEL"),), _lora_model_only),
        Node("ControlNetLoader", "Load ControlNet Model", "loaders", {"control_net_name": _c("controlnet")},
             (("CONTROL_NET", "CONTROL_NET"),), _controlnet_loader),
        Node("UpscaleModelLoader", "Load Upscale Model", "loaders", {"model_name": _c("upscale_models")},
             (("UPSCALE_MODEL", "UPSCALE_MODEL"),), _upscale_model_loader),
        Node("CLIPTextEncodeFlux", "CLIPTextEncodeFlux", "advanced/conditioning/flux",
             {"clip": _l("CLIP"), "clip_l": Input("STRING", default="", multiline=True),
              "t5xxl": Input("STRING", default="", multiline=True), "guidance": _f(3.5, 0.0, 100.0, 0.1)},
             (("CONDITIONING", "CONDITIONING"),), _clip_text_encode_flux),
        Node("CLIPSetLastLayer", "CLIP Set Last Layer", "conditioning",
             {"clip": _l("CLIP"), "stop_at_clip_layer": _i(-1, -24, -1)}, (("CLIP", "CLIP"),),
             _clip_set_last_layer),
        Node("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
             {"text": Input("STRING", multiline=True), "clip": _l("CLIP")}, (("CONDITIONING", "CONDITIONING"),),
             _clip_text_encode, fingerprint=_embedding_fingerprint),
        Node("ConditioningCombine", "Conditioning (Combine)", "conditioning",
             {"conditioning_1": _l("CONDITIONING"), "conditioning_2": _l("CONDITIONING")},
             (("CONDITIONING", "CONDITIONING"),), _conditioning_combine),
        Node("ConditioningSetArea", "Conditioning (Set Area)", "conditioning",
             {"conditioning": _l("CONDITIONING"), "width": _i(64, 64, MAX_RESOLUTION, 8),
              "height": _i(64, 64, MAX_RESOLUTION, 8), "x": _i(0, 0, MAX_RESOLUTION, 8),
              "y": _i(0, 0, MAX_RESOLUTION, 8), "strength": _f(1.0, 0.0, 10.0)},
             (("CONDITIONING", "CONDITIONING"),), _conditioning_set_area),
        Node("ConditioningSetMask", "Conditioning (Set Mask)", "conditioning",
             {"conditioning": _l("CONDITIONING"), "mask": _l("MASK"), "strength": _f(1.0, 0.0, 10.0),
              "set_cond_area": _c(("default", "mask bounds"))},
             (("CONDITIONING", "CONDITIONING"),), _conditioning_set_mask),
        Node("ConditioningZeroOut", "ConditioningZeroOut", "advanced/conditioning",
             {"conditioning": _l("CONDITIONING")}, (("CONDITIONING", "CONDITIONING"),), _conditioning_zero_out),
        Node("FluxGuidance", "FluxGuidance", "advanced/conditioning/flux",
             {"conditioning": _l("CONDITIONING"), "guidance": _f(3.5, 0.0, 100.0, 0.1)},
             (("CONDITIONING", "CONDITIONING"),), _flux_guidance),
        Node("ControlNetApply", "Apply ControlNet (OLD)", "conditioning/controlnet",
             {"conditioning": _l("CONDITIONING"), "control_net": _l("CONTROL_NET"), "image": _l("IMAGE"),
              "strength": _f(1.0, 0.0, 10.0)}, (("CONDITIONING", "CONDITIONING"),), _controlnet_apply),
        Node("SetUnionControlNetType", "SetUnionControlNetType", "conditioning/controlnet",
             {"control_net": _l("CONTROL_NET"), "type": _c(("auto", *UNION_TYPES))}, (("CONTROL_NET", "CONTROL_NET"),),
             _set_union_type),
        Node("ControlNetApplyAdvanced", "Apply ControlNet", "conditioning/controlnet",
             {"positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"), "control_net": _l("CONTROL_NET"),
              "image": _l("IMAGE"), "strength": _f(1.0, 0.0, 10.0), "start_percent": _f(0.0, 0.0, 1.0, 0.001),
              "end_percent": _f(1.0, 0.0, 1.0, 0.001), "vae": _l("VAE", optional=True)},
             (("CONDITIONING", "positive"), ("CONDITIONING", "negative")), _controlnet_apply_advanced),
        Node("ControlNetInpaintingAliMamaApply", "ControlNetInpaintingAliMamaApply", "conditioning/controlnet",
             {"positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"), "control_net": _l("CONTROL_NET"),
              "vae": _l("VAE"), "image": _l("IMAGE"), "mask": _l("MASK"), "strength": _f(1.0, 0.0, 10.0),
              "start_percent": _f(0.0, 0.0, 1.0, 0.001), "end_percent": _f(1.0, 0.0, 1.0, 0.001)},
             (("CONDITIONING", "positive"), ("CONDITIONING", "negative")), _controlnet_inpainting_alimama),
        Node("EmptyLatentImage", "Empty Latent Image", "latent", dict(SIZE), (("LATENT", "LATENT"),),
             _empty_latent(4)),
        Node("EmptySD3LatentImage", "EmptySD3LatentImage", "latent/sd3",
             {"width": _i(1024, 16, MAX_RESOLUTION, 16), "height": _i(1024, 16, MAX_RESOLUTION, 16),
              "batch_size": _i(1, 1, 4096)}, (("LATENT", "LATENT"),), _empty_latent(16)),
        Node("KSampler", "KSampler", "sampling",
             {"model": _l("MODEL"), "seed": _i(0, 0, MAX_SEED, control_after_generate=True),
              "steps": _i(20, 1, 10000), "cfg": _f(8.0, 0.0, 100.0, 0.1, round=0.01), **SAMPLING,
              "positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"), "latent_image": _l("LATENT"),
              "denoise": _f(1.0, 0.0, 1.0)}, (("LATENT", "LATENT"),), _ksampler),
        Node("KSamplerAdvanced", "KSampler (Advanced)", "sampling",
             {"model": _l("MODEL"), "add_noise": _c(("enable", "disable")),
              "noise_seed": _i(0, 0, MAX_SEED, control_after_generate=True), "steps": _i(20, 1, 10000),
              "cfg": _f(8.0, 0.0, 100.0, 0.1, round=0.01), **SAMPLING, "positive": _l("CONDITIONING"),
              "negative": _l("CONDITIONING"), "latent_image": _l("LATENT"), "start_at_step": _i(0, 0, 10000),
              "end_at_step": _i(10000, 0, 10000), "return_with_leftover_noise": _c(("disable", "enable"))},
             (("LATENT", "LATENT"),), _ksampler_advanced),
        Node("KSamplerSelect", "KSamplerSelect", "sampling/custom_sampling/samplers",
             {"sampler_name": SAMPLING["sampler_name"]}, (("SAMPLER", "SAMPLER"),), _ksampler_select),
        Node("SDTurboScheduler", "SDTurboScheduler", "sampling/custom_sampling/schedulers",
             {"model": _l("MODEL"), "steps": _i(1, 1, 10), "denoise": _f(1.0, 0.0, 1.0)}, (("SIGMAS", "SIGMAS"),),
             _sd_turbo_scheduler),
        Node("BasicScheduler", "BasicScheduler", "sampling/custom_sampling/schedulers",
             {"model": _l("MODEL"), "scheduler": SAMPLING["scheduler"], "steps": _i(20, 1, 10000),
              "denoise": _f(1.0, 0.0, 1.0)}, (("SIGMAS", "SIGMAS"),), _basic_scheduler),
        Node("RandomNoise", "RandomNoise", "sampling/custom_sampling/noise",
             {"noise_seed": _i(0, 0, MAX_SEED, control_after_generate=True)}, (("NOISE", "NOISE"),), _random_noise),
        Node("DisableNoise", "DisableNoise", "sampling/custom_sampling/noise", {}, (("NOISE", "NOISE"),),
             _disable_noise),
        Node("BasicGuider", "BasicGuider", "sampling/custom_sampling/guiders",
             {"model": _l("MODEL"), "conditioning": _l("CONDITIONING")}, (("GUIDER", "GUIDER"),), _basic_guider),
        Node("CFGGuider", "CFGGuider", "sampling/custom_sampling/guiders",
             {"model": _l("MODEL"), "positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"),
              "cfg": _f(8.0, 0.0, 100.0, 0.1, round=0.01)}, (("GUIDER", "GUIDER"),), _cfg_guider),
        Node("SamplerCustomAdvanced", "SamplerCustomAdvanced", "sampling/custom_sampling",
             {"noise": _l("NOISE"), "guider": _l("GUIDER"), "sampler": _l("SAMPLER"), "sigmas": _l("SIGMAS"),
              "latent_image": _l("LATENT")}, (("LATENT", "output"), ("LATENT", "denoised_output")),
             _sampler_custom_advanced),
        Node("SamplerCustom", "SamplerCustom", "sampling/custom_sampling",
             {"model": _l("MODEL"), "add_noise": Input("BOOLEAN", default=True),
              "noise_seed": _i(0, 0, MAX_SEED, control_after_generate=True),
              "cfg": _f(8.0, 0.0, 100.0, 0.1, round=0.01), "positive": _l("CONDITIONING"),
              "negative": _l("CONDITIONING"), "sampler": _l("SAMPLER"), "sigmas": _l("SIGMAS"),
              "latent_image": _l("LATENT")}, (("LATENT", "output"), ("LATENT", "denoised_output")),
             _sampler_custom),
        Node("CLIPVisionLoader", "Load CLIP Vision", "loaders", {"clip_name": _c("clip_vision")},
             (("CLIP_VISION", "CLIP_VISION"),), _clip_vision_loader),
        Node("CLIPVisionEncode", "CLIP Vision Encode", "conditioning",
             {"clip_vision": _l("CLIP_VISION"), "image": _l("IMAGE"), "crop": _c(("center", "none"))},
             (("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT"),), _clip_vision_encode),
        Node("StyleModelLoader", "Load Style Model", "loaders", {"style_model_name": _c("style_models")},
             (("STYLE_MODEL", "STYLE_MODEL"),), _style_model_loader),
        Node("StyleModelApply", "Apply Style Model", "conditioning/style_model",
             {"conditioning": _l("CONDITIONING"), "style_model": _l("STYLE_MODEL"),
              "clip_vision_output": _l("CLIP_VISION_OUTPUT"), "strength": _f(1.0, 0.0, 10.0, 0.001),
              "strength_type": _c(("multiply", "attn_bias"))}, (("CONDITIONING", "CONDITIONING"),),
             _style_model_apply),
        Node("VAEDecode", "VAE Decode", "latent", {"samples": _l("LATENT"), "vae": _l("VAE")},
             (("IMAGE", "IMAGE"),), _vae_decode),
        Node("VAEEncode", "VAE Encode", "latent", {"pixels": _l("IMAGE"), "vae": _l("VAE")},
             (("LATENT", "LATENT"),), _vae_encode),
        Node("InpaintModelConditioning", "InpaintModelConditioning", "conditioning/inpaint",
             {"positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"), "vae": _l("VAE"),
              "pixels": _l("IMAGE"), "mask": _l("MASK"), "noise_mask": Input("BOOLEAN", default=True)},
             (("CONDITIONING", "positive"), ("CONDITIONING", "negative"), ("LATENT", "latent")),
             _inpaint_model_conditioning),
        Node("InstructPixToPixConditioning", "InstructPixToPixConditioning", "conditioning/instructpix2pix",
             {"positive": _l("CONDITIONING"), "negative": _l("CONDITIONING"), "vae": _l("VAE"),
              "pixels": _l("IMAGE")},
             (("CONDITIONING", "positive"), ("CONDITIONING", "negative"), ("LATENT", "latent")),
             _instruct_pix_to_pix_conditioning),
        Node("DifferentialDiffusion", "Differential Diffusion", "_for_testing", {"model": _l("MODEL")},
             (("MODEL", "MODEL"),), _differential_diffusion),
        Node("VAEEncodeForInpaint", "VAE Encode (for Inpainting)", "latent/inpaint",
             {"pixels": _l("IMAGE"), "vae": _l("VAE"), "mask": _l("MASK"), "grow_mask_by": _i(6, 0, 64)},
             (("LATENT", "LATENT"),), _vae_encode_for_inpaint),
        Node("SetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint",
             {"samples": _l("LATENT"), "mask": _l("MASK")}, (("LATENT", "LATENT"),), _set_latent_noise_mask),
        Node("LatentUpscale", "Upscale Latent", "latent",
             {"samples": _l("LATENT"), "upscale_method": _c(UPSCALE_METHODS),
              "width": _i(512, 0, MAX_RESOLUTION, 8), "height": _i(512, 0, MAX_RESOLUTION, 8),
              "crop": _c(("disabled", "center"))}, (("LATENT", "LATENT"),), _latent_upscale),
        Node("LatentUpscaleBy", "Upscale Latent By", "latent",
             {"samples": _l("LATENT"), "upscale_method": _c(UPSCALE_METHODS), "scale_by": _f(1.5, 0.01, 8.0)},
             (("LATENT", "LATENT"),), _latent_upscale_by),
        Node("LoadImage", "Load Image", "image", {"image": _c("input", upload="image")},
             (("IMAGE", "IMAGE"), ("MASK", "MASK")), _load_image, fingerprint=_load_image_fingerprint),
        Node("LoadImageOutput", "Load Image (from Outputs)", "image",
             {"image": _c("output", upload="image")},
             (("IMAGE", "IMAGE"), ("MASK", "MASK")), _load_image_output),
        Node("FluxKontextImageScale", "FluxKontextImageScale", "advanced/conditioning/flux",
             {"image": _l("IMAGE")}, (("IMAGE", "IMAGE"),), _flux_kontext_image_scale),
        Node("ImageStitch", "Image Stitch", "image/transform",
             {"image1": _l("IMAGE"), "direction": _c(("right", "down", "left", "up")),
              "match_image_size": Input("BOOLEAN", default=True), "spacing_width": _i(0, 0, 1024, 2),
              "spacing_color": _c(("white", "black", "red", "green", "blue")),
              "image2": _l("IMAGE", optional=True)}, (("IMAGE", "IMAGE"),), _image_stitch),
        Node("ImageCompositeMasked", "ImageCompositeMasked", "image",
             {"destination": _l("IMAGE"), "source": _l("IMAGE"), "x": _i(0, 0, MAX_RESOLUTION, 8),
              "y": _i(0, 0, MAX_RESOLUTION, 8), "resize_source": Input("BOOLEAN", default=False),
              "mask": _l("MASK", optional=True)}, (("IMAGE", "IMAGE"),), _image_composite_masked),
        Node("MaskPreview", "MaskPreview", "mask", {"mask": _l("MASK")}, (), _mask_preview, output_node=True,
             hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
        Node("ReferenceLatent", "ReferenceLatent", "advanced/conditioning/edit_models",
             {"conditioning": _l("CONDITIONING"), "latent": _l("LATENT", optional=True)},
             (("CONDITIONING", "CONDITIONING"),), _reference_latent_node),
        Node("LoadImageMask", "Load Image (as Mask)", "mask",
             {"image": _c("input", upload="image"), "channel": _c(("alpha", "red", "green", "blue"))},
             (("MASK", "MASK"),), _load_image_mask, fingerprint=_load_image_fingerprint),
        Node("ImageScale", "Upscale Image", "image/upscaling",
             {"image": _l("IMAGE"), "upscale_method": _c(IMAGE_UPSCALE_METHODS),
              "width": _i(512, 0, MAX_RESOLUTION), "height": _i(512, 0, MAX_RESOLUTION),
              "crop": _c(("disabled", "center"))}, (("IMAGE", "IMAGE"),), _image_scale),
        Node("ImageScaleBy", "Upscale Image By", "image/upscaling",
             {"image": _l("IMAGE"), "upscale_method": _c(IMAGE_UPSCALE_METHODS), "scale_by": _f(1.0, 0.01, 8.0)},
             (("IMAGE", "IMAGE"),), _image_scale_by),
        Node("ImageScaleToTotalPixels", "Scale Image to Total Pixels", "image/upscaling",
             {"image": _l("IMAGE"), "upscale_method": _c(IMAGE_UPSCALE_METHODS),
              "megapixels": _f(1.0, 0.01, 16.0), "resolution_steps": _i(1, 1, 256, optional=True)},
             (("IMAGE", "IMAGE"),), _image_scale_total),
        Node("ImageScaleToMaxDimension", "ImageScaleToMaxDimension", "image/upscaling",
             {"image": _l("IMAGE"), "upscale_method": _c(IMAGE_UPSCALE_METHODS),
              "largest_size": _i(512, 0, MAX_RESOLUTION)}, (("IMAGE", "IMAGE"),), _image_scale_to_max_dimension),
        Node("ImagePadForOutpaint", "Pad Image for Outpainting", "image",
             {"image": _l("IMAGE"), "left": _i(0, 0, MAX_RESOLUTION, 8), "top": _i(0, 0, MAX_RESOLUTION, 8),
              "right": _i(0, 0, MAX_RESOLUTION, 8), "bottom": _i(0, 0, MAX_RESOLUTION, 8),
              "feathering": _i(40, 0, MAX_RESOLUTION)}, (("IMAGE", "IMAGE"), ("MASK", "MASK")),
             _image_pad_for_outpaint),
        Node("ImageUpscaleWithModel", "Upscale Image (using Model)", "image/upscaling",
             {"upscale_model": _l("UPSCALE_MODEL"), "image": _l("IMAGE")}, (("IMAGE", "IMAGE"),),
             _upscale_with_model),
        Node("ImageToMask", "Convert Image to Mask", "mask", {"image": _l("IMAGE"), "channel": _c(CHANNELS[:3] +
                                                                                                ("alpha",))},
             (("MASK", "MASK"),), _image_to_mask),
        Node("MaskToImage", "Convert Mask to Image", "mask", {"mask": _l("MASK")}, (("IMAGE", "IMAGE"),),
             _mask_to_image),
        Node("InvertMask", "InvertMask", "mask", {"mask": _l("MASK")}, (("MASK", "MASK"),), _invert_mask),
        Node("SolidMask", "SolidMask", "mask", {"value": _f(1.0, 0.0, 1.0), "width": _i(512, 1, MAX_RESOLUTION),
                                                "height": _i(512, 1, MAX_RESOLUTION)},
             (("MASK", "MASK"),), _solid_mask),
        Node("GrowMask", "GrowMask", "mask", {"mask": _l("MASK"), "expand": _i(0, -MAX_RESOLUTION, MAX_RESOLUTION),
                                              "tapered_corners": Input("BOOLEAN", default=True)},
             (("MASK", "MASK"),), _grow_mask),
        Node("ImageBlur", "Image Blur", "image/postprocessing",
             {"image": _l("IMAGE"), "blur_radius": _i(1, 1, 31), "sigma": _f(1.0, 0.1, 10.0, 0.1)},
             (("IMAGE", "IMAGE"),), _image_blur),
        Node("ImageInvert", "Invert Image", "image", {"image": _l("IMAGE")}, (("IMAGE", "IMAGE"),), _image_invert),
        Node("Canny", "Canny", "image/preprocessors",
             {"image": _l("IMAGE"), "low_threshold": _f(0.4, 0.01, 0.99), "high_threshold": _f(0.8, 0.01, 0.99)},
             (("IMAGE", "IMAGE"),), _canny),
        Node("SaveImage", "Save Image", "image", {"images": _l("IMAGE"),
                                                  "filename_prefix": Input("STRING", default="ComfyUI")},
             (), _save_image, output_node=True, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
             description="Saves the input images to your ComfyUI output directory."),
        Node("PreviewImage", "Preview Image", "image", {"images": _l("IMAGE")}, (), _preview_image,
             output_node=True, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
        Node("ModelSamplingDiscrete", "ModelSamplingDiscrete", "advanced/model",
             {"model": _l("MODEL"), "sampling": _c(("eps", "v_prediction", "lcm", "x0")),
              "zsnr": Input("BOOLEAN", default=False)}, (("MODEL", "MODEL"),), _model_sampling_discrete),
        Node("ModelSamplingSD3", "ModelSamplingSD3", "advanced/model",
             {"model": _l("MODEL"), "shift": _f(3.0, 0.0, 100.0)}, (("MODEL", "MODEL"),), _model_sampling_sd3),
        Node("ModelSamplingAuraFlow", "ModelSamplingAuraFlow", "advanced/model",
             {"model": _l("MODEL"), "shift": _f(1.73, 0.0, 100.0)}, (("MODEL", "MODEL"),), _model_sampling_aura_flow),
        Node("CFGNorm", "CFGNorm", "advanced/guidance",
             {"model": _l("MODEL"), "strength": _f(1.0, 0.0, 100.0),
              "pre_cfg": Input("BOOLEAN", default=False, optional=True)}, (("MODEL", "patched_model"),), _cfg_norm),
        Node("TextEncodeQwenImageEdit", "TextEncodeQwenImageEdit", "advanced/conditioning",
             {"clip": _l("CLIP"), "prompt": Input("STRING", multiline=True), "vae": _l("VAE", optional=True),
              "image": _l("IMAGE", optional=True)}, (("CONDITIONING", "CONDITIONING"),), _text_encode_qwen_edit),
        Node("TextEncodeQwenImageEditPlus", "TextEncodeQwenImageEditPlus", "advanced/conditioning",
             {"clip": _l("CLIP"), "prompt": Input("STRING", multiline=True), "vae": _l("VAE", optional=True),
              "image1": _l("IMAGE", optional=True), "image2": _l("IMAGE", optional=True),
              "image3": _l("IMAGE", optional=True)}, (("CONDITIONING", "CONDITIONING"),),
             _text_encode_qwen_edit_plus),
        Node("ModelSamplingFlux", "ModelSamplingFlux", "advanced/model",
             {"model": _l("MODEL"), "max_shift": _f(1.15, 0.0, 100.0), "base_shift": _f(0.5, 0.0, 100.0),
              "width": _i(1024, 16, MAX_RESOLUTION, 8), "height": _i(1024, 16, MAX_RESOLUTION, 8)},
             (("MODEL", "MODEL"),), _model_sampling_flux),
    ]
    return {node.name: node for node in n}


NODES: dict[str, Node] = _nodes()
"""Built once at import and never changed (the node set is code, not state)."""


def object_info(lists: dict[str, list[str]], name: str | None = None) -> dict:
    if name is not None:
        if name not in NODES:
            return {}
        return {name: NODES[name].object_info(lists)}
    return {k: v.object_info(lists) for k, v in NODES.items()}


def executor_for(engine):
    """A GraphExecutor over NODES whose choices come from `engine`'s registry."""
    from .executor import GraphExecutor
    return GraphExecutor(NODES, lambda: model_lists(engine.registry, engine.upscalers().names()))


__all__ = ["NODES", "object_info", "model_lists", "executor_for", "ResolvedLora"]
