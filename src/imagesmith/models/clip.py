"""One interface for every CLIP-style scorer imagesmith uses: house-clip (shipped) or a user's transformers CLIP
(``openai/clip-vit-base-patch32``, ``laion/CLIP-ViT-H-14``, ... downloaded by the user, as safetensors).

Both offer ``encode_images`` / ``encode_texts`` (L2-normalised float32 on the CPU), ``scale()`` (the learnt logit
scale), ``score`` (cosine similarities), ``classify`` (zero-shot) and ``retrieve`` (captions ranked), so zero-shot
``classify``, gates, ``describe``, the eval report and the house-ldm eval run unchanged on either.

Where a CLIP is named (``--clip NAME`` on the CLI, ``clip`` in a request), :func:`load_clip` resolves it:

- ``house-clip`` (or nothing): the shipped house model;
- a name registered by ``imagesmith models list --kind clip``: a transformers CLIP folder under
  ``$IMAGESMITH_HOME/models/clip/NAME`` (``config.json`` with ``model_type: clip`` plus ``*.safetensors``; its
  tokenizer and image-processor files beside them, or the shipped CLIP tokenizer and CLIP's standard preprocessing
  where they are missing);
- a path to such a folder.

Weights are read with ``use_safetensors=True`` and ``local_files_only=True``: nothing is downloaded, and a
folder holding only pickle weights (``pytorch_model.bin``) is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import BadRequest, NotFound
from ..core.settings import Settings
from .house import CLIP_TOKENIZER_DIR
from .probe import refuse_pickles_in
from .registry import CLIP_FOLDER, clip_folders, is_transformers_clip
from .scoring import ClipScoring, with_article

HOUSE_CLIP = "house-clip"


class TransformersClip(ClipScoring):
    """A local transformers ``CLIPModel`` folder behind house-clip's interface."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

        folder = Path(folder)
        if not is_transformers_clip(folder):
            raise BadRequest(f"{folder} is not a transformers CLIP folder (config.json with model_type 'clip')")
        refuse_pickles_in(folder)
        if not any(folder.glob("*.safetensors")):
            raise NotFound(f"{folder} holds no .safetensors weights")
        self.folder = folder
        self.name = folder.name
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        self.model.eval().requires_grad_(False).to(device)
        tok_dir = folder if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file() \
            else CLIP_TOKENIZER_DIR
        self.tokenizer = CLIPTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)
        size = int(self.model.config.vision_config.image_size)
        if (folder / "preprocessor_config.json").is_file():
            self.image_processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:  # CLIP's standard preprocessing at the tower's own size
            self.image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                      crop_size={"height": size, "width": size})
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.embed_dim = int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    @torch.no_grad()
    def encode_images(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        def features(batch):
            pix = self.image_processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")
            return _features(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device)))
        return self._in_batches(images if isinstance(images, (list, tuple)) else [images], batch_size, features,
                                self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> torch.Tensor:
        def features(batch):
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            return _features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                          attention_mask=enc["attention_mask"]))
        return self._in_batches([texts] if isinstance(texts, str) else list(texts), batch_size, features,
                                self.embed_dim)


def _features(x) -> torch.Tensor:
    """transformers >= 5 may return a model output object from get_*_features; older ones a tensor."""
    if isinstance(x, torch.Tensor):
        return x.float()
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(x, key, None)
        if isinstance(v, torch.Tensor):
            return v.float()
    raise TypeError(f"unexpected CLIP feature output {type(x).__name__}")


def load_clip(name: str | Path | None = None, *, settings: Settings | None = None,
              device: str | torch.device = "cpu") -> ClipScoring:
    """house-clip (``None`` or ``'house-clip'``), a registered transformers CLIP by name, or a CLIP folder."""
    from .house_clip import load_house_clip
    if name is None or str(name) == HOUSE_CLIP:
        return load_house_clip(device=device)
    settings = settings or Settings.from_env()
    known = clip_folders(settings)
    if str(name) in known:
        return TransformersClip(known[str(name)], device=device)
    path = Path(name).expanduser()
    if path.is_dir() and is_transformers_clip(path):
        return TransformersClip(path, device=device)
    if path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return load_house_clip(path, device=device)  # another house-clip export
    names = ", ".join([HOUSE_CLIP, *known]) if known else HOUSE_CLIP
    raise NotFound(f"no CLIP named {str(name)!r}; known: {names} (put a transformers CLIP folder of safetensors "
                   f"under {settings.models_dir / CLIP_FOLDER}/NAME)")


def clip_name(clip) -> str:
    return getattr(clip, "name", HOUSE_CLIP) or HOUSE_CLIP


__all__ = ["ClipScoring", "TransformersClip", "load_clip", "clip_folders", "clip_name", "with_article"]
