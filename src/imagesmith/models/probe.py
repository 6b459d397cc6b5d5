"""What is this model file? Kind, architecture and format, from safetensors headers and config JSON only.

Nothing here loads weights: a safetensors header is 8 bytes of length plus a JSON table of tensor
names, dtypes and shapes, and that is all `probe` reads. The key layouts are those real files use:
A1111/Civitai single files (LDM names), ComfyUI/BFL FLUX files, diffusers folders and diffusers-layout
single files, kohya and diffusers/peft LoRAs, textual-inversion embeddings, ControlNets, VAEs.

Pickle files (.ckpt/.pt/.pth/.bin) are refused by `refuse_pickle` without being opened by torch or
pickle: loading a pickle runs code of the file's author."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..core.errors import UnsafeModelFile

Kind = Literal["checkpoint", "vae", "lora", "embedding", "controlnet", "upscaler", "ipadapter", "clip_vision",
               "unknown"]
Arch = Literal["sd1", "sd2", "sdxl", "sd3", "flux", "qwen", "qwen21", "unknown"]
Format = Literal["diffusers", "single-file"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 256 * 1024 * 1024  # real headers are < 10 MB; this only bounds a corrupt length


class ProbeResult(BaseModel):
    kind: Kind
    arch: Arch
    format: Format
    notes: list[str] = Field(default_factory=list, description="variant and caveats, one short line each")
    components: list[str] = Field(default_factory=list,
                                  description="parts present: unet/transformer, vae, text_encoder[_2/_3]")
    native_size: int | None = Field(None, description="native image side in pixels, when known")
    embedded_configs: bool = Field(False, description="single file carries imagesmith's diffusers configs")


class SafetensorsHeader(BaseModel):
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------ pickles
def looks_like_pickle(path: Path) -> bool:
    """Zip (torch.save) or raw pickle (protocol 2+ starts with 0x80) magic bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6))


def refuse_pickle(path: str | Path) -> None:
    """Raise UnsafeModelFile for a pickle-based model file; return for anything else. Reads at most
    4 magic bytes; never unpickles."""
    path = Path(path)
    if path.is_file() and (path.suffix.lower() in PICKLE_SUFFIXES or
                           (path.suffix.lower() != ".safetensors" and looks_like_pickle(path))):
        raise UnsafeModelFile(
            f"{path.name} is a pickle-format model file ({path.suffix or 'no suffix'}), which can run code when "
            f"loaded, so imagesmith refuses it. Convert it to .safetensors (e.g. with a trusted converter in an "
            f"isolated environment) and put the .safetensors file in {path.parent}.")


def refuse_pickles_in(folder: Path) -> None:
    """A diffusers folder whose weights are only pickles (.bin/.ckpt/.pt/.pth) is refused by name;
    loading always passes use_safetensors=True as well."""
    for d in [folder, *[p for p in folder.iterdir() if p.is_dir()]]:
        files = [p for p in d.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            refuse_pickle(pickles[0])


# ------------------------------------------------------------------------------------------ headers
def read_header(path: str | Path) -> SafetensorsHeader:
    """Tensor names, shapes, dtypes and metadata of a .safetensors file, from its JSON header."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: not a safetensors file (header length {n})")
        blob = f.read(n)
    if len(blob) != n:
        raise ValueError(f"{path.name}: truncated safetensors header")
    try:
        table = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path.name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path.name}: not a safetensors file")
    metadata = table.pop("__metadata__", None) or {}
    shapes, dtypes = {}, {}
    for k, v in table.items():
        if not isinstance(v, dict) or "shape" not in v:
            raise ValueError(f"{path.name}: malformed safetensors header entry {k!r}")
        shapes[k] = list(v["shape"])
        dtypes[k] = str(v.get("dtype", ""))
    return SafetensorsHeader(shapes=shapes, dtypes=dtypes,
                             metadata={str(k): str(v) for k, v in metadata.items()})


def read_model_header(path: str | Path) -> SafetensorsHeader:
    """The tensor table of a .safetensors or .gguf file (names, shapes, dtypes, metadata), weights unread."""
    if Path(path).suffix.lower() == ".gguf":
        from .gguf_files import read_gguf_tables
        shapes, dtypes, metadata = read_gguf_tables(path)
        return SafetensorsHeader(shapes=shapes, dtypes=dtypes, metadata=metadata)
    return read_header(path)


def embedded_configs(header: SafetensorsHeader) -> dict[str, Any] | None:
    from .convert import META_CONFIGS
    text = header.metadata.get(META_CONFIGS)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------------ probe
def probe(path: str | Path) -> ProbeResult:
    """Identify a model file or diffusers folder without loading weights. Pickle files raise
    UnsafeModelFile; unreadable or unrecognised files give kind 'unknown' with a note."""
    path = Path(path)
    if path.is_dir():
        return probe_folder(path)
    refuse_pickle(path)
    if path.suffix.lower() == ".safetensors":
        try:
            header = read_header(path)
        except (OSError, ValueError) as exc:
            return ProbeResult(kind="unknown", arch="unknown", format="single-file", notes=[str(exc)])
        return probe_header(header, name=path.stem)
    if path.suffix.lower() == ".gguf":
        from .gguf_files import quantisation
        try:
            header = read_model_header(path)
        except (OSError, ValueError) as exc:
            return ProbeResult(kind="unknown", arch="unknown", format="single-file", notes=[str(exc)])
        res = probe_header(header, name=path.stem)
        res.notes.insert(0, f"GGUF {quantisation(header)}")
        return res
    if path.suffix.lower() in (".param",) or path.name.endswith(".ncnn.bin"):
        return ProbeResult(kind="upscaler", arch="unknown", format="single-file", notes=["ncnn network"])
    return ProbeResult(kind="unknown", arch="unknown", format="single-file",
                       notes=[f"not a model format imagesmith reads ({path.suffix or 'no suffix'})"])


def _name_hints(result: ProbeResult, stem: str) -> None:
    """Weights cannot tell an SDXL VAE from an SD1 one, nor FLUX's 16-channel VAE from SD3's: the
    file name decides those, as users name them (sdxl_vae, ae / flux_vae, sd3_vae)."""
    if result.kind != "vae":
        return
    low = stem.lower()
    if result.arch in ("sd1", "unknown") and "latent4" in result.notes:
        if "xl" in low:
            result.arch = "sdxl"
        elif "sd2" in low or "v2" in low:
            result.arch = "sd2"
    if "latent16" in result.notes:
        if "sd3" in low or "sd35" in low or "sd3.5" in low:
            result.arch = "sd3"
        elif "flux" in low or low in ("ae", "flux-ae", "flux_ae") or low.startswith("ae."):
            result.arch = "flux"
    result.notes = [n for n in result.notes if n not in ("latent4", "latent16")] + (
        ["4-channel SD VAE: fits SD1/SD2/SDXL"] if "latent4" in result.notes else
        ["16-channel VAE: SD3 or FLUX"] if "latent16" in result.notes else [])


def _context_dim_from_attn2(shapes: dict[str, list[int]], pattern: str) -> int | None:
    rx = re.compile(pattern)
    for k, s in shapes.items():
        if rx.search(k) and len(s) == 2:
            return s[1]
    return None


_CONTEXT_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}
_NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024, "qwen": 1328, "qwen21": 1024}
QWEN21_NOTE = ("Qwen-Image 2.1 (one model for both: text to image, and up to three condition pictures the prompt "
               "calls Picture 1-3; RGBA pictures in and out)")
QWEN_EDIT_NOTE = "Qwen-Image-Edit (instruction editing: the picture to edit, and what to change)"
QWEN_EDIT_PLUS_NOTE = "Qwen-Image-Edit-Plus (2509 and later; by its file name)"


def probe_header(header: SafetensorsHeader, name: str = "") -> ProbeResult:
    """Identify a parsed header; `name` (the file stem) only settles what weights cannot tell apart
    (which 4- or 16-channel VAE family)."""
    shapes = header.shapes
    keys = list(shapes)
    configs = embedded_configs(header)
    res = _probe_keys(shapes, keys)
    if configs:
        res.embedded_configs = True
        meta_arch = header.metadata.get("imagesmith.arch")
        if meta_arch in ("sd1", "sd2", "sdxl", "sd3", "flux"):
            res.arch = meta_arch  # type: ignore[assignment]
        size = _native_from_configs(configs)
        if size:
            res.native_size = size
        if res.kind == "vae" and "vae" in configs:
            lat = configs["vae"].get("latent_channels")
            res.notes = [n for n in res.notes if n not in ("latent4", "latent16")]
            if lat is not None and res.arch == "unknown":
                res.notes.append(f"{lat}-channel VAE")
    if res.native_size is None and res.kind == "checkpoint" and res.arch in _NATIVE:
        res.native_size = _NATIVE[res.arch]
    _name_hints(res, name)
    if res.kind == "checkpoint":
        res.notes[:0] = _precision_notes(header)
    if res.arch == "flux" and res.kind == "checkpoint":
        res.notes.extend(_flux_variant(header, name))
    if res.arch == "qwen" and res.kind == "checkpoint" and "edit" in name.lower():
        # the weights of Edit and Edit-Plus are shaped as Qwen-Image's: the file name tells them (as downloads
        # name them: qwen_image_edit_2509_fp8_e4m3fn, Qwen-Image-Edit-2511-Q4_K_M)
        plus = any(t in name.lower() for t in ("2509", "2511", "plus"))
        res.notes += [QWEN_EDIT_NOTE, QWEN_EDIT_PLUS_NOTE if plus else "Qwen-Image-Edit (2508)"]
    return res


def _flux_variant(header: SafetensorsHeader, name: str) -> list[str]:
    """FLUX.1 Fill reads the masked picture and the mask (384 features a token, not 64); Kontext's weights are
    shaped as dev's, so its file name tells it (as in every download of it: flux1-kontext-dev...)."""
    img_in = next((s for k, s in header.shapes.items() if k.endswith(("img_in.weight", "x_embedder.weight"))), None)
    if img_in and len(img_in) == 2 and img_in[1] > 64:
        return ["FLUX.1 Fill (inpainting: reads the masked picture and the mask)"]
    if "kontext" in name.lower():
        return ["FLUX.1 Kontext (instruction editing: the picture to edit, and what to change)"]
    return []


def _precision_notes(header: SafetensorsHeader) -> list[str]:
    """fp8 (plain, or ComfyUI's "scaled" with a scale per layer) and bitsandbytes NF4/FP4 files, by their
    tensors."""
    keys = header.shapes
    if any(k.endswith((".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")) for k in keys):
        kind = "NF4" if any(k.endswith("bitsandbytes__nf4") for k in keys) else "FP4"
        return [f"bitsandbytes {kind}: kept 4-bit, dequantised per call"]
    weights = [d for k, d in header.dtypes.items() if k.endswith(".weight") and len(keys[k]) >= 2]
    fp8 = sum(d in ("F8_E4M3", "F8_E5M2") for d in weights)
    if weights and fp8 >= len(weights) / 2:
        kind = "e5m2" if sum(d == "F8_E5M2" for d in weights) > fp8 / 2 else "e4m3fn"
        scaled = "scaled_fp8" in keys or any(k.endswith(".scale_weight") for k in keys)
        return [f"fp8 {kind}{' scaled (a scale per layer, ComfyUI)' if scaled else ''}: upcast on load"]
    return []


def _native_from_configs(configs: dict) -> int | None:
    unet = configs.get("unet") or configs.get("transformer") or {}
    sample = unet.get("sample_size")
    if isinstance(sample, int) and sample > 0:
        return sample * 8
    return None


def _probe_keys(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:  # noqa: C901 - one decision table
    def any_start(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def any_in(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    single = "single-file"
    if not keys:
        return ProbeResult(kind="unknown", arch="unknown", format=single, notes=["empty safetensors file"])

    # -------------------------------------------------------------- LoRA / LyCORIS
    lora_markers = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora.down.", "lora.up.",
                    ".lora_linear_layer.", ".hada_w1_a", ".lokr_w1", ".lora_mid.")
    if any_in(*lora_markers):
        return _probe_lora(shapes, keys)

    # -------------------------------------------------------------- IP-Adapter (the original layout)
    if any_start("image_proj.") and any_start("ip_adapter."):
        return _probe_ip_adapter(shapes, keys)

    # -------------------------------------------------------------- FLUX Redux (ComfyUI's models/style_models)
    if "redux_up.weight" in shapes and "redux_down.weight" in shapes:
        return ProbeResult(kind="ipadapter", arch="flux", format=single, notes=[
            f"FLUX.1 Redux image embedder (SigLIP width {shapes['redux_up.weight'][1]} -> T5 width "
            f"{shapes['redux_down.weight'][0]}): reference images on FLUX"])

    # -------------------------------------------------------------- CLIP vision (ComfyUI's models/clip_vision files)
    if any_start("vision_model.") and not any_start("text_model."):
        width = shapes.get("vision_model.embeddings.patch_embedding.weight", [0])[0]
        siglip = any_start("vision_model.head.") and not any_in("pre_layrnorm")
        return ProbeResult(kind="clip_vision", arch="unknown", format=single,
                           notes=[f"{'SigLIP' if siglip else 'CLIP'} vision encoder, width {width}"])

    # -------------------------------------------------------------- textual inversion
    if "emb_params" in shapes or any_start("string_to_param.") or {"clip_l", "clip_g"} & set(keys):
        return _probe_embedding(shapes, keys)
    if len(keys) == 1 and 1 <= len(shapes[keys[0]]) <= 2 and shapes[keys[0]][-1] in (768, 1024) and (
            len(shapes[keys[0]]) == 1 or shapes[keys[0]][0] <= 75):  # diffusers' learned_embeds: {"<token>": [w]}
        return _probe_embedding({"emb_params": shapes[keys[0]]}, ["emb_params"])

    # -------------------------------------------------------------- ControlNet
    if any_start("control_model.") or any_in("input_hint_block.", "zero_convs.") or (
            any_start("controlnet_cond_embedding.") and any_start("controlnet_down_blocks.")) or (
            any_start("controlnet_x_embedder.") and any_start("controlnet_blocks.")):  # DiT ControlNets (FLUX, Qwen)
        return _probe_controlnet(shapes, keys)

    # -------------------------------------------------------------- FLUX transformer
    if any_in("double_blocks.0.img_attn", "single_blocks.0.linear1"):
        return _probe_flux(shapes, keys, layout="bfl")
    if any_in("single_transformer_blocks.") and any_in("attn.add_q_proj"):
        return _probe_flux(shapes, keys, layout="diffusers")

    # -------------------------------------------------------------- Qwen-Image 2.1's single-stream transformer
    if any_in("txt_in.text_norm.weight") and any_in("transformer_blocks.0.img_mlp.gate_layer.weight") and \
            any_in("modulation.1.weight"):
        bare = [k.removeprefix("model.diffusion_model.") for k in keys]
        blocks = len({k.split(".")[1] for k in bare if k.startswith("transformer_blocks.")})
        return ProbeResult(kind="checkpoint", arch="qwen21", format=single, components=["transformer"],
                           notes=[f"Qwen-Image 2.1 transformer ({blocks} blocks)", QWEN21_NOTE, "transformer only: "
                                  "the VAE, text encoder and processor come from a Qwen-Image 2.1 diffusers folder"])

    # -------------------------------------------------------------- Qwen-Image MMDiT (diffusers names; ComfyUI's files too)
    if any_in("txt_norm.weight") and any_in("transformer_blocks.0.img_mod.1.weight"):
        bare = [k.removeprefix("model.diffusion_model.") for k in keys]
        blocks = len({k.split(".")[1] for k in bare if k.startswith("transformer_blocks.")})
        return ProbeResult(kind="checkpoint", arch="qwen", format=single, components=["transformer"],
                           notes=[f"Qwen-Image transformer ({blocks} blocks)", "transformer only: the VAE, text "
                                  "encoder and tokenizer come from a Qwen-Image diffusers folder"])

    # -------------------------------------------------------------- SD3 MMDiT
    if any_in("joint_blocks.0.") or (any_in("transformer_blocks.0.attn.add_q_proj") and any_in("context_embedder.")
                                     and any_in("pos_embed")):
        return _probe_sd3(shapes, keys)

    # -------------------------------------------------------------- SD1/SD2/SDXL UNet (LDM or diffusers names)
    unet_prefix = "model.diffusion_model."
    has_ldm_unet = any_start(unet_prefix + "input_blocks.") or any_start("input_blocks.", "diffusion_model.input_blocks.")
    has_diffusers_unet = any_start("down_blocks.", "unet.down_blocks.") and any_in("time_embedding.linear_1")
    if has_ldm_unet or has_diffusers_unet:
        return _probe_sd_unet(shapes, keys, diffusers_names=has_diffusers_unet and not has_ldm_unet)

    # -------------------------------------------------------------- VAE
    vae_keys = [k for k in keys if k.removeprefix("first_stage_model.").removeprefix("vae.").startswith(
        ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    if vae_keys and len(vae_keys) >= 0.9 * len(keys):
        return _probe_vae(shapes, vae_keys)

    # -------------------------------------------------------------- upscalers (ESRGAN/RRDB family, SwinIR, ...)
    if any_start("conv_first.", "body.0.rdb1.", "model.0.weight", "model.1.sub.0.RDB1.", "params_ema.") or any_in(
            "RDB1.conv1", "rdb1.conv1"):
        return ProbeResult(kind="upscaler", arch="unknown", format=single, notes=["ESRGAN-family super-resolution net"])

    # -------------------------------------------------------------- text encoders alone
    if any_start("text_model.", "encoder.block.0.layer.0.SelfAttention", "shared.weight", "encoder.layers.0.self_attn"):
        return ProbeResult(kind="unknown", arch="unknown", format=single,
                           notes=["a text encoder on its own: put it in a diffusers folder's text_encoder*/"])
    return ProbeResult(kind="unknown", arch="unknown", format=single,
                       notes=[f"unrecognised tensor layout (first key {keys[0]!r})"])


def _probe_sd_unet(shapes: dict[str, list[int]], keys: list[str], *, diffusers_names: bool) -> ProbeResult:
    notes: list[str] = []
    components = ["unet"]
    if any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        components.append("vae")
    te = {
        "sd1": any(k.startswith("cond_stage_model.transformer.") for k in keys),
        "sd2": any(k.startswith("cond_stage_model.model.") for k in keys),
        "sdxl": any(k.startswith("conditioner.embedders.") for k in keys),
    }
    if te["sd1"] or te["sd2"]:
        components.append("text_encoder")
    if te["sdxl"]:
        if any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            components.append("text_encoder")
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            components.append("text_encoder_2")
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            components.append("text_encoder_2")
            notes.append("SDXL refiner (OpenCLIP-bigG only)")
    ctx = _context_dim_from_attn2(shapes, r"(input_blocks|down_blocks)\.\d+\.(1|attentions\.\d+)\.transformer_blocks\.0\.attn2\.to_k\.weight$")
    label = next((s for k, s in shapes.items() if re.search(r"(label_emb\.0\.0|add_embedding\.linear_1)\.weight$", k)), None)
    depth2 = any(re.search(r"transformer_blocks\.[1-9]\d*\.attn1", k) for k in keys)
    arch: str
    if te["sdxl"] or (label is not None and label[-1] in (2816, 2560)) or ctx in (2048, 1280):
        arch = "sdxl"
    elif te["sd2"] or ctx == 1024:
        arch = "sd2"
        notes.append("SD2.x: v-prediction (768-v) assumed unless the file's configs say otherwise")
    elif te["sd1"] or ctx == 768:
        arch = "sd1"
    elif label is not None or depth2:
        arch = "sdxl"
    else:
        arch = "unknown"
        notes.append(f"UNet with context width {ctx}: not SD1/SD2/SDXL")
    conv_in = next((s for k, s in shapes.items() if k.endswith(("input_blocks.0.0.weight", "conv_in.weight"))
                    and "first_stage" not in k and not k.startswith(("vae.", "encoder.", "decoder."))), None)
    if conv_in is not None and len(conv_in) == 4:
        if conv_in[1] == 9:
            notes.append("inpainting model (9 input channels)")
        elif conv_in[1] == 8:
            notes.append("instruct-pix2pix model (8 input channels)")
    if any(k.startswith("model_ema.") for k in keys):
        notes.append("has EMA weights")
    if len(components) == 1:
        notes.append("UNet only: VAE and text encoders come from a diffusers folder of the same architecture")
    return ProbeResult(kind="checkpoint", arch=arch, format="single-file", notes=notes, components=components)


def _probe_flux(shapes: dict[str, list[int]], keys: list[str], *, layout: str) -> ProbeResult:
    notes = []
    if layout == "bfl":
        guidance = any("guidance_in." in k for k in keys)
        doubles = {int(m.group(1)) for k in keys if (m := re.search(r"double_blocks\.(\d+)\.", k))}
        singles = {int(m.group(1)) for k in keys if (m := re.search(r"single_blocks\.(\d+)\.", k))}
        notes.append("BFL/ComfyUI layout")
    else:
        guidance = any("guidance_embedder" in k for k in keys)
        doubles = {int(m.group(1)) for k in keys if (m := re.search(r"(?<!single_)transformer_blocks\.(\d+)\.", k))}
        singles = {int(m.group(1)) for k in keys if (m := re.search(r"single_transformer_blocks\.(\d+)\.", k))}
        notes.append("diffusers transformer layout")
    notes.append("FLUX.1-dev style (guidance distilled)" if guidance else "FLUX.1-schnell style (no guidance embedding)")
    notes.append(f"{len(doubles)} double / {len(singles)} single blocks")
    components = ["transformer"]
    if any(k.startswith("vae.") for k in keys):
        components.append("vae")
    if any(k.startswith("text_encoders.clip_l.") for k in keys):
        components.append("text_encoder")
    if any(k.startswith("text_encoders.t5xxl.") for k in keys):
        components.append("text_encoder_2")
    if components == ["transformer"]:
        notes.append("transformer only: VAE and text encoders come from a FLUX diffusers folder")
    return ProbeResult(kind="checkpoint", arch="flux", format="single-file", notes=notes, components=components,
                       native_size=1024)


def _probe_sd3(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:
    notes = []
    blocks = {int(m.group(1)) for k in keys if (m := re.search(r"(?:joint_blocks|transformer_blocks)\.(\d+)\.", k))}
    n = len(blocks)
    if n >= 38:
        notes.append("SD3.5 Large-size MMDiT")
    elif n == 24:
        notes.append("SD3 / SD3.5 Medium-size MMDiT")
    if any("x_block.attn2." in k or ".attn2.to_q" in k for k in keys):
        notes.append("MMDiT-X (SD3.5 Medium)")
    components = ["transformer"]
    if any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        components.append("vae")
    for name, comp in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3")):
        if any(k.startswith(f"text_encoders.{name}.") for k in keys):
            components.append(comp)
    if components == ["transformer"]:
        notes.append("transformer only: VAE and text encoders come from an SD3 diffusers folder")
    return ProbeResult(kind="checkpoint", arch="sd3", format="single-file", notes=notes, components=components,
                       native_size=1024)


def _probe_vae(shapes: dict[str, list[int]], vae_keys: list[str]) -> ProbeResult:
    bare = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in vae_keys]
    if any(k.endswith(("middle.0.residual.0.gamma", "mid_block.resnets.0.norm1.gamma")) for k in bare):
        # Wan 2.1's causal 3-D VAE, which Qwen-Image uses (ComfyUI's qwen_image_vae / wan_2.1_vae files keep Wan's
        # own names; diffusers' AutoencoderKLQwenImage has the same modules under other names)
        layout = "Wan layout" if any(".residual." in k for k in bare) else "diffusers layout"
        return ProbeResult(kind="vae", arch="qwen", format="single-file", components=["vae"],
                           notes=[f"3-D VAE of Wan 2.1 / Qwen-Image ({layout})"])
    lat = None
    for k in vae_keys:
        kk = k.removeprefix("first_stage_model.").removeprefix("vae.")
        if kk == "decoder.conv_in.weight":
            lat = shapes[k][1]
            break
    notes = []
    arch = "unknown"
    if lat == 4:
        arch = "sd1"
        notes.append("latent4")
    elif lat == 16:
        notes.append("latent16")
    elif lat is not None:
        notes.append(f"{lat}-channel VAE")
    if any("down_blocks." in k for k in vae_keys):
        notes.append("diffusers layout")
    return ProbeResult(kind="vae", arch=arch, format="single-file", notes=notes, components=["vae"])


def _probe_controlnet(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:
    notes = []
    ctx = _context_dim_from_attn2(shapes, r"(input_blocks|down_blocks)\.\d+\.(1|attentions\.\d+)\.transformer_blocks\.0\.attn2\.to_k\.weight$")
    label = any(re.search(r"(label_emb\.0\.0|add_embedding\.linear_1)\.weight$", k) for k in keys)
    if label or ctx == 2048:
        arch = "sdxl"
    elif ctx == 1024:
        arch = "sd2"
    elif ctx == 768:
        arch = "sd1"
    elif any(k.startswith("txt_norm.") for k in keys) and any(k.startswith("img_in.") for k in keys):
        arch = "qwen"  # InstantX's Qwen-Image ControlNets (diffusers' QwenImageControlNetModel names)
        x = shapes.get("controlnet_x_embedder.weight")
        inpaint = x is not None and "img_in.weight" in shapes and x[1] > shapes["img_in.weight"][1]
        notes.append("Qwen-Image ControlNet" + (" (inpainting: reads the mask too)" if inpaint else ""))
    elif any(k.startswith("controlnet_x_embedder.") for k in keys) or (
            any("transformer_blocks.0.attn.add_q_proj" in k for k in keys) and any("time_text_embed" in k for k in keys)
            and not any(k.startswith("pos_embed.") for k in keys)):
        arch = "flux"
        notes.append("FLUX ControlNet" + (" (union: several control types)" if any(
            k.startswith("controlnet_mode_embedder.") for k in keys) else ""))
    elif any("transformer_blocks.0.attn" in k for k in keys) and any(k.startswith("pos_embed") for k in keys):
        arch = "sd3"
        notes.append("SD3 ControlNet")
    else:
        arch = "sd1"
        notes.append(f"context width {ctx}: assumed SD1")
    if "task_embedding" in shapes:
        notes.append(f"union ControlNet ({shapes['task_embedding'][0]} control types; xinsir Union/ProMax)")
    if any(k.startswith("control_model.") for k in keys) or any("input_hint_block" in k for k in keys):
        notes.append("original ControlNet layout")
    else:
        notes.append("diffusers layout")
    return ProbeResult(kind="controlnet", arch=arch, format="single-file", notes=notes)  # type: ignore[arg-type]


def ip_adapter_kind(keys) -> str:
    """Which IP-Adapter a state dict (its ``image_proj.*`` names) is: ``plain``, ``Plus`` (a resampler over the
    CLIP encoder's hidden states), ``full face`` (an MLP over them), ``FaceID`` (an MLP over an InsightFace
    identity embedding) or ``FaceID Plus`` (the identity embedding and the face's CLIP hidden states), told
    apart as diffusers' loader tells them."""
    keys = set(keys)
    if "image_proj.proj.weight" in keys:
        return "plain"
    if "image_proj.proj.3.weight" in keys:
        return "full face"
    if "image_proj.perceiver_resampler.proj_in.weight" in keys:
        return "FaceID Plus"
    if "image_proj.norm.weight" in keys and "image_proj.proj.0.weight" in keys:
        return "FaceID"
    return "Plus"


def _probe_ip_adapter(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:
    k = next((s for key, s in shapes.items() if key.startswith("ip_adapter.") and key.endswith("to_k_ip.weight")),
             None)
    cross = k[1] if k else 0
    arch = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(cross, "unknown")
    kind = ip_adapter_kind(shapes)
    notes = [f"IP-Adapter ({kind}), cross-attention width {cross}"]
    if kind.startswith("FaceID"):
        notes.append("reads InsightFace identity embeddings: an ArcFace .onnx (w600k_r50 or glintr100) in "
                     "models/insightface" + (", and the CLIP vision encoder ViT-H/14" if kind == "FaceID Plus" else ""))
    return ProbeResult(kind="ipadapter", arch=arch, format="single-file",  # type: ignore[arg-type]
                       notes=notes)


def _probe_embedding(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:
    if "clip_l" in shapes and "clip_g" in shapes:
        return ProbeResult(kind="embedding", arch="sdxl", format="single-file",
                           notes=[f"{shapes['clip_g'][0]} vectors (clip_l + clip_g)"])
    vec = shapes.get("emb_params") or next((s for k, s in shapes.items() if k.startswith("string_to_param.")), None)
    width = vec[-1] if vec else None
    arch = {768: "sd1", 1024: "sd2"}.get(width or 0, "unknown")
    n = vec[0] if vec and len(vec) == 2 else 1
    notes = [f"{n} vector{'s' if n != 1 else ''} of width {width}"]
    return ProbeResult(kind="embedding", arch=arch, format="single-file", notes=notes)  # type: ignore[arg-type]


def _probe_lora(shapes: dict[str, list[int]], keys: list[str]) -> ProbeResult:  # noqa: C901
    notes: list[str] = []
    kohya = any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_"))
                for k in keys)
    notes.append("kohya/WebUI format" if kohya else "diffusers/peft format")
    if any(".hada_w1_a" in k or ".lokr_w1" in k for k in keys):
        notes.append("LyCORIS (LoHa/LoKr)")
    ranks = {s[0] for k, s in shapes.items() if (".lora_down." in k or ".lora_A." in k) and len(s) >= 2}
    if ranks:
        notes.append(f"rank {max(ranks)}" if len(ranks) == 1 else f"ranks {min(ranks)}-{max(ranks)}")

    def in_dim(pattern: str) -> int | None:
        rx = re.compile(pattern)
        for k, s in shapes.items():
            if rx.search(k) and (".lora_down." in k or ".lora_A." in k or "lora.down" in k) and len(s) >= 2:
                return s[1]
        return None

    arch = "unknown"
    blocks = {int(m.group(1)) for k in keys if (m := re.search(r"transformer_blocks[._](\d+)[._]", k))}
    if any(t in k for k in keys for t in ("img_mlp", "txt_mlp", "img_mod", "txt_mod")) or (
            max(blocks, default=0) >= 38 and not any("single" in k for k in keys)
            and any("add_q_proj" in k or "add_k_proj" in k for k in keys)) or any(
            k.startswith(("diffusion_model.transformer_blocks.", "lora_unet_transformer_blocks_")) for k in keys):
        # Qwen-Image: its blocks' own module names, or joint attention in more blocks (60) than SD3.5 Large (38) or
        # FLUX's double stream (19) have, with no single-stream blocks (diffusers/peft, kohya, lightx2v's names);
        # in ComfyUI's layout (diffusion_model.*) FLUX and SD3 use their own names (double_blocks, joint_blocks)
        arch = "qwen"
        # Qwen-Image 2.1: its SwiGLU's own names (img_mlp.proj / gate_layer / out; Qwen-Image's is img_mlp.net),
        # its text input (txt_in.in_layer), or attention 4096 wide (32 heads of 128; Qwen-Image's is 3072)
        if any(t in k for k in keys for t in ("img_mlp.gate_layer", "img_mlp_gate_layer", "img_mlp.proj.",
                                              "img_mlp_proj.", "txt_in.in_layer", "txt_in_in_layer")) or \
                in_dim(r"transformer_blocks[._]\d+[._]attn[._]to_q") == 4096:
            arch = "qwen21"
    elif any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        arch = "flux"
    elif any("joint_blocks" in k for k in keys):
        arch = "sd3"
    elif any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        arch = "sdxl"
    elif any(k.startswith(("transformer.", "lora_transformer_")) for k in keys):
        d = in_dim(r"transformer[._]transformer_blocks[._]0[._]attn[._]to_q")
        arch = "flux" if d == 3072 else "sd3" if d in (1536, 2432) else "unknown"
        if arch == "unknown":
            notes.append("transformer LoRA of unknown width")
    else:
        ctx = in_dim(r"attn2[._]to_k")
        te = in_dim(r"(lora_te_|text_encoder\.).*(q_proj|self_attn[._]q_proj)")
        sgm = any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
                  for k in keys)
        depth2 = any(re.search(r"transformer_blocks[._][1-9]", k) for k in keys)
        if ctx == 2048 or ctx == 1280:
            arch = "sdxl"
        elif ctx == 1024 or te == 1024:
            arch = "sd2"
        elif ctx == 768 or te == 768:
            arch = "sd1"
        elif depth2 or (sgm and ctx is not None and ctx > 1024):
            arch = "sdxl"
        elif any(k.startswith(("lora_unet_", "unet.", "lora_te_", "text_encoder.")) for k in keys):
            arch = "sd1"
            if ctx not in (None, 768):
                notes.append(f"context width {ctx}: assumed SD1")
    return ProbeResult(kind="lora", arch=arch, format="single-file", notes=notes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ folders
_PIPELINE_ARCH = [
    ("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusion", "sd1"),
    ("QwenImage21", "qwen21"), ("QwenImage", "qwen"),
]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _unet_arch(cfg: dict) -> str:
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    ctx = cfg.get("cross_attention_dim")
    if isinstance(ctx, list):
        ctx = ctx[0] if ctx else None
    return _CONTEXT_ARCH.get(ctx or 0, "sd1")


def probe_folder(path: Path) -> ProbeResult:
    fmt: Format = "diffusers"
    index = path / "model_index.json"
    if index.is_file():
        info = _read_json(index)
        cls = str(info.get("_class_name", ""))
        if cls == "FluxPriorReduxPipeline":  # black-forest-labs/FLUX.1-Redux-dev as diffusers keeps it
            emb = _read_json(path / "image_embedder" / "config.json")
            return ProbeResult(kind="ipadapter", arch="flux", format=fmt, notes=[
                f"FLUX.1 Redux image embedder (SigLIP width {emb.get('redux_dim', '?')} -> T5 width "
                f"{emb.get('txt_in_features', '?')}), diffusers folder with its SigLIP encoder: reference images on "
                "FLUX"], components=[k for k, v in info.items() if not k.startswith("_") and isinstance(v, list)])
        arch = next((a for prefix, a in _PIPELINE_ARCH if cls.startswith(prefix)), "unknown")
        notes = [cls] if cls else ["model_index.json without _class_name"]
        unet_cfg = _read_json(path / "unet" / "config.json")
        if arch == "sd1" and unet_cfg:
            arch = _unet_arch(unet_cfg)
        if arch == "unknown":
            notes.append(f"pipeline class {cls or '?'} is not one imagesmith runs (SD1/SD2/SDXL/SD3/FLUX/Qwen-Image/"
                         "Qwen-Image 2.1)")
        if arch == "qwen21":
            notes.append(QWEN21_NOTE)
            if cls != "QwenImage21Pipeline":
                arch = "unknown"
                notes.append(f"{cls}: imagesmith runs QwenImage21Pipeline folders, not this variant")
        if arch == "qwen":
            if cls.startswith("QwenImageEdit"):
                notes.append(QWEN_EDIT_NOTE)
            elif cls not in ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"):
                arch = "unknown"
                notes.append(f"{cls}: imagesmith runs Qwen-Image and Qwen-Image-Edit folders, not this variant")
        if "ControlNet" in cls:
            notes.append("a ControlNet pipeline folder: its unet/ and controlnet/ are used as a checkpoint")
        components = [k for k, v in info.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
        den = unet_cfg or _read_json(path / "transformer" / "config.json")
        size = den.get("sample_size")
        native = size * 8 if isinstance(size, int) and arch in ("sd1", "sd2", "sdxl", "sd3") else _NATIVE.get(arch)
        if arch == "sd2" and (path / "scheduler" / "scheduler_config.json").is_file():
            pred = _read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type")
            if pred:
                notes.append(f"prediction_type {pred}")
        if unet_cfg.get("in_channels") == 9:
            notes.append("inpainting model (9 input channels)")
        if arch == "flux":
            t = den
            if t.get("out_channels") and t.get("in_channels", 64) > t["out_channels"]:
                notes.append("FLUX.1 Fill (inpainting: reads the masked picture and the mask)")
            elif "Kontext" not in cls and "kontext" in path.name.lower():
                notes.append("FLUX.1 Kontext (instruction editing: the picture to edit, and what to change)")
        return ProbeResult(kind="checkpoint", arch=arch, format=fmt, notes=notes,  # type: ignore[arg-type]
                           components=components, native_size=native)
    config = path / "config.json"
    if config.is_file():
        cfg = _read_json(config)
        cls = str(cfg.get("_class_name", ""))
        notes = [cls]
        if cls == "UNet2DConditionModel":
            notes.append("UNet only: VAE and text encoders come from a diffusers folder of the same architecture")
            return ProbeResult(kind="checkpoint", arch=_unet_arch(cfg), format=fmt, notes=notes,  # type: ignore[arg-type]
                               components=["unet"])
        if cls == "SD3Transformer2DModel":
            return ProbeResult(kind="checkpoint", arch="sd3", format=fmt, notes=notes + ["transformer only"],
                               components=["transformer"])
        if cls == "QwenImageTransformer2DModel":
            return ProbeResult(kind="checkpoint", arch="qwen", format=fmt, notes=notes + ["transformer only"],
                               components=["transformer"])
        if cls == "AutoencoderKLQwenImage":
            return ProbeResult(kind="vae", arch="qwen", format=fmt, notes=notes, components=["vae"])
        if cls == "QwenImage21Transformer2DModel":
            return ProbeResult(kind="checkpoint", arch="qwen21", format=fmt, components=["transformer"],
                               notes=notes + [QWEN21_NOTE, "transformer only"])
        if cls == "AutoencoderKLQwenImage21":
            return ProbeResult(kind="vae", arch="qwen21", format=fmt, components=["vae"],
                               notes=notes + ["Qwen-Image 2.1's VAE (RGBA, 64 latent channels, 16x)"])
        if cls == "FluxTransformer2DModel":
            notes.append("FLUX.1-dev style" if cfg.get("guidance_embeds") else "FLUX.1-schnell style")
            return ProbeResult(kind="checkpoint", arch="flux", format=fmt, notes=notes + ["transformer only"],
                               components=["transformer"])
        if cls in ("AutoencoderKL",):
            lat = cfg.get("latent_channels", 4)
            sf = cfg.get("scaling_factor")
            arch = "unknown"
            if lat == 4:
                arch = "sdxl" if sf == 0.13025 else "sd1"
            elif lat == 16:
                arch = {0.1159: "flux", 0.0609: "sd3"}.get(cfg.get("shift_factor"), "unknown")
            return ProbeResult(kind="vae", arch=arch, format=fmt, notes=notes, components=["vae"])  # type: ignore[arg-type]
        if cls in ("ControlNetModel", "ControlNetUnionModel"):
            return ProbeResult(kind="controlnet", arch=_unet_arch(cfg), format=fmt, notes=notes)  # type: ignore[arg-type]
        if cls in ("SD3ControlNetModel", "FluxControlNetModel", "QwenImageControlNetModel"):
            arch = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}.get(cls, "qwen")
            return ProbeResult(kind="controlnet", arch=arch, format=fmt, notes=notes)  # type: ignore[arg-type]
        return ProbeResult(kind="unknown", arch="unknown", format=fmt, notes=[f"config.json of class {cls or '?'}"])
    return ProbeResult(kind="unknown", arch="unknown", format=fmt,
                       notes=["a folder without model_index.json or config.json"])
