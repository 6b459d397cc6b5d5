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
    """Names the object with a CLIP over a label vocabulary: house-clip's ~725 training objects, plus the 1,000
    ImageNet classes when ``clip`` is a user's transformers CLIP (a CLIP trained on the web knows them)."""

    def __init__(self, labels: Sequence[str] | None = None, clip=None, segmenter=None, settings=None):
        from ..models.clip import ClipScoring, clip_name, load_clip
        from ..models.house_clip import default_house_clip_dir
        from ..models.segment import resolve_segmenter
        self.clip = clip if isinstance(clip, ClipScoring) else load_clip(clip, settings=settings)
        self.clip_name = clip_name(self.clip)
        if labels is None:
            path = default_house_clip_dir() / "labels.json"
            labels = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            if self.clip_name != "house-clip":
                from .imagenet import classes, short_label
                labels = list(dict.fromkeys([*labels, *(short_label(c) for c in classes())]))
        if not labels:
            raise ValueError("no labels: give some (--labels) or ship labels.json with house-clip")
        self.labels = list(labels)
        self.segmenter = segmenter or resolve_segmenter(None)
        from ..core.phrases import with_article
        self._article = with_article
        self._label_embeds = self.clip.encode_texts([f"a photo of {with_article(n)}" for n in self.labels])

    def backdrop_colour(self, image: Image.Image) -> str:
        from .colours import BACKDROP_COLOURS
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
                   labels: Sequence[str] | None = None, progress: bool = True, clip=None) -> list[dict]:
    """Write ``<image>.txt`` beside each image of ``folder`` (recursive) that has none (all with
    ``overwrite``); returns one record per image: file, caption, written."""
    from tqdm.auto import tqdm

    from ..core.errors import DatasetError
    from ..core.imageio import IMAGE_EXTS
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
        cap = Captioner(labels, clip=clip)
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


def describe(image: Image.Image, *, top_k: int = 5, captioner: Captioner | None = None, imagenet=None,
             model_captioner: "TransformersCaptioner | None" = None, question: str | None = None) -> dict:
    """``imagesmith describe``, offline: a caption usable as a prompt (house-clip's object + the backdrop colour
    named from the house palette), tags with their probabilities from whichever model named the object (house-clip's
    labels, or ImageNet's classes when it is surer; the CLIP ranking is always in ``clip_tags``), the top ImageNet
    classes of ``imagenet`` (a :class:`~imagesmith.vision.imagenet.ImageNetClassifier`, when given), the
    dominant colours (hex, share), tone and brightness measured on the pixels. With ``model_captioner`` (a user's
    BLIP or VLM) its caption, steered by ``question``, is the caption; the offline one stays as ``house_caption``."""
    import torch

    from .analyze import brightness, dominant_colors, tone
    cap = captioner or Captioner()
    rgb = image.convert("RGB")
    c = cap(rgb)
    emb = cap.clip.encode_images([rgb])
    probs = (float(cap.clip.scale()) * (emb @ cap._label_embeds.t())[0]).softmax(-1)
    top = torch.topk(probs, min(top_k, len(cap.labels)))
    who = cap.clip_name
    tags = [{"label": cap.labels[i], "score": round(float(p), 4), "source": who}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]
    out = {"caption": c.text, "object": c.object, "backdrop": c.backdrop, "tags": tags, "clip_tags": tags,
           "dominant_colors": dominant_colors(rgb, 5), "tone": tone(rgb), "brightness": round(brightness(rgb), 4),
           "clip": who, "describer": f"{who} + house-cutout + measured colours (offline)"}
    if imagenet is not None:
        from .imagenet import short_label
        out["imagenet"] = [{"label": short_label(name), "class": name, "score": round(p, 4)}
                           for name, p in imagenet.classify([rgb], top_k=top_k)[0]]
        out["describer"] = f"{who} + EfficientNet-Lite0 (ImageNet) + house-cutout + measured colours (offline)"
        # who names the object: house-clip knows studio shots of ~725 objects and is sure of them in its domain
        # (>= 0.9 on its own renders); on other photos its softmax is overconfident nonsense, and ImageNet's
        # top class, when it has some confidence (>= 0.3), names the object better. A web-trained CLIP the
        # user brings knows more than EfficientNet-Lite0: ImageNet only wins where it is surer.
        best = out["imagenet"][0]
        clip_p = tags[0]["score"] if tags else 0.0
        house = who == "house-clip"
        if best["score"] > clip_p or (house and best["score"] >= 0.3 and clip_p < 0.9):
            out["object"], out["object_source"] = best["label"], "imagenet"
            out["caption"] = f"{cap._article(best['label'])} on a {c.backdrop} backdrop"
            # the tags follow whoever named the object; the CLIP's own ranking stays in clip_tags
            out["tags"] = [{"label": t["label"], "score": t["score"], "source": "imagenet"} for t in out["imagenet"]]
        else:
            out["object_source"] = who
    if model_captioner is not None:
        out["house_caption"] = out["caption"]
        out["caption"] = model_captioner(rgb, question)
        out["question"] = question
        out["describer"] = f"{model_captioner.model_type} ({model_captioner.folder.name}) + " + out["describer"]
    return out


class TransformersCaptioner:
    """A user's transformers captioner or VLM, from a local folder of safetensors weights (never downloaded):
    BLIP (``BlipForConditionalGeneration``; ``question`` is the text prefix that steers it, as document 3 did with
    "a photography of") or any image-text-to-text chat model such as Qwen2-VL (``question`` is the instruction).
    ``path`` is a folder, or a name under ``$IMAGESMITH_HOME/models/captioners/``."""

    DEFAULT_INSTRUCTION = "Describe this image in one sentence, as a prompt for an image generator."

    def __init__(self, path: str | Path, *, settings=None, device: str = "cpu", max_new_tokens: int = 40):
        from ..core.errors import BadRequest
        from ..core.settings import Settings
        settings = settings or Settings.from_env()
        folder = Path(path).expanduser()
        if not folder.is_dir():
            named = settings.models_dir / "captioners" / str(path)
            if not named.is_dir():
                raise BadRequest(f"captioner {path!r} is neither a folder nor a name under {named.parent}")
            folder = named
        if not any(folder.glob("*.safetensors")):
            pickled = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
            raise BadRequest(f"captioner {folder} has no .safetensors weights"
                             + (f" (refusing pickled {', '.join(sorted(pickled))}: convert to safetensors)"
                                if pickled else ""))
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        self.folder = folder
        self.model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                                 use_safetensors=True).eval().to(device)
        self.device = device
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: Image.Image, question: str | None = None) -> str:
        import torch
        rgb = image.convert("RGB")
        if self.model_type == "blip":
            inputs = self.processor(images=rgb, text=question or None, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            return self.processor.decode(out[0], skip_special_tokens=True).strip()
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question or self.DEFAULT_INSTRUCTION}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[rgb], text=[prompt], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True).strip()
