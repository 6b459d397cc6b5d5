"""Captions for training images with imagesmith's own models: house-clip names the object (zero-shot over its
label vocabulary, ``labels.json`` beside its weights, or labels you give) and house-cutout separates it from the
background, whose mean colour is named from the house backdrop palette: ``a teapot on a pale blue backdrop``.

It describes what the house models know (single objects on studio backdrops); for other photos the object
word is only the nearest of those labels, so read the captions before training on them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Caption:
    text: str
    object: str
    object_score: float
    backdrop: str


class Captioner:
    def __init__(self, labels: Sequence[str] | None = None, clip=None, segmenter=None):
        from ..models.house_clip import default_house_clip_dir, load_house_clip
        from ..models.segment import resolve_segmenter
        self.clip = clip or load_house_clip()
        if labels is None:
            path = default_house_clip_dir() / "labels.json"
            labels = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        if not labels:
            raise ValueError("no labels: give some (--labels) or ship labels.json with house-clip")
        self.labels = list(labels)
        self.segmenter = segmenter or resolve_segmenter(None)
        from ..train.house_data import with_article
        self._article = with_article
        self._label_embeds = self.clip.encode_texts([f"a photo of {with_article(n)}" for n in self.labels])

    def backdrop_colour(self, image: Image.Image) -> str:
        from ..train.backdrops import BACKDROP_COLOURS
        rgb = np.asarray(image.convert("RGB"), np.float32)
        alpha = np.asarray(self.segmenter.predict(image.convert("RGB")), np.float32)
        if alpha.max() > 1.0:
            alpha = alpha / 255.0
        weight = 1.0 - alpha
        if weight.sum() < 1:
            weight = np.ones_like(weight)
        mean = (rgb * weight[..., None]).sum((0, 1)) / weight.sum()
        best = min(BACKDROP_COLOURS, key=lambda c: float(((np.array(c.rgb) - mean) ** 2).sum()))
        return best.name

    def __call__(self, image: Image.Image) -> Caption:
        import torch
        emb = self.clip.encode_images([image.convert("RGB")])
        sims = (emb @ self._label_embeds.t())[0]
        k = int(torch.argmax(sims))
        colour = self.backdrop_colour(image)
        name = self.labels[k]
        return Caption(f"{self._article(name)} on a {colour} backdrop", name, float(sims[k]), colour)


def caption_folder(folder: str | Path, *, overwrite: bool = False, trigger_word: str | None = None,
                   labels: Sequence[str] | None = None, progress: bool = True) -> list[dict]:
    """Write ``<image>.txt`` beside each image of ``folder`` (recursive) that has none (all with
    ``overwrite``); returns one record per image: file, caption, written."""
    from tqdm.auto import tqdm

    from ..train.lora_data import IMAGE_EXTS, DatasetError
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise DatasetError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    todo = [p for p in images if overwrite or not p.with_suffix(".txt").is_file()]
    records = [{"file": str(p), "caption": p.with_suffix(".txt").read_text(encoding="utf-8").strip(), "written": False}
               for p in images if p not in todo]
    if todo:
        cap = Captioner(labels)
        for p in tqdm(todo, desc="caption", unit="image", disable=not progress):
            try:
                with Image.open(p) as im:
                    c = cap(im.convert("RGB"))
            except (OSError, ValueError) as exc:
                records.append({"file": str(p), "error": str(exc).splitlines()[0][:120], "written": False})
                continue
            text = f"{trigger_word}, {c.text}" if trigger_word else c.text
            p.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            records.append({"file": str(p), "caption": text, "object_score": round(c.object_score, 4),
                            "written": True})
    return sorted(records, key=lambda r: r["file"])


def describe(image: Image.Image, *, top_k: int = 5, captioner: Captioner | None = None) -> dict:
    """``imagesmith describe``, offline: a caption usable as a prompt (house-clip's object + the backdrop colour
    named from the house palette), the top house-clip labels with their probabilities as tags, the dominant
    colours (hex, share), tone and brightness measured on the pixels."""
    import torch

    from .analyze import brightness, dominant_colors, tone
    cap = captioner or Captioner()
    rgb = image.convert("RGB")
    c = cap(rgb)
    emb = cap.clip.encode_images([rgb])
    probs = (float(cap.clip.scale()) * (emb @ cap._label_embeds.t())[0]).softmax(-1)
    top = torch.topk(probs, min(top_k, len(cap.labels)))
    tags = [{"label": cap.labels[i], "score": round(float(p), 4)} for p, i in zip(top.values.tolist(), top.indices.tolist())]
    return {"caption": c.text, "object": c.object, "backdrop": c.backdrop, "tags": tags,
            "dominant_colors": dominant_colors(rgb, 5), "tone": tone(rgb), "brightness": round(brightness(rgb), 4),
            "describer": "house-clip + house-cutout + measured colours (offline)"}
