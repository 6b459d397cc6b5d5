"""Text encoders from separate files, as ComfyUI's CLIPLoader / DualCLIPLoader / TripleCLIPLoader take them
(``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` in ``models/text_encoders`` or
``models/clip``).

Each file is matched to its role by its tensors (T5 by ``encoder.block.*``, CLIP-L or CLIP-G by its width), built
with the config of that role from a diffusers folder of the same architecture (which also gives the tokenizers),
loaded once into the engine's model cache, and used through a pipeline view that shares every other module: the
cached checkpoint is never changed."""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.errors import BadRequest, ModelNotFound
from ...models.loaders import load_text_encoder_state
from ...models.registry import ModelEntry, text_encoder_files  # noqa: F401  (nodes import it from here)

TYPES = {"stable_diffusion": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "qwen_image": "qwen"}
"""ComfyUI's CLIP loader ``type`` -> imagesmith's arch"""
ROLES = {"sd1": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
         "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "flux": ("text_encoder", "text_encoder_2")}


def companion_for(registry, arch: str) -> ModelEntry:
    """A diffusers folder of `arch`: its tokenizers and text encoder configs."""
    for e in registry.list("checkpoint"):
        if e.arch == arch and e.format == "diffusers" and (Path(e.path) / "model_index.json").is_file():
            return e
    raise ModelNotFound(f"the {arch} text encoders need a diffusers {arch} folder in models/checkpoints for their "
                        f"tokenizers and configs (none is installed)")


def load_encoders(engine, entry: ModelEntry, arch: str, files: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """role -> module for the given files, each loaded once (engine cache, keyed by file and time)."""
    from safetensors import safe_open

    known = text_encoder_files(engine.settings)
    pipe = engine.pipeline(entry).value
    roles = ROLES[arch]
    out: dict[str, torch.nn.Module] = {}
    for name in files:
        path = known.get(name)
        if path is None:
            raise ModelNotFound(f"no text encoder file {name!r} in models/text_encoders or models/clip")
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            width = next((int(f.get_slice(k).get_shape()[1]) for k in keys if k.endswith("token_embedding.weight")),
                         None)
        role = None
        if any(k.startswith("encoder.block.") or k == "shared.weight" for k in keys):  # T5
            role = next((r for r in roles if "T5" in type(getattr(pipe, r, None)).__name__), None)
        else:
            for r in roles:
                module = getattr(pipe, r, None)
                if module is not None and "CLIP" in type(module).__name__ and \
                        module.config.hidden_size == width and r not in out:
                    role = r
                    break
        if role is None or role in out:
            raise BadRequest(f"text encoder {name!r} does not fit a {arch} model (its roles: {', '.join(roles)})")
        template = getattr(pipe, role)
        stamp = path.stat().st_mtime_ns

        def loader(path=path, template=template):
            from safetensors.torch import load_file
            module = type(template)(template.config)
            load_text_encoder_state(module, load_file(str(path)), path.name)
            return module.to(engine.device, engine.dtype).eval()
        out[role] = engine.cache.get(("text_encoder_file", str(path), stamp, str(engine.dtype)), loader,
                                     device=engine.device).value
    missing = [r for r in roles if r not in out]
    if missing:
        raise BadRequest(f"a {arch} CLIP needs {len(roles)} text encoders ({', '.join(roles)}); "
                         f"{', '.join(files)} leave {', '.join(missing)} out")
    return out


def pipeline_view(pipe, encoders: dict[str, torch.nn.Module]):
    """The pipeline with other text encoders: a new pipeline object over the same modules (nothing copied)."""
    return type(pipe)(**{**pipe.components, **encoders})


def qwen_tokenizer_dir(engine) -> Path:
    """A Qwen2.5 tokenizer folder: a Qwen-Image diffusers folder's tokenizer/, else ComfyUI's qwen25_tokenizer
    (models/text_encoders/, or the ComfyUI install the model paths point into)."""
    from ...models.registry import qwen_tokenizer_dirs
    for e in engine.registry.list("checkpoint"):
        d = Path(e.path) / "tokenizer"
        if e.arch == "qwen" and (d / "vocab.json").is_file():
            return d
    for d in qwen_tokenizer_dirs(engine.settings):
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d
    raise ModelNotFound("the qwen_image CLIP needs the Qwen2.5 tokenizer (vocab.json, merges.txt): put ComfyUI's "
                        "comfy/text_encoders/qwen25_tokenizer/ folder in models/text_encoders/, or install a "
                        "Qwen-Image diffusers folder")


def qwen_text_pipeline(engine, name: str, cls_name: str = "QwenImagePipeline"):
    """An encode-only Qwen-Image pipeline (diffusers' class ``cls_name``, for its prompt templates) over the
    Qwen2.5-VL file ``name`` of models/text_encoders (loaded once into the engine's cache) and a tokenizer
    folder; Edit pipelines get a Qwen2-VL processor of the standard settings for the pictures."""
    import diffusers
    from transformers import Qwen2Tokenizer

    from ...models.loaders import load_qwen_text_encoder_file, qwen_processor
    path = text_encoder_files(engine.settings).get(name)
    if path is None:
        raise ModelNotFound(f"no text encoder file {name!r} in models/text_encoders or models/clip")
    stamp = path.stat().st_mtime_ns
    encoder = engine.cache.get(("text_encoder_file", str(path), stamp, str(engine.dtype)),
                               lambda: load_qwen_text_encoder_file(path, engine.dtype).to(engine.device),
                               device=engine.device).value
    folder = qwen_tokenizer_dir(engine)  # read once (Qwen's vocabulary is 150k entries), then from the cache
    tokenizer = engine.cache.get(("qwen_tokenizer", str(folder)), lambda: Qwen2Tokenizer.from_pretrained(
        str(folder), local_files_only=True)).value
    parts = dict(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)
    if cls_name != "QwenImagePipeline":
        parts["processor"] = qwen_processor(tokenizer)
    return getattr(diffusers, cls_name)(**parts)
