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

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import BadRequest, NotFound
from ..core.settings import Settings

HOUSE_CLIP = "house-clip"
CLIP_FOLDER = "clip"  # $IMAGESMITH_HOME/models/clip/<name>/


def with_article(label: str) -> str:
    """'apple' -> 'an apple'; labels that already start with an article or a number are kept."""
    low = label.strip().lower()
    if not low or low.split()[0] in {"a", "an", "the", "some"} or low[0].isdigit():
        return label
    return ("an " if low[0] in "aeiou" else "a ") + label


class ClipScoring:
    """Scoring on top of ``encode_images``, ``encode_texts`` and ``scale``, shared by every backbone."""

    name: str = "clip"

    @staticmethod
    def _in_batches(items, batch_size: int, features, dim: int) -> torch.Tensor:
        """``features(batch)`` (unnormalised projections) over ``items`` in batches -> [N, dim] L2-normalised,
        float32, on the CPU: what every backbone's ``encode_images`` / ``encode_texts`` returns."""
        out = [F.normalize(features(list(items[i:i + batch_size])).float(), dim=-1).cpu()
               for i in range(0, len(items), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dim)

    def encode_images(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def scale(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Sequence, texts: Sequence[str] | str, *, pairwise: bool = False) -> torch.Tensor:
        """Cosine similarities (CLIP-score style; multiply by 100 and clip at 0 for the paper's CLIPScore):
        ``[N_images, N_texts]``, or with ``pairwise=True`` the ``[N]`` similarities of image i and text i."""
        img, txt = self.encode_images(images), self.encode_texts(texts)
        if pairwise:
            if len(img) != len(txt):
                raise ValueError(f"pairwise score needs as many texts as images ({len(img)} != {len(txt)})")
            return (img * txt).sum(-1)
        return img @ txt.t()

    @torch.no_grad()
    def classify(self, image, labels: Sequence[str], template: str = "a photo of {}", top_k: int = 5,
                 article: bool = True) -> list[tuple[str, float]]:
        """Zero-shot classification: the ``top_k`` labels with their softmax probabilities (over all labels,
        at the learnt logit scale). Each label goes into ``template``, with 'a'/'an' put before it when
        ``article`` and it has none ('apple' -> 'a photo of an apple')."""
        return self.classify_many([image], labels, template, top_k, article)[0]

    @torch.no_grad()
    def classify_many(self, images: Sequence, labels: Sequence[str], template: str = "a photo of {}",
                      top_k: int = 5, article: bool = True) -> list[list[tuple[str, float]]]:
        """:meth:`classify` for each of ``images``, the label prompts encoded once."""
        if not labels:
            return [[] for _ in images]
        prompts = [template.format(with_article(lbl) if article else lbl) for lbl in labels]
        probs = (float(self.scale()) * self.score(list(images), prompts)).softmax(-1)
        top = probs.topk(min(top_k, len(labels)), dim=-1)
        return [[(labels[i], float(p)) for p, i in zip(vals, idx)]
                for vals, idx in zip(top.values.tolist(), top.indices.tolist())]

    @torch.no_grad()
    def retrieve(self, image, captions: Sequence[str], top_k: int | None = None) -> list[tuple[int, str, float]]:
        """Captions ranked for ``image``: ``(index, caption, cosine similarity)``, best first."""
        sims = self.score([image], list(captions))[0]
        order = sims.argsort(descending=True).tolist()[: top_k or len(captions)]
        return [(i, captions[i], float(sims[i])) for i in order]


def is_transformers_clip(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


class TransformersClip(ClipScoring):
    """A local transformers ``CLIPModel`` folder behind house-clip's interface."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

        from .loaders import CLIP_TOKENIZER_DIR, _refuse_pickles_in
        folder = Path(folder)
        if not is_transformers_clip(folder):
            raise BadRequest(f"{folder} is not a transformers CLIP folder (config.json with model_type 'clip')")
        _refuse_pickles_in(folder)
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


def clip_folders(settings: Settings) -> dict[str, Path]:
    """Transformers CLIP folders the user put under ``models/clip/`` (home first, then extra model paths)."""
    found: dict[str, Path] = {}
    for root in settings.model_dirs(CLIP_FOLDER):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and d.name not in found and is_transformers_clip(d):
                    found[d.name] = d
    return found


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
