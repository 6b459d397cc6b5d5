"""Classification: zero-shot with house-clip (or a user's transformers CLIP, ``clip=NAME``) over labels you name,
and few-shot gates (document 3's "is this a desk setup?" VGG16 gate, done the cheap way): a logistic-regression
head trained on frozen CLIP image embeddings (house-clip's by default) of a folder with one sub-folder per class, saved as safetensors under ``models/gates/`` and used by
name (``--gate desk-gate``)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import BadRequest, ImagesmithError, NotFound
from ..core.settings import Settings

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class GateError(ImagesmithError):
    code = "bad_gate"
    http_status = 422


def _clip(clip, settings: Settings | None = None):
    """A CLIP object as given, or the one a name resolves to (None: house-clip); see models/clip.py."""
    from ..models.clip import ClipScoring, load_clip
    return clip if isinstance(clip, ClipScoring) else load_clip(clip, settings=settings)


def zero_shot(images: Sequence[Image.Image], labels: Sequence[str], clip=None,
              settings: Settings | None = None) -> list[list[tuple[str, float]]]:
    """Per image: every label with its probability, best first (``a photo of a/an <label>``), by house-clip or
    the CLIP ``clip`` names or is."""
    labels = [x.strip() for x in labels if x.strip()]
    if len(labels) < 2:
        raise BadRequest("give at least two labels to choose between")
    clip = _clip(clip, settings)
    return [clip.classify(im.convert("RGB"), labels, top_k=len(labels)) for im in images]


def gates_dir(settings: Settings) -> Path:
    return settings.models_dir / "gates"


def _embed(paths: Sequence[Path], clip, settings: Settings) -> torch.Tensor:
    from ..core.imageio import load_image
    images = [load_image(str(p), settings=settings, mode="RGB", what="image") for p in paths]
    return torch.nn.functional.normalize(clip.encode_images(images).float(), dim=-1)


def train_gate(folder: str | Path, name: str, *, settings: Settings | None = None, holdout: float = 0.2,
               seed: int = 0, steps: int = 300, weight_decay: float = 1e-3, clip=None) -> dict:
    """Train, evaluate on a seeded stratified hold-out, refit on everything, save; returns the gate's card.
    The head sits on ``clip``'s image embeddings (house-clip by default, or a user's transformers CLIP by name);
    the card records which, and the gate loads that embedder again."""
    from safetensors.torch import save_file

    from ..models.clip import clip_name
    settings = settings or Settings.from_env()
    folder = Path(folder)
    if not name or not set(name) <= _NAME_OK:
        raise BadRequest("gate names are letters, digits, '-', '_' and '.'")
    if not folder.is_dir():
        raise GateError(f"gate folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(
        p.suffix.lower() in IMAGE_EXTS for p in d.iterdir()))
    if len(classes) < 2:
        raise GateError(f"{folder} needs one sub-folder of images per class, at least two (e.g. yes/ and no/)")
    files = {c: sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_EXTS) for c in classes}
    small = [c for c in classes if len(files[c]) < 2]
    if small:
        raise GateError(f"class '{small[0]}' has fewer than 2 images")
    t0 = time.perf_counter()
    clip = _clip(clip, settings)
    paths = [p for c in classes for p in files[c]]
    y = torch.tensor([i for i, c in enumerate(classes) for _ in files[c]])
    x = _embed(paths, clip, settings)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(paths), bool)
    for i in range(len(classes)):
        idx = np.flatnonzero(y.numpy() == i)
        k = max(1, int(round(len(idx) * holdout)))
        test[rng.choice(idx, k, replace=False)] = True

    def fit(xs, ys):
        w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.1)
        scale = 10.0  # embeddings are unit vectors: a fixed temperature keeps the logits in range
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(scale * xs @ w + b, ys) + weight_decay * (w ** 2).sum()
            loss.backward()
            opt.step()
        return (scale * w).detach(), b.detach()
    tr, te = torch.from_numpy(~test), torch.from_numpy(test)
    w, b = fit(x[tr], y[tr])
    held = float(((x[te] @ w + b).argmax(-1) == y[te]).float().mean())
    w, b = fit(x, y)  # the shipped head sees every example
    card = {"name": name, "classes": classes, "embedder": clip_name(clip), "images": {c: len(files[c]) for c in classes},
            "holdout_accuracy": round(held, 4), "holdout_images": int(test.sum()), "seed": seed,
            "train_seconds": round(time.perf_counter() - t0, 2)}
    out = gates_dir(settings) / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    save_file({"weight": w.contiguous(), "bias": b.contiguous()}, str(tmp), metadata={"gate": json.dumps(card)})
    tmp.replace(out)
    card["path"] = str(out)
    return card


class Gate:
    """A trained gate: ``gate(image) -> (label, probability)``; ``gate.passes(image, label)``."""

    def __init__(self, name: str, settings: Settings | None = None, clip=None):
        from safetensors import safe_open
        from safetensors.torch import load_file
        settings = settings or Settings.from_env()
        path = gates_dir(settings) / f"{name}.safetensors"
        if not set(name) <= _NAME_OK or not path.is_file():
            known = sorted(p.stem for p in gates_dir(settings).glob("*.safetensors"))
            raise NotFound(f"no gate named {name!r}; known: {', '.join(known) or 'none (imagesmith classify train)'}")
        with safe_open(str(path), "pt") as f:
            self.card = json.loads(f.metadata()["gate"])
        state = load_file(str(path))
        self.weight, self.bias = state["weight"], state["bias"]
        self.classes: list[str] = self.card["classes"]
        self.settings = settings
        self._clip = clip

    @property
    def embedder(self) -> str:
        return self.card.get("embedder", "house-clip")

    @property
    def clip(self):
        if self._clip is None:  # the embedder the head was trained on, by name
            from ..models.clip import load_clip
            try:
                self._clip = load_clip(self.embedder, settings=self.settings)
            except NotFound as exc:
                raise NotFound(f"gate {self.card.get('name')!r} was trained on the CLIP {self.embedder!r}, which is "
                               f"not installed here") from exc
        return self._clip

    def probabilities(self, image: Image.Image) -> dict[str, float]:
        e = torch.nn.functional.normalize(self.clip.encode_images([image.convert("RGB")]).float(), dim=-1)
        p = (e @ self.weight + self.bias).softmax(-1)[0]
        return {c: round(float(v), 4) for c, v in zip(self.classes, p)}

    def __call__(self, image: Image.Image) -> tuple[str, float]:
        probs = self.probabilities(image)
        best = max(probs, key=probs.get)
        return best, probs[best]


def classify_images(images: Sequence[Image.Image], *, labels: Sequence[str] | None = None, imagenet: bool = False,
                    gate: "Gate | str | None" = None, top: int = 5, settings: Settings | None = None,
                    clip=None) -> list[dict]:
    """One row per image: ``label``, ``score`` and ``probabilities`` (the top ones), by exactly one of zero-shot
    ``labels`` (house-clip, or the CLIP ``clip`` names), ``imagenet`` (EfficientNet-Lite0) or a trained ``gate`` (a :class:`Gate` or its name).
    The CLI's ``classify`` and the service's ``classify`` job both run this."""
    settings = settings or Settings.from_env()
    if (labels is not None) + bool(imagenet) + (gate is not None) != 1:
        raise GateError("give exactly one of labels, imagenet or gate")
    if imagenet:
        from .imagenet import ImageNetClassifier
        ranked = ImageNetClassifier(settings).classify(list(images), top_k=top)
        return [{"label": r[0][0], "score": round(r[0][1], 4), "model": "efficientnet-lite0",
                 "probabilities": {k: round(v, 4) for k, v in r}} for r in ranked]
    if gate is not None:
        g = Gate(gate, settings) if isinstance(gate, str) else gate
        if clip is not None and str(clip) != g.embedder:
            raise GateError(f"gate {g.card.get('name')!r} runs on the CLIP it was trained on ({g.embedder}), "
                            f"not {clip}")
        rows = []
        for im in images:
            label, score = g(im)
            rows.append({"label": label, "score": score, "model": f"gate:{g.card.get('name', 'gate')}",
                         "probabilities": g.probabilities(im)})
        return rows
    from ..models.clip import clip_name
    if len([x for x in labels if x.strip()]) < 2:
        raise BadRequest("give at least two labels to choose between")
    clip = _clip(clip, settings)
    ranked = zero_shot(list(images), [s.strip() for s in labels if s.strip()], clip=clip)
    return [{"label": r[0][0], "score": round(r[0][1], 4), "model": clip_name(clip),
             "probabilities": {k: round(v, 4) for k, v in r[:top]}} for r in ranked]
