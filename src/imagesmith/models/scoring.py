"""What every CLIP-like backbone offers on top of its encoders: scores, zero-shot labels, retrieval."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
