"""Content-aware layout metrics (PKU PosterLayout, CVPR 2023, after CGL-GAN) and WCAG contrast.

- :func:`occ` - occlusion: mean saliency under the text boxes (lower is better: text off the subject).
- :func:`rea` - unreadability: mean Sobel gradient magnitude of the background under the text boxes (lower is
  better: text on calm ground).
- :func:`uti` - utilisation: the share of the image's non-salient space (``1 - saliency``) the boxes use.
- :func:`relative_luminance`, :func:`contrast_ratio` - WCAG 2.x, re-exported from
  :mod:`imagesmith.compose.contrast` (one definition in the codebase).

Boxes are ``(x0, y0, x1, y1)`` in pixels of the map / image they are measured on, end exclusive; they are
rounded to whole pixels and clipped to the image. Overlapping boxes count once (the union is measured).
Reference values: the DS-GAN reproduction on PosterLayout reports Occ 0.35, Rea 0.012, Uti 0.98
(``docs/ANCHORS.md``); see :func:`rea` on why its scale differs from ours unless ``normalize="max"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from PIL import Image

from ..compose.contrast import contrast_ratio, relative_luminance
from ..vision.analyze import sobel_magnitude

__all__ = ["boxes_mask", "contrast_ratio", "layout_metrics", "occ", "rea", "relative_luminance", "uti"]

Box = Sequence[float]


def boxes_mask(shape: tuple[int, int], boxes: Iterable[Box]) -> np.ndarray:
    """Boolean ``shape`` mask of the union of ``boxes`` (rounded to whole pixels, clipped to the image)."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box is (x0, y0, x1, y1), not {box!r}")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, x1 = max(0, min(x0, x1)), min(w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(h, max(y0, y1))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return mask


def _saliency01(saliency: np.ndarray) -> np.ndarray:
    s = np.asarray(saliency)
    if s.ndim != 2:
        raise ValueError(f"a saliency map is [H, W], not {s.shape}")
    s = s.astype(np.float64) / 255.0 if s.dtype == np.uint8 else s.astype(np.float64)
    return np.clip(np.nan_to_num(s), 0.0, 1.0)


def occ(saliency: np.ndarray, boxes: Iterable[Box]) -> float:
    """Occlusion: mean saliency (0..1; a uint8 map is read as 0..255) over the union of ``boxes``. Lower is
    better. No boxes, or boxes entirely outside the map: 0.0 (nothing is covered)."""
    s = _saliency01(saliency)
    mask = boxes_mask(s.shape, boxes)
    return float(s[mask].mean()) if mask.any() else 0.0


def uti(saliency: np.ndarray, boxes: Iterable[Box]) -> float:
    """Utilisation: ``sum(1 - saliency)`` under the union of ``boxes`` / ``sum(1 - saliency)`` over the image,
    0..1 (higher uses more of the calm space). 0.0 when there are no boxes or the map is salient everywhere."""
    s = _saliency01(saliency)
    free = 1.0 - s
    total = float(free.sum())
    mask = boxes_mask(s.shape, boxes)
    return float(free[mask].sum() / total) if total > 0 and mask.any() else 0.0


def _gray01(image: Image.Image | np.ndarray) -> np.ndarray:
    """float32 gray [H, W] in 0..1 of a PIL image (any mode; alpha ignored), an RGB array or a gray array
    (uint8 0..255 or float 0..1)."""
    import cv2
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), np.float32) / 255.0
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = np.clip(np.round(rgb.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    if arr.ndim != 2:
        raise ValueError(f"expected an image, an RGB array or a gray array, not shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def rea(image: Image.Image | np.ndarray, boxes: Iterable[Box], *,
        normalize: Literal["absolute", "max"] = "absolute") -> float:
    """Unreadability: mean Sobel gradient magnitude of the grayscale image under the union of ``boxes``. Lower
    is better. No boxes: 0.0.

    Normalisation. The image is converted to gray (ITU-R 601 luma) scaled to 0..1; the magnitude is
    ``sqrt(gx^2 + gy^2) / 8`` with OpenCV's 3x3 Sobel kernels (:func:`imagesmith.vision.analyze.sobel_magnitude`),
    i.e. the gray-level slope per pixel: a flat area reads 0, a ramp rising 1% a pixel reads 0.01, a black/white
    step 0.5 on the two pixels beside it. ``normalize="absolute"`` (default) keeps that scale, so values compare
    across images. ``normalize="max"`` divides by the image's own largest magnitude, as the PosterLayout
    reference code does (there the gradient image is also rescaled to its maximum), for numbers comparable
    with published ones (DS-GAN Rea 0.012)."""
    gray = _gray01(image)
    mask = boxes_mask(gray.shape, boxes)
    if not mask.any():
        return 0.0
    g = sobel_magnitude(gray)
    if normalize == "max":
        top = float(g.max())
        g = g / top if top > 0 else g
    elif normalize != "absolute":
        raise ValueError(f"normalize must be 'absolute' or 'max', not {normalize!r}")
    return float(g[mask].mean())


def layout_metrics(image: Image.Image | np.ndarray, saliency: np.ndarray, boxes: Iterable[Box]) -> dict[str, float]:
    """``{"occ", "rea", "uti"}`` of text ``boxes`` on ``image`` with its ``saliency`` map (same size)."""
    boxes = list(boxes)
    return {"occ": occ(saliency, boxes), "rea": rea(image, boxes), "uti": uti(saliency, boxes)}
