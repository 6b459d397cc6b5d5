"""Load registered models into diffusers objects, offline.

Folders load with `from_pretrained(local_path, local_files_only=True)`. Single files load with
`from_single_file(path, config=<local config folder>, local_files_only=True)`, where the config folder
is assembled in a temporary directory from (a) the diffusers configs an imagesmith export carries in
its header, else (b) the configs shipped in models/configs/<arch>, patched with what the file's
shapes say (inpainting input channels, ...), plus the shipped CLIP tokenizer. Nothing here ever
reaches the network or unpickles a file.

FLUX and SD3 files that hold only the transformer (as flux1-dev.safetensors ships) take their VAE,
text encoders and tokenizers from a registered diffusers folder of the same architecture
(`entry.companion`); without one, MissingModelFile says what to install. T5 tokenizers are never
shipped: they come from the model's own folder, the companion, or <home>/models/text_encoders/t5/."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.errors import MissingModelFile, UnsupportedModel
from .probe import embedded_configs, probe, read_header, refuse_pickle, refuse_pickles_in

CONFIGS_DIR = Path(__file__).parent / "configs"
CLIP_TOKENIZER_DIR = CONFIGS_DIR / "tokenizers" / "clip"
ARCH_CONFIG = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux-dev"}
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                  "qwen": "QwenImagePipeline", "qwen21": "QwenImage21Pipeline"}
QWEN_EDIT_CLASSES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
T5_SLOT = {"flux": "tokenizer_2", "sd3": "tokenizer_3"}


def _pipeline_cls(arch: str):
    import diffusers
    if arch not in PIPELINE_CLASS:
        raise UnsupportedModel(f"architecture {arch!r} cannot be loaded as a pipeline (SD1/SD2/SDXL/SD3/FLUX/"
                               "Qwen-Image/Qwen-Image 2.1 only)")
    return getattr(diffusers, PIPELINE_CLASS[arch])


def _finish(pipe, device: str):
    if str(device) != "cpu":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ================================================================================= tokenizers
def write_clip_tokenizer(dest: Path, *, pad_token: str | None = None) -> Path:
    """Copy the shipped CLIP tokenizer into `dest` (SDXL's second tokenizer and SD2's pad with '!')."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in CLIP_TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    if pad_token is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = dest / name
            data = json.loads(p.read_text())
            data["pad_token"] = pad_token
            p.write_text(json.dumps(data, indent=1))
    return dest


def _has_t5_files(d: Path | None) -> bool:
    return d is not None and d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "spiece.model").is_file())


def find_t5_tokenizer_dir(candidates: list[Path | None]) -> Path | None:
    for d in candidates:
        if _has_t5_files(d):
            return d
    return None


def load_t5_tokenizer(d: Path):
    """T5 tokenizer from a folder holding tokenizer.json (fast) or only spiece.model."""
    from transformers import T5TokenizerFast
    if (d / "tokenizer.json").is_file():
        return T5TokenizerFast.from_pretrained(str(d), local_files_only=True)
    extra = 100
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            extra = int(json.loads(cfg.read_text()).get("extra_ids", 100))
        except (ValueError, TypeError, json.JSONDecodeError):
            pass
    return t5_tokenizer_from_spiece(d / "spiece.model", extra_ids=extra)


def _t5_candidates(entry, arch: str) -> list[Path | None]:
    slot = T5_SLOT[arch]
    out: list[Path | None] = []
    if entry.path.is_dir():
        out.append(entry.path / slot)
    if entry.companion is not None:
        out.append(Path(entry.companion) / slot)
    out.append(entry.t5_dir)
    return out


def _missing_t5(entry, arch: str) -> MissingModelFile:
    slot = T5_SLOT[arch]
    where = [str(entry.path / slot)] if entry.path.is_dir() else []
    if entry.companion is not None:
        where.append(str(Path(entry.companion) / slot))
    home_t5 = entry.t5_dir or "<IMAGESMITH_HOME>/models/text_encoders/t5"
    where.append(str(home_t5))
    return MissingModelFile(
        f"{entry.name} ({arch}) needs the T5 tokenizer file spiece.model (or its tokenizer.json), which imagesmith "
        f"cannot ship. Copy spiece.model from the model's original release (e.g. the {slot}/ folder of its "
        f"diffusers repository) into {where[0]}" + (f" or into {where[-1]}" if len(where) > 1 else "") + ".")


def resolve_t5_tokenizer(entry, arch: str):
    d = find_t5_tokenizer_dir(_t5_candidates(entry, arch))
    if d is None:
        raise _missing_t5(entry, arch)
    return load_t5_tokenizer(d)


def _spiece_charsmap(data: bytes) -> bytes | None:
    """The precompiled normaliser charsmap of a sentencepiece ModelProto, read from the protobuf wire
    format by hand (ModelProto.normalizer_spec = field 3, NormalizerSpec.precompiled_charsmap = field 2),
    so a spiece.model loads without the protobuf package."""

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(buf, i)
                yield num, None
            elif wire == 1:
                i += 8
            elif wire == 2:
                n, i = _varint(buf, i)
                yield num, buf[i:i + n]
                i += n
            elif wire == 5:
                i += 4
            else:
                raise ValueError("not a sentencepiece model")

    for num, value in fields(data):
        if num == 3 and value is not None:
            for n2, v2 in fields(value):
                if n2 == 2 and v2 is not None:
                    return v2
    return None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def t5_tokenizer_from_spiece(path: str | Path, *, extra_ids: int = 100):
    """A fast T5 tokenizer built from a sentencepiece `spiece.model` with the sentencepiece library
    (transformers' own conversion needs protobuf). Same vocabulary, scores, normaliser and
    <extra_id_N> layout as T5's (extra ids last, in reverse)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    path = Path(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    charsmap = _spiece_charsmap(path.read_bytes())
    return T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, _spm_precompiled_charsmap=charsmap)


# ================================================================================= config folders
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_config(dest: Path, name: str, cls: str, cfg: dict) -> None:
    d = dest / name
    d.mkdir(parents=True, exist_ok=True)
    fname = "scheduler_config.json" if cls.endswith(("Scheduler", "SchedulerKarras")) or name == "scheduler" else "config.json"
    (d / fname).write_text(json.dumps(cfg, indent=1))


def _shipped_dir(arch: str, header=None) -> Path:
    name = ARCH_CONFIG.get(arch)
    if name is None:
        raise UnsupportedModel(f"no configs for architecture {arch!r}")
    if arch == "flux" and header is not None and not any("guidance_in." in k or "guidance_embedder" in k
                                                         for k in header.shapes):
        name = "flux-schnell"
    return CONFIGS_DIR / name


def _patch_from_shapes(dest: Path, arch: str, header) -> None:
    """Shipped configs describe the base model; a file's shapes may say it is a variant."""
    unet_cfg = dest / "unet" / "config.json"
    if unet_cfg.is_file() and header is not None:
        cfg = _json(unet_cfg)
        conv_in = header.shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in and len(conv_in) == 4 and conv_in[1] != cfg.get("in_channels"):
            cfg["in_channels"] = conv_in[1]
            unet_cfg.write_text(json.dumps(cfg, indent=1))
    if arch == "sdxl" and unet_cfg.is_file() and header is not None:
        cfg = _json(unet_cfg)
        patched = sdxl_unet_from_shapes(cfg, header.shapes)
        if patched != cfg:
            unet_cfg.write_text(json.dumps(patched, indent=1))
    if arch == "sd3" and header is not None and (dest / "transformer" / "config.json").is_file():
        _patch_sd3_transformer(dest / "transformer" / "config.json", header.shapes)


def sdxl_unet_from_shapes(cfg: dict, shapes: dict[str, list[int]]) -> dict:
    """The shipped SDXL UNet config (the base model's) read onto an LDM file's tensors where they differ: Stability's
    sd_xl_refiner_1.0.safetensors carries no diffusers config, and its UNet is another (384-768-1536-1536 channels,
    attention only in the middle two levels, 4 transformer layers each, 1280-wide context from bigG alone, 5 size
    ids). Channels per level, resnets per level, which levels attend and how deep (the middle block's depth goes
    last, where diffusers reads it), the context, pooled and size-id widths come from the shapes; heads keep the
    shipped config's width (64 channels, as SGM's configs set num_head_channels). A file shaped like the base
    model gets the config unchanged."""
    p = "model.diffusion_model."
    conv = shapes.get(p + "input_blocks.0.0.weight")
    label = shapes.get(p + "label_emb.0.0.weight")
    if not conv or not label:
        return cfg
    import re
    found = [re.match(r"input_blocks\.(\d+)\.", k[len(p):]) for k in shapes if k.startswith(p + "input_blocks.")]
    n_input = 1 + max(int(m.group(1)) for m in found if m)
    downs = sorted(i for i in range(n_input) if p + f"input_blocks.{i}.0.op.weight" in shapes)
    per_level = (downs[0] - 1) if downs else n_input - 1
    levels = len(downs) + 1

    def depth(prefix: str) -> int:
        js = [int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))]
        return 1 + max(js) if js else 0
    channels, types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        out = shapes.get(p + f"input_blocks.{first}.0.out_layers.3.weight")
        if out is None:
            return cfg
        channels.append(out[0])
        d = depth(p + f"input_blocks.{first}.1.")
        types.append("CrossAttnDownBlock2D" if d else "DownBlock2D")
        depths.append(d or 1)
    mid = depth(p + "middle_block.1.")
    if mid:
        depths[-1] = mid  # diffusers gives the middle block the last level's depth
    to_k = next((v for k, v in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    old = cfg["block_out_channels"][0]
    heads = cfg["attention_head_dim"][0] if isinstance(cfg["attention_head_dim"], list) else cfg["attention_head_dim"]
    head_width = max(1, old // heads)
    out = dict(cfg, block_out_channels=channels, down_block_types=types, layers_per_block=per_level,
               up_block_types=[t.replace("Down", "Up") for t in reversed(types)], transformer_layers_per_block=depths,
               attention_head_dim=[max(1, c // head_width) for c in channels],
               projection_class_embeddings_input_dim=label[1])
    if to_k:
        out["cross_attention_dim"] = to_k[1]
    # the size ids' width: (pooled-projection input - bigG's pooled width) / ids (6 for the base, 5 for the refiner)
    proj = next((v for k, v in shapes.items() if k.startswith("conditioner.embedders.")
                 and k.endswith("model.text_projection")), None)
    n_ids = 6 if any(k.startswith("conditioner.embedders.0.transformer.") for k in shapes) else 5
    if proj and (label[1] - proj[-1]) > 0 and (label[1] - proj[-1]) % n_ids == 0:
        out["addition_time_embed_dim"] = (label[1] - proj[-1]) // n_ids
    if out["block_out_channels"] == cfg["block_out_channels"] and out["down_block_types"] == cfg["down_block_types"]:
        out["transformer_layers_per_block"] = cfg["transformer_layers_per_block"]  # the base model: as shipped
    return out


def _patch_sd3_transformer(path: Path, shapes: dict[str, list[int]]) -> None:
    import re
    keys = [k.removeprefix("model.diffusion_model.") for k in shapes]
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if not blocks:
        return
    cfg = _json(path)
    depth = max(blocks) + 1
    cfg["num_layers"] = depth
    cfg["num_attention_heads"] = depth  # MMDiT: heads == depth, width 64 * depth
    cfg["caption_projection_dim"] = 64 * depth
    if any(".ln_q." in k for k in keys):
        cfg["qk_norm"] = "rms_norm"
    dual = sorted({int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})
    if dual:
        cfg["dual_attention_layers"] = dual
    pos = shapes.get("model.diffusion_model.pos_embed") or shapes.get("pos_embed")
    if pos and len(pos) == 3:
        side = int(round(pos[1] ** 0.5))
        cfg["pos_embed_max_size"] = side
    path.write_text(json.dumps(cfg, indent=1))


def assemble_config_folder(dest: Path, arch: str, header=None) -> Path:
    """A diffusers config folder (model_index.json, <component>/config.json, CLIP tokenizers) for
    loading a single file offline: the file's embedded configs if it has them, else the shipped ones."""
    configs = embedded_configs(header) if header is not None else None
    if configs and isinstance(configs.get("model_index"), dict):
        index = dict(configs["model_index"])
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name not in configs:
                continue
            _write_config(dest, name, str(spec[1]), configs[name])
        (dest / "model_index.json").write_text(json.dumps(index, indent=1))
    else:
        shutil.copytree(_shipped_dir(arch, header), dest, dirs_exist_ok=True)
        _patch_from_shapes(dest, arch, header)
        index = _json(dest / "model_index.json")
    for slot in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        spec = index.get(slot)
        if isinstance(spec, list) and spec[1] == "CLIPTokenizer":
            pad = "!" if (arch == "sd2" or slot == "tokenizer_2") else None
            write_clip_tokenizer(dest / slot, pad_token=pad)
    return dest


# ================================================================================= safety of folders
def _variant(folder: Path) -> str | None:
    """'fp16' when a folder only has *.fp16.safetensors weights (diffusers repos' variant files)."""
    weights = [p.name for p in folder.rglob("*.safetensors")]
    if weights and all(".fp16." in w for w in weights):
        return "fp16"
    return None


def _missing_companion(entry, arch: str, parts: list[str]) -> MissingModelFile:
    family = {"flux": "FLUX.1 (dev or schnell)", "sd3": "Stable Diffusion 3", "sdxl": "SDXL",
              "sd1": "SD1.5", "sd2": "SD2.x", "qwen": "Qwen-Image", "qwen21": "Qwen-Image 2.1"}.get(arch, arch)
    return MissingModelFile(
        f"{entry.name} holds only part of a {family} model; its {', '.join(parts)} must come from a {family} "
        f"diffusers folder (a folder with model_index.json) in the checkpoints folder "
        f"({Path(entry.path).parent if entry.folder_kind == 'checkpoint' else '<IMAGESMITH_HOME>/models/checkpoints'})"
        + (", or, ComfyUI's way, from separate files: a VAE in models/vae and the text encoders (CLIP-L"
           + (", CLIP-G" if arch == "sd3" else "") + ", T5) in models/text_encoders" if arch in ("flux", "sd3") else "")
        + (", or, ComfyUI's way, from separate files: qwen_image_vae in models/vae and the Qwen2.5-VL text encoder "
           "(qwen_2.5_vl_7b) in models/text_encoders" if arch == "qwen" else "")
        + ".")


# ================================================================================= pipelines
def load_pipeline(entry, *, torch_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers pipeline for a checkpoint entry (SD1/SD2/SDXL/SD3/FLUX; folder or single file)."""
    path = Path(entry.path)
    arch = entry.arch
    if entry.kind == "unsafe":
        refuse_pickle(path)
    if entry.kind != "checkpoint":
        raise UnsupportedModel(f"{entry.name} is a {entry.kind}, not a checkpoint")
    if arch not in PIPELINE_CLASS:
        raise UnsupportedModel(f"{entry.name}: architecture {arch!r} is not one imagesmith runs "
                               "(SD1, SD2, SDXL, SD3, FLUX, Qwen-Image, Qwen-Image 2.1)")
    if path.is_dir():
        from .house import is_house_folder, load_house_pipeline  # house-ldm: packaged MiniLM text encoder
        if is_house_folder(path):
            refuse_pickles_in(path)
            pipe = load_house_pipeline(path, torch_dtype, "cpu")
        else:
            pipe = _load_folder(entry, arch, torch_dtype)
    else:
        refuse_pickle(path)
        header = read_model_header(path)
        res = probe(path)
        if arch in ("flux", "sd3", "qwen", "qwen21") and "vae" not in res.components:
            pipe = _load_transformer_file(entry, arch, header, torch_dtype)
        elif "unet" in res.components and len(res.components) == 1:
            pipe = _load_denoiser_only_sd(entry, arch, header, torch_dtype)
        else:
            pipe = _load_single_file(entry, arch, header, res.components, torch_dtype)
    return _finish(pipe, device)


def _sd_kwargs(arch: str) -> dict:
    return {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None} if arch in ("sd1", "sd2") else {}


def _load_folder(entry, arch: str, torch_dtype):
    path = Path(entry.path)
    refuse_pickles_in(path)
    cls = _pipeline_cls(arch)
    common = dict(local_files_only=True, dtype=torch_dtype, use_safetensors=True, variant=_variant(path))
    if (path / "model_index.json").is_file():
        kwargs = _sd_kwargs(arch)
        index = _json(path / "model_index.json")
        if arch == "qwen" and index.get("_class_name") in QWEN_EDIT_CLASSES:  # they read a processor/ too
            import diffusers
            cls = getattr(diffusers, index["_class_name"])
        slot = T5_SLOT.get(arch)
        if slot and isinstance(index.get(slot), list) and index[slot][0] is not None:
            kwargs[slot] = resolve_t5_tokenizer(entry, arch)
        try:
            return cls.from_pretrained(str(path), **common, **kwargs)
        except (OSError, EnvironmentError) as exc:
            raise MissingModelFile(f"{entry.name}: the diffusers folder {path} is incomplete: "
                                   f"{str(exc).splitlines()[0][:300]}") from None
    # a lone denoiser folder (unet/ or transformer/ contents): the rest comes from a companion folder
    cfg = _json(path / "config.json")
    import diffusers
    model_cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if model_cls is None:
        raise UnsupportedModel(f"{entry.name}: config.json class {cfg.get('_class_name')!r} is not a diffusers model")
    model = model_cls.from_pretrained(str(path), **common)
    slot_name = "unet" if cfg.get("_class_name") == "UNet2DConditionModel" else "transformer"
    return _with_companion(entry, arch, {slot_name: model}, torch_dtype)


def load_text_encoder_state(module, state: dict[str, torch.Tensor], name: str) -> None:
    """A text encoder file's tensors into ``module`` (transformers' CLIP or T5), whatever prefix the file's names
    carry (ComfyUI's, A1111's, transformers'); T5's token embedding is tied to ``shared`` (files keep one). A file
    that lacks the module's tensors is a BadRequest naming it."""
    from ..core.errors import BadRequest
    wanted = set(module.state_dict())
    mapped = {}
    for k, v in state.items():
        for cand in (k, k.removeprefix("text_model."), "text_model." + k, k.removeprefix("transformer.")):
            if cand in wanted:
                mapped[cand] = v
                break
    if "encoder.embed_tokens.weight" in wanted and "encoder.embed_tokens.weight" not in mapped \
            and "shared.weight" in mapped:
        mapped["encoder.embed_tokens.weight"] = mapped["shared.weight"]
    missing = [k for k in wanted - set(mapped) if not k.endswith("position_ids")]
    if missing:
        raise BadRequest(f"text encoder {name}: {len(missing)} tensors missing (e.g. {missing[0]}); "
                         f"is it a {type(module).__name__}?")
    try:
        module.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise BadRequest(f"text encoder {name}: its tensors do not fit a {type(module).__name__} of this config: "
                         f"{str(exc).splitlines()[0][:200]}") from None


def _from_split_files(entry, arch: str, parts: dict[str, Any], torch_dtype):
    """A transformer-only file made whole from ComfyUI's split layout (``entry.split_files``): the VAE file, the
    text encoder files, each built from its own embedded config or the family's shipped one, and tokenizers (the
    CLIP ones ship with imagesmith; T5's spiece.model is the user's)."""
    import transformers

    from .registry import ModelEntry
    files = entry.split_files
    if arch == "qwen":
        return _qwen_from_split_files(entry, parts, torch_dtype)
    cls = _pipeline_cls(arch)
    kwargs = {**_sd_kwargs(arch), **parts}
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        folder = assemble_config_folder(Path(tmp), arch)
        index = _json(folder / "model_index.json")
        vae_path = Path(files["vae"])
        kwargs["vae"] = load_vae(ModelEntry(name=vae_path.stem, kind="vae", arch=arch, path=vae_path), torch_dtype)
        for role in [r for r in files if r.startswith("text_encoder")]:
            path = Path(files[role])
            model_cls = getattr(transformers, index[role][1])
            header = read_header(path)
            configs = embedded_configs(header) or {}
            cfg = configs.get(role) or configs.get("text_encoder") or _json(folder / role / "config.json")
            width = next((s[1] for k, s in header.shapes.items()
                          if k.endswith(("token_embedding.weight", "shared.weight", "embed_tokens.weight"))), None)
            expect = cfg.get("d_model") or cfg.get("hidden_size")
            if width is not None and expect is not None and width != expect:
                raise MissingModelFile(f"{path.name} is {width} wide, but the {arch} {role} it stands in for is "
                                       f"{expect}: use the family's own text encoder file, or a diffusers folder")
            module = model_cls(model_cls.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
            from safetensors.torch import load_file
            load_text_encoder_state(module, load_file(str(path)), path.name)
            kwargs[role] = module.to(torch_dtype).eval()
        for slot in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            spec = index.get(slot)
            if isinstance(spec, list) and spec[1] == "CLIPTokenizer":
                kwargs[slot] = transformers.CLIPTokenizer.from_pretrained(str(folder / slot))
        slot = T5_SLOT.get(arch)
        if slot:
            kwargs[slot] = resolve_t5_tokenizer(entry, arch)
        return cls(**kwargs)


def _read_state(path: Path, torch_dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in ``torch_dtype`` (fp8, and ComfyUI's scaled fp8, upcast)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "scaled_fp8" in state or any(k.endswith(".scale_weight") for k in state):
        return _unscale_fp8(state, torch_dtype)
    return {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}


def qwen_processor(tokenizer):
    """The Qwen2-VL processor Qwen-Image-Edit reads pictures with, at the standard settings (what the edit releases
    ship), over ``tokenizer``."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def load_qwen_vae_file(path: Path, torch_dtype, config: dict | None = None):
    """Qwen-Image's 3-D VAE from one file: ComfyUI's ``qwen_image_vae.safetensors`` keeps Wan 2.1's own names
    (mapped by diffusers' Wan converter: the modules are the same), or diffusers' names. Qwen-Image's own config
    (AutoencoderKLQwenImage's defaults) unless the file embeds one."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    state = {k.removeprefix("vae.").removeprefix("first_stage_model."): v for k, v in _read_state(path, torch_dtype).items()}
    if any(".residual." in k for k in state):
        state = convert_wan_vae_to_diffusers(state)
    cfg = config or (embedded_configs(read_header(path)) or {}).get("vae") or {}
    with init_empty_weights():
        vae = AutoencoderKLQwenImage.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{path.name}: not a Qwen-Image / Wan 2.1 VAE of this config: "
                               f"{str(exc).splitlines()[0][:200]}") from None
    return vae.to(torch_dtype).eval()


def load_qwen_text_encoder_file(path: Path, torch_dtype):
    """Qwen-Image's Qwen2.5-VL-7B text encoder from one file (ComfyUI's ``qwen_2.5_vl_7b*.safetensors``: the
    Hugging Face checkpoint's own names, ``model.*`` and ``visual.*``, which transformers 5 keeps under
    ``model.language_model.*`` and ``model.visual.*``; fp8 and scaled fp8 upcast). Its config is Qwen2.5-VL-7B's
    (shipped) unless the file embeds one; the output head, which the conditioning never reads and ComfyUI's files
    leave out, is tied to the token embedding instead of taking 1 GB."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = (embedded_configs(read_header(path)) or {}).get("text_encoder") or _json(
        CONFIGS_DIR / "qwen-image" / "text_encoder" / "config.json")
    config = Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    config.tie_word_embeddings = True
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = {}
    for k, v in _read_state(path, torch_dtype).items():
        if k.startswith("lm_head."):
            continue
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k.removeprefix("model.")
        state[k] = v
    wanted = {k for k in model.state_dict() if not k.startswith("lm_head.")}
    missing = sorted(wanted - set(state))
    if missing:
        raise UnsupportedModel(f"{path.name}: {len(missing)} Qwen2.5-VL tensors missing (e.g. {missing[0]}): is it "
                               "Qwen-Image's text encoder (qwen_2.5_vl_7b)?")
    try:
        model.load_state_dict({k: state[k] for k in wanted}, strict=False, assign=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{path.name}: its tensors do not fit Qwen2.5-VL-7B: "
                               f"{str(exc).splitlines()[0][:200]}") from None
    model.tie_weights()
    return model.to(torch_dtype).eval()


def _qwen_from_split_files(entry, parts: dict[str, Any], torch_dtype):
    """A Qwen-Image transformer file made whole from ComfyUI's split layout: the VAE (models/vae), the Qwen2.5-VL
    text encoder (models/text_encoders) and a Qwen2.5 tokenizer folder (ComfyUI's comfy/text_encoders/
    qwen25_tokenizer, or a copy in models/text_encoders/qwen25_tokenizer); Qwen-Image's scheduler settings."""
    import diffusers
    from transformers import Qwen2Tokenizer

    from .probe import QWEN_EDIT_NOTE, QWEN_EDIT_PLUS_NOTE
    from .registry import QWEN_TOKENIZER
    files = entry.split_files
    if "tokenizer" not in files:
        raise MissingModelFile(
            f"{entry.name}: Qwen-Image's text encoder needs the Qwen2.5 tokenizer (vocab.json and merges.txt), "
            f"which its file does not hold: put the folder in models/text_encoders/{QWEN_TOKENIZER}/ (a ComfyUI "
            f"install has it as comfy/text_encoders/{QWEN_TOKENIZER}/, found by itself when IMAGESMITH_MODEL_PATHS "
            "points at that ComfyUI's models/), or install the Qwen-Image diffusers folder")
    tokenizer = Qwen2Tokenizer.from_pretrained(str(files["tokenizer"]), local_files_only=True)
    kwargs = dict(parts)
    kwargs["vae"] = load_qwen_vae_file(Path(files["vae"]), torch_dtype)
    kwargs["text_encoder"] = load_qwen_text_encoder_file(Path(files["text_encoder"]), torch_dtype)
    kwargs["tokenizer"] = tokenizer
    kwargs["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        _json(CONFIGS_DIR / "qwen-image" / "scheduler" / "scheduler_config.json"))
    if QWEN_EDIT_NOTE not in entry.notes:
        return diffusers.QwenImagePipeline(**kwargs)
    kwargs["processor"] = qwen_processor(tokenizer)
    cls = diffusers.QwenImageEditPlusPipeline if QWEN_EDIT_PLUS_NOTE in entry.notes else diffusers.QwenImageEditPipeline
    return cls(**kwargs)


def _with_companion(entry, arch: str, parts: dict[str, Any], torch_dtype):
    companion = entry.companion
    if (companion is None or not (Path(companion) / "model_index.json").is_file()) and getattr(entry, "split_files",
                                                                                               None):
        return _from_split_files(entry, arch, parts, torch_dtype)
    if companion is None or not (Path(companion) / "model_index.json").is_file():
        raise _missing_companion(entry, arch, ["VAE", "text encoders", "tokenizers"])
    cls = _pipeline_cls(arch)
    kwargs = {**_sd_kwargs(arch), **parts}
    slot = T5_SLOT.get(arch)
    index = _json(Path(companion) / "model_index.json")
    if arch == "qwen":
        cls = _qwen_companion_class(entry, index, kwargs, Path(companion), torch_dtype)
    if slot and isinstance(index.get(slot), list) and index[slot][0] is not None and slot not in kwargs:
        kwargs[slot] = resolve_t5_tokenizer(entry, arch)
    refuse_pickles_in(Path(companion))
    try:
        return cls.from_pretrained(str(companion), local_files_only=True, dtype=torch_dtype,
                                   use_safetensors=True, variant=_variant(Path(companion)), **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise MissingModelFile(f"{entry.name}: the companion folder {companion} is incomplete: "
                               f"{str(exc).splitlines()[0][:300]}") from None


def _qwen_companion_class(entry, index: dict, kwargs: dict, companion: Path, torch_dtype):
    """The pipeline class for a Qwen-Image transformer file and its companion folder: an edit file (by its name,
    see the probe) runs as QwenImageEdit(Plus)Pipeline even beside a plain Qwen-Image folder, which then lends its
    tokenizer to a Qwen2-VL processor of the standard settings (what the edit releases ship)."""
    import diffusers
    from .probe import QWEN_EDIT_NOTE, QWEN_EDIT_PLUS_NOTE
    if QWEN_EDIT_NOTE not in entry.notes:
        return diffusers.QwenImagePipeline
    cls = diffusers.QwenImageEditPlusPipeline if QWEN_EDIT_PLUS_NOTE in entry.notes else \
        diffusers.QwenImageEditPipeline
    if not isinstance(index.get("processor"), list):
        from transformers import Qwen2Tokenizer
        kwargs["processor"] = qwen_processor(Qwen2Tokenizer.from_pretrained(str(companion / "tokenizer"),
                                                                            local_files_only=True))
    return cls


def _load_single_file(entry, arch: str, header, components: list[str], torch_dtype):
    """A full (or nearly full) SD1/SD2/SDXL single file through diffusers' from_single_file."""
    cls = _pipeline_cls(arch)
    if arch in ("flux", "sd3"):
        # all-in-one FLUX/SD3 files: the transformer from the file, the rest from a companion folder
        return _load_transformer_file(entry, arch, header, torch_dtype)
    refiner = arch == "sdxl" and "text_encoder" not in components and "text_encoder_2" in components
    needed = ["vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    extra: dict[str, Any] = dict(_sd_kwargs(arch))
    if refiner:  # sd_xl_refiner_1.0: OpenCLIP bigG is its only text encoder (no CLIP-L, none to borrow)
        import diffusers
        cls, needed = diffusers.StableDiffusionXLImg2ImgPipeline, ["vae", "text_encoder_2"]
        extra.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
    missing = [c for c in needed if c not in components]
    if missing:
        extra.update(_companion_parts(entry, arch, missing, torch_dtype))
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        cfg_dir = assemble_config_folder(Path(tmp), arch, header)
        return cls.from_single_file(str(entry.path), config=str(cfg_dir), local_files_only=True,
                                    dtype=torch_dtype, **extra)


def _companion_parts(entry, arch: str, names: list[str], torch_dtype) -> dict[str, Any]:
    companion = entry.companion
    if companion is None or not (Path(companion) / "model_index.json").is_file():
        raise _missing_companion(entry, arch, [n.replace("_", " ") for n in names])
    import diffusers
    import transformers
    index = _json(Path(companion) / "model_index.json")
    out = {}
    for name in names:
        lib, cls_name = index[name]
        mod = diffusers if lib == "diffusers" else transformers
        out[name] = getattr(mod, cls_name).from_pretrained(str(companion), subfolder=name, local_files_only=True,
                                                           dtype=torch_dtype, use_safetensors=True)
    return out


def _load_denoiser_only_sd(entry, arch: str, header, torch_dtype):
    """An SD1/SD2/SDXL file with only the UNet: UNet from the file, everything else from a companion."""
    from diffusers import UNet2DConditionModel
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        cfg_dir = assemble_config_folder(Path(tmp), arch, header)
        unet = UNet2DConditionModel.from_single_file(str(entry.path), config=str(cfg_dir), subfolder="unet",
                                                     local_files_only=True, dtype=torch_dtype)
    return _with_companion(entry, arch, {"unet": unet}, torch_dtype)


def read_model_header(path: Path):
    """The tensor table of a .safetensors or .gguf file (names, shapes, dtypes, metadata), weights unread; a
    damaged file is an UnsupportedModel naming it."""
    from .probe import read_model_header as read
    try:
        return read(path)
    except ValueError as e:
        raise UnsupportedModel(str(e)) from None


def _transformer_config(arch: str, header) -> dict:
    configs = embedded_configs(header) or {}
    cfg = configs.get("transformer")
    if cfg is None and arch == "qwen":
        return _qwen_transformer_config(header.shapes)
    if cfg is None and arch == "qwen21":
        return _qwen21_transformer_config(header.shapes)
    if cfg is None:
        with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
            shutil.copytree(_shipped_dir(arch, header) / "transformer", Path(tmp) / "transformer")
            if arch == "sd3":
                _patch_sd3_transformer(Path(tmp) / "transformer" / "config.json", header.shapes)
            cfg = _json(Path(tmp) / "transformer" / "config.json")
        if arch == "flux":
            cfg = _patch_flux_transformer(cfg, header.shapes)
    return cfg


def _qwen_transformer_config(shapes: dict[str, list[int]]) -> dict:
    """QwenImageTransformer2DModel's config read off a file's shapes (Qwen-Image: 60 blocks of 24 heads of 128,
    text width 3584). The rotary axes split a head's width (16/56/56 of 128); a head of another width needs the
    file's embedded config."""
    import re
    k = {key.removeprefix("model.diffusion_model."): v for key, v in shapes.items()}
    try:
        inner, in_channels = k["img_in.weight"]
        head = k["transformer_blocks.0.attn.norm_q.weight"][0]
        text = k["txt_in.weight"][1]
        out = k["proj_out.weight"][0] // 4
    except (KeyError, ValueError):
        raise UnsupportedModel("a Qwen-Image transformer file without img_in/txt_in/proj_out or its q-norm: "
                               "not one imagesmith can size") from None
    if head != 128:
        raise UnsupportedModel(f"a Qwen-Image transformer with {head}-wide heads: its rotary axes cannot be told "
                               "from its shapes (Qwen-Image's are 128 wide); give it a diffusers transformer/ folder")
    blocks = {int(m.group(1)) for key in k if (m := re.match(r"transformer_blocks\.(\d+)\.", key))}
    return {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": in_channels,
            "out_channels": out, "num_layers": max(blocks) + 1, "attention_head_dim": head,
            "num_attention_heads": inner // head, "joint_attention_dim": text, "guidance_embeds": False,
            "axes_dims_rope": [16, 56, 56]}


def _qwen21_transformer_config(shapes: dict[str, list[int]]) -> dict:
    """QwenImage21Transformer2DModel's config read off a file's shapes: its single-stream blocks (no patching:
    one token a latent pixel), the feed-forward's width, the text width. As for Qwen-Image, the rotary axes
    (16/56/56) are known only for 128-wide heads."""
    import re
    k = {key.removeprefix("model.diffusion_model."): v for key, v in shapes.items()}
    try:
        inner, in_channels = k["img_in.weight"]
        head = k["transformer_blocks.0.attn.norm_q.weight"][0]
        text = k["txt_in.in_layer.weight"][1]
        out = k["proj_out.weight"][0]
        mlp = k["transformer_blocks.0.img_mlp.proj.weight"][0]
    except (KeyError, ValueError):
        raise UnsupportedModel("a Qwen-Image 2.1 transformer file without img_in/txt_in/proj_out, its q-norm or its "
                               "feed-forward: not one imagesmith can size") from None
    if head != 128:
        raise UnsupportedModel(f"a Qwen-Image 2.1 transformer with {head}-wide heads: its rotary axes cannot be told "
                               "from its shapes (Qwen-Image 2.1's are 128 wide); give it a diffusers transformer/ "
                               "folder")
    blocks = {int(m.group(1)) for key in k if (m := re.match(r"transformer_blocks\.(\d+)\.", key))}
    return {"_class_name": "QwenImage21Transformer2DModel", "patch_size": 1, "in_channels": in_channels,
            "out_channels": out, "num_layers": max(blocks) + 1, "attention_head_dim": head,
            "num_attention_heads": inner // head, "context_in_dim": text, "mlp_ratio": mlp // inner,
            "axes_dims_rope": [16, 56, 56], "causal_condition": True}


def _patch_flux_transformer(cfg: dict, shapes: dict[str, list[int]]) -> dict:
    """FLUX.1's shipped config fitted to a file's shapes: Fill reads 384 features per token (Kontext, dev and
    schnell 64), and a pruned file may have other block counts."""
    import re
    cfg = dict(cfg)
    k = {key.removeprefix("model.diffusion_model."): v for key, v in shapes.items()}
    img_in = k.get("img_in.weight") or k.get("x_embedder.weight")
    out = k.get("final_layer.linear.weight") or k.get("proj_out.weight")
    if img_in and len(img_in) == 2:
        cfg["in_channels"] = img_in[1]
    if out and len(out) == 2 and out[0] != cfg.get("in_channels"):
        cfg["out_channels"] = out[0]
    doubles = {int(m.group(1)) for key in k if (m := re.match(r"(?:double_blocks|transformer_blocks)\.(\d+)\.", key))}
    singles = {int(m.group(1)) for key in k if (m := re.match(r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.", key))}
    if doubles:
        cfg["num_layers"] = max(doubles) + 1
    if singles:
        cfg["num_single_layers"] = max(singles) + 1
    return cfg


def _unscale_fp8(state: dict[str, torch.Tensor], torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" files: each fp8 weight times its layer's ``scale_weight`` (input scales and the
    ``scaled_fp8`` marker are for fp8 compute, dropped here: the weights are upcast on load)."""
    out = {k: v for k, v in state.items() if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))}
    for k, scale in state.items():
        if k.endswith(".scale_weight"):
            base = k[: -len(".scale_weight")] + ".weight"
            if base not in out:
                raise UnsupportedModel(f"a scale for {base}, which the file does not hold")
            out[base] = (out[base].float() * scale.float()).to(torch_dtype)
    return out


def _load_gguf_transformer(path: Path, arch: str, header, cfg: dict, torch_dtype) -> Any:
    """A GGUF transformer through diffusers' GGUF support: the linear layers keep their quantised blocks and
    dequantise them at each call, in ``torch_dtype``."""
    from diffusers import GGUFQuantizationConfig

    from .gguf_files import unsupported_types
    bad = unsupported_types(header)
    if bad:
        raise UnsupportedModel(f"{path.name}: quantisation type {', '.join(bad)} is not one diffusers can "
                               "dequantise (it reads Q2_K-Q6_K, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, IQ4_NL/IQ4_XS, BF16)")
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    from .convert import flux_to_diffusers
    cls = _transformer_cls(arch)
    # the tensors keep their quantised blocks (GGUFParameter); BFL names are mapped here, for any width (diffusers'
    # own mapping assumes FLUX.1's 3072), by row operations that the blocks survive
    state = {k.removeprefix("model.diffusion_model."): v for k, v in load_gguf_checkpoint(str(path)).items()}
    if arch == "flux" and any(k.startswith("double_blocks.") for k in state):
        state = flux_to_diffusers(state, cfg)
    elif arch == "sd3" and any(k.startswith("joint_blocks.") for k in state):
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
        state = convert_sd3_transformer_checkpoint_to_diffusers(state)
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        _write_config(Path(tmp), "transformer", cls.__name__, cfg)
        try:
            model = cls.from_single_file(state, config=tmp, subfolder="transformer", local_files_only=True,
                                         quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype),
                                         torch_dtype=torch_dtype)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UnsupportedModel(f"{path.name}: its tensors do not fit a {arch} transformer config: "
                                   f"{str(exc).splitlines()[0][:300]}") from None
    return model.eval()


def _transformer_cls(arch: str):
    import diffusers
    return {"flux": diffusers.FluxTransformer2DModel, "qwen": diffusers.QwenImageTransformer2DModel,
            "qwen21": diffusers.QwenImage21Transformer2DModel}.get(arch, diffusers.SD3Transformer2DModel)


def load_transformer_file(path: Path, arch: str, header, torch_dtype, *, keep_4bit: bool = True) -> Any:
    """The FLUX or SD3 transformer of a single file (BFL/original or diffusers layout; safetensors in any float
    precision incl. fp8 and ComfyUI's scaled fp8, or GGUF), built from the file's embedded config, else the
    shipped one patched to the file's shapes."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    from .convert import flux_to_diffusers
    from . import bnb4
    cfg = _transformer_config(arch, header)
    if path.suffix.lower() == ".gguf":
        return _load_gguf_transformer(path, arch, header, cfg, torch_dtype)
    cls = _transformer_cls(arch)
    drop = ("vae.", "first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
    state = {}
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if not k.startswith(drop)]
        four_bit = bnb4.quantised_weights(keys)  # bitsandbytes NF4/FP4 (Forge's files): dequantised here, and
        quantisation = bnb4.file_quantisation(f.get_tensor, keys)  # packed again once in diffusers' layout
        aux = {a for w in four_bit for a in bnb4.aux_keys(w)}
        for k, t in bnb4.dequantize_state(f.get_tensor, keys, torch_dtype).items():
            state[k.removeprefix("model.diffusion_model.").removeprefix("transformer.")] = t
        for k in keys:
            if k in aux or k in four_bit:
                continue
            # one owned, freshly allocated copy per tensor, in the target dtype: tensors at odd offsets
            # of the file change CPU kernels' rounding, and fp8/bf16 files become the requested dtype
            t = f.get_tensor(k)
            state[k.removeprefix("model.diffusion_model.").removeprefix("transformer.")] = (
                t.to(torch_dtype, copy=True) if t.is_floating_point() else t.clone())
    if "scaled_fp8" in state or any(k.endswith(".scale_weight") for k in state):
        try:
            state = _unscale_fp8(state, torch_dtype)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{path.name}: {e}") from None
    if arch == "flux" and any(k.startswith("double_blocks.") for k in state):
        state = flux_to_diffusers(state, cfg)
    elif arch == "sd3" and any(k.startswith("joint_blocks.") for k in state):
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
        state = convert_sd3_transformer_checkpoint_to_diffusers(state)
    with init_empty_weights():
        model = cls.from_config({k: v for k, v in cfg.items()})
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{path.name}: its tensors do not fit a {arch} transformer config: "
                               f"{str(exc).splitlines()[0][:300]}") from None
    model = model.to(torch_dtype).eval()
    if quantisation is not None and keep_4bit:  # the 4-bit layers stay 4-bit in memory (dequantised per call)
        bnb4.pack_linears(model, *quantisation)
    return model


def _load_transformer_file(entry, arch: str, header, torch_dtype):
    model = load_transformer_file(Path(entry.path), arch, header, torch_dtype)
    parts: dict[str, Any] = {"transformer": model}
    if arch in ("qwen", "qwen21"):  # no shipped configs: the scheduler, VAE, text encoder and tokenizer are the
        # companion's
        return _with_companion(entry, arch, parts, torch_dtype)
    configs = embedded_configs(header) or {}
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched_cfg = configs.get("scheduler") or _json(_shipped_dir(arch, header) / "scheduler" / "scheduler_config.json")
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
    return _with_companion(entry, arch, parts, torch_dtype)


# ================================================================================= components
def _single_component_config(entry, header, component: str, shipped: Path) -> dict:
    configs = embedded_configs(header) or {}
    if component in configs:
        return configs[component]
    return _json(shipped)


def load_vae(entry, torch_dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a VAE folder, a checkpoint folder's vae/, or a single file (LDM or
    diffusers layout)."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage
    path = Path(entry.path)
    if entry.kind == "unsafe":
        refuse_pickle(path)
    if path.is_dir():
        refuse_pickles_in(path)
        sub = "vae" if (path / "model_index.json").is_file() else None
        cls = AutoencoderKLQwenImage if _json(path / (sub or "") / "config.json").get("_class_name") == \
            "AutoencoderKLQwenImage" else AutoencoderKL
        return cls.from_pretrained(str(path), subfolder=sub, local_files_only=True, dtype=torch_dtype,
                                   use_safetensors=True).eval()
    refuse_pickle(path)
    if entry.arch == "qwen":  # Qwen-Image's (Wan 2.1's) 3-D VAE
        return load_qwen_vae_file(path, torch_dtype)
    header = read_header(path)
    arch = entry.arch
    if arch not in ARCH_CONFIG:
        lat = next((s[1] for k, s in header.shapes.items() if k.endswith("decoder.conv_in.weight")), 4)
        arch = "flux" if lat == 16 else "sd1"
    cfg = _single_component_config(entry, header, "vae", _shipped_dir(arch) / "vae" / "config.json")
    keys = list(header.shapes)
    if any(".down_blocks." in k or k.startswith("encoder.down_blocks.") for k in keys):
        from safetensors.torch import load_file
        state = {k.removeprefix("vae."): v for k, v in load_file(str(path)).items()}
        model = AutoencoderKL.from_config(cfg)
        model.load_state_dict(state, strict=True)
        return model.to(torch_dtype).eval()
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        return AutoencoderKL.from_single_file(str(path), config=tmp, local_files_only=True,
                                              dtype=torch_dtype).eval()


def qwen_controlnet_config(shapes: dict[str, list[int]]) -> dict:
    """QwenImageControlNetModel's config from its tensors' shapes (InstantX's files as ComfyUI keeps them have none):
    blocks, width (heads of 128), text width, and the inpainting variant's extra input channels."""
    inner, in_channels = shapes["img_in.weight"]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("controlnet_blocks."))
    head = shapes.get("transformer_blocks.0.attn.norm_q.weight", [128])[0]
    return {"_class_name": "QwenImageControlNetModel", "patch_size": 2, "in_channels": in_channels,
            "out_channels": 16, "num_layers": layers, "attention_head_dim": head, "num_attention_heads": inner // head,
            "joint_attention_dim": shapes["txt_in.weight"][1], "axes_dims_rope": [16, 56, 56],
            "extra_condition_channels": shapes["controlnet_x_embedder.weight"][1] - in_channels}


def load_controlnet(entry, torch_dtype: torch.dtype = torch.float32, config: dict | None = None):
    """A ControlNetModel (SD1/SD2/SDXL) or FluxControlNetModel from a diffusers folder or a single file (original
    or diffusers layout; a FLUX single file carries its config, embedded or as config.json beside it). ``config``:
    an SD ControlNet's diffusers config when the file has none embedded (a converted .pth's config.json)."""
    from diffusers import (ControlNetModel, ControlNetUnionModel, FluxControlNetModel, QwenImageControlNetModel,
                           SD3ControlNetModel)
    dit = {"flux": FluxControlNetModel, "sd3": SD3ControlNetModel, "qwen": QwenImageControlNetModel}
    path = Path(entry.path)
    if entry.kind == "unsafe":
        refuse_pickle(path)
    if path.is_dir():
        refuse_pickles_in(path)
        cls_name = _json(path / "config.json").get("_class_name") if (path / "config.json").is_file() else None
        cls = dit.get(entry.arch) or (
            ControlNetUnionModel if cls_name == "ControlNetUnionModel" else ControlNetModel)
        weights = sorted(path.glob("*.safetensors"))
        if not (path / "diffusion_pytorch_model.safetensors").is_file() and len(weights) >= 1:
            # a release folder whose weights file has another name (xinsir's diffusion_pytorch_model_promax...)
            from safetensors.torch import load_file
            chosen = next((w for w in weights if "promax" in w.name.lower()), weights[0])
            model = cls.from_config(_json(path / "config.json"))
            try:
                model.load_state_dict(load_file(str(chosen)), strict=True)
            except RuntimeError as exc:
                raise UnsupportedModel(f"{chosen.name}: does not fit {path.name}/config.json: "
                                       f"{str(exc).splitlines()[0][:200]}") from None
            return model.to(torch_dtype).eval()
        return cls.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype, use_safetensors=True).eval()
    refuse_pickle(path)
    header = read_header(path)
    union = "task_embedding" in header.shapes  # xinsir's SDXL Union / ProMax (diffusers' ControlNetUnionModel)
    if entry.arch in ("flux", "sd3", "qwen") or union:
        cls = dit.get(entry.arch, ControlNetUnionModel)
        configs = embedded_configs(header) or {}
        cfg = configs.get("controlnet") or (_json(path.with_name("config.json"))
                                            if path.with_name("config.json").is_file() else None)
        if cfg is None and entry.arch == "qwen":  # ComfyUI's single files carry no config: read it off the shapes
            cfg = qwen_controlnet_config(header.shapes)
        if cfg is None:
            raise MissingModelFile(f"{path.name}: a {entry.arch.upper() if entry.arch in ('flux', 'sd3') else 'union'} ControlNet file "
                                   "needs its config.json (from the same release) beside it, or the release's folder")
        from safetensors.torch import load_file
        model = cls.from_config(cfg)
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as exc:
            raise UnsupportedModel(f"{path.name}: does not fit its config: {str(exc).splitlines()[0][:200]}") from None
        return model.to(torch_dtype).eval()
    shipped = CONFIGS_DIR / ("controlnet-sdxl" if entry.arch == "sdxl" else "controlnet-sd15") / "config.json"
    if entry.arch == "sd2":
        cfg = _json(shipped)
        cfg.update({k: v for k, v in _json(CONFIGS_DIR / "sd2" / "unet" / "config.json").items()
                    if k in ("cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention")})
    else:
        cfg = config or _single_component_config(entry, header, "controlnet", shipped)
    if any(k.startswith("controlnet_down_blocks.") for k in header.shapes):
        from safetensors.torch import load_file
        model = ControlNetModel.from_config(cfg)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.to(torch_dtype).eval()
    with tempfile.TemporaryDirectory(prefix="imagesmith-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        return ControlNetModel.from_single_file(str(path), config=tmp, local_files_only=True,
                                                dtype=torch_dtype).eval()
