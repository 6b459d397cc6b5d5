"""Product cut-out: a photo in, the product as a clean RGBA layer out.

:func:`cutout` takes the image's own transparency when it has a meaningful one (a PNG already cut out), and
otherwise asks a :class:`~imagesmith.models.segment.Segmenter` (house-cutout by default) for the alpha matte.
A segmenter's matte is then refined cheaply at full resolution:

- *cleaning*: specks the segmenter left far from the product are dropped (they would blow up the product's
  bounding box and show as dirt on the new background);
- *feathering*: a Gaussian edge band (about 1 px per 1024 px of the long side) so hard masks get soft,
  anti-aliased edges;
- *decontamination* (:func:`decontaminate`): in the soft edge band the observed colour is a blend of the
  product and the old backdrop, ``I = a F + (1 - a) B``. Composited on a new background such pixels keep
  a halo of the old backdrop colour. The foreground colour ``F`` is re-estimated with blur-fusion
  (Forte & Pitie 2021, "Approximate fast foreground colour estimation"): local foreground and background
  colours come from alpha-weighted box blurs, then ``F = F_blur + a (I - a F_blur - (1 - a) B_blur)``,
  clipped, in two passes (a wide radius, then a narrow one). Pixels with ``a >= 0.98`` keep their RGB
  exactly: decontamination only ever touches the edge band and the transparent background.

When the user points at the product (a box, or a tap on an unclear matte), the area is re-segmented by the
photo's own colours, seeded by the segmenter's matte (:func:`colour_matte`): a segmenter trained on composites
misses what looks like its training backgrounds in a real photo, and the user's guide says where the product is.

An empty matte, or one that covers the whole frame, is refused with :class:`BadRequest`: there is no product
to place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..core.errors import BadRequest

# below this mean alpha nothing was found; above the upper one nothing was cut away
MIN_COVERAGE = 0.005
MAX_COVERAGE = 0.97
# a cut-out whose confidence (cutout_confidence) is below this is not used for an ad: the user is asked for a box
MIN_CONFIDENCE = 0.5
# a product box is widened by this fraction of its size on every side before the segmenter sees the crop
BOX_CONTEXT = 0.15
# with a box, parts of the matte smaller than this fraction of its largest part are dropped
BOX_PART_FRACTION = 0.1
# a transparency channel counts as a cut-out when some pixel is below this (out of 255)
OWN_ALPHA_BELOW = 250
# with a box, the box is re-segmented by colour (GrabCut seeded by the segmenter's matte) at this long side at most
COLOUR_SIDE = 512
COLOUR_ITERATIONS = 5
# with a point and an unclear matte, the colour re-segmentation looks this much beyond the part's box on each side
POINT_WIDEN = 0.15
# a box's segmenter matte and its colour re-segmentation (their IoU): fully trusted from AGREE_FULL, not at
# all at AGREE_NONE (matte_confidence)
AGREE_FULL, AGREE_NONE = 0.8, 0.55
# a tap's unclear part and the colour cut that replaced it: fully trusted from RECUT_AGREE_FULL, not at all at
# RECUT_AGREE_NONE (matte_confidence). Stricter than a box's: a tap says less than a box, and on the hard
# composites most such cuts were wrong (14 of 21 at seed 0, 18 of 23 at seed 1, IoU < 0.9)
RECUT_AGREE_FULL, RECUT_AGREE_NONE = 0.92, 0.80
# a tapped part's neighbours are looked for this far beyond its box on each side (matte_confidence)
NEIGHBOUR_WIDEN = 0.25
# pixels at least this opaque keep their original RGB exactly
INTERIOR_ALPHA = 0.98
# connected parts of the matte smaller than this fraction of the largest part are specks
SPECK_FRACTION = 0.01


@dataclass
class Cutout:
    """A cut-out product.

    ``rgba``: RGBA, the input's size; straight (not premultiplied) colour, decontaminated in the edge band.
    ``alpha``: float32 ``[H, W]`` in [0, 1], exactly ``rgba``'s alpha channel / 255.
    ``box``: ``(x0, y0, x1, y1)``, the tight box of ``alpha > 0.5`` (exclusive end).
    ``coverage``: mean alpha. ``source``: ``"alpha"`` if the input's own transparency was used, else the
    segmenter's name."""

    rgba: Image.Image
    alpha: np.ndarray
    box: tuple[int, int, int, int]
    coverage: float
    source: str
    confidence: float = 1.0
    """:func:`matte_confidence` of the (guided) matte (1.0 for the image's own transparency)."""
    confidence_parts: dict | None = None


class UnclearCutout(BadRequest):
    """The product could not be separated cleanly: the matte's confidence is below the threshold. ``field``
    names the input that would fix it (``product_box``)."""

    def __init__(self, message: str, confidence: float, field: str = "product_box"):
        super().__init__(message)
        self.confidence = confidence
        self.field = field


def _field_error(message: str, field: str) -> BadRequest:
    """A BadRequest that names the request field to fix (the API puts it in the error body)."""
    exc = BadRequest(message)
    exc.field = field
    return exc


def _coordinates(value: Any, size: tuple[int, int], name: str, shape: str) -> list[int]:
    """The numbers of ``"a,b,..."`` or a sequence, as many as ``shape`` names (``"x0,y0,x1,y1"`` / ``"x,y"``), in
    pixels: values all in [0, 1] with one strictly inside are fractions of ``size`` (w, h)."""
    n = shape.count(",") + 1
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != n or not all(np.isfinite(parts)):
        raise _field_error(f"{name} must be {n} numbers {shape}, not {value!r}", name)
    if all(0 <= v <= 1 for v in parts) and any(0 < v < 1 for v in parts):
        parts = [v * size[i % 2] for i, v in enumerate(parts)]
    return [int(round(v)) for v in parts]


def parse_box(value: Any, size: tuple[int, int], name: str = "product_box") -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` in pixels from ``"x0,y0,x1,y1"`` or a 4-sequence (or fractions of the size), checked
    against the image ``size`` (w, h). ``None`` passes through."""
    if value is None:
        return None
    x0, y0, x1, y1 = _coordinates(value, size, name, "x0,y0,x1,y1")
    w, h = size
    if not (x1 > x0 and y1 > y0):
        raise _field_error(f"{name} {x0},{y0},{x1},{y1} is empty: x1 must exceed x0 and y1 y0", name)
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise _field_error(f"{name} {x0},{y0},{x1},{y1} lies outside the {w}x{h} image", name)
    if (x1 - x0) < 4 or (y1 - y0) < 4:
        raise _field_error(f"{name} {x0},{y0},{x1},{y1} is too small (under 4 px)", name)
    return x0, y0, x1, y1


def parse_point(value: Any, size: tuple[int, int], name: str = "product_point") -> tuple[int, int] | None:
    """``(x, y)`` in pixels from ``"x,y"`` or a 2-sequence (or fractions), inside the image ``size`` (w, h)."""
    if value is None:
        return None
    x, y = _coordinates(value, size, name, "x,y")
    if not (0 <= x < size[0] and 0 <= y < size[1]):
        raise _field_error(f"{name} {x},{y} lies outside the {size[0]}x{size[1]} image", name)
    return x, y


def _components(alpha: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    import cv2
    return cv2.connectedComponentsWithStats((alpha > 0.5).astype(np.uint8), connectivity=8)[:3]


def _keep_part_at(alpha: np.ndarray, point: tuple[int, int], what: str) -> np.ndarray:
    """``alpha`` with only its part under ``point`` (or the part most present within 3% of the long side of
    it); a point on the background is refused (:class:`BadRequest` naming product_point)."""
    import cv2
    h, w = alpha.shape
    px, py = point
    n, labels, stats = _components(alpha)
    label = int(labels[py, px])
    if label == 0 and n > 1:
        r = max(3, int(0.03 * max(w, h)))
        win = labels[max(0, py - r): py + r + 1, max(0, px - r): px + r + 1]
        ids, counts = np.unique(win[win > 0], return_counts=True)
        label = int(ids[np.argmax(counts)]) if ids.size else 0
    if label == 0:
        raise _field_error(f"product_point {px},{py} is on the background of {what}: no product was found "
                           f"there; tap the product itself, or give product_box around it", "product_point")
    near = cv2.dilate((labels == label).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return np.where(near, alpha, 0.0).astype(np.float32)


def colour_matte(rgb: np.ndarray, alpha: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Re-segment ``box`` of ``rgb`` (uint8 ``[H, W, 3]``) by colour, seeded by a segmenter's ``alpha``.

    A learned segmenter that never saw real photos loses the parts of a product that look like its training
    backgrounds (the coffee in a cup, a saucer's shadowed rim) and keeps what looks like its products. The
    user's box says more than that: everything outside it is background, and the product fills it. GrabCut
    (Rother et al. 2004, OpenCV's) fits colour models of the product and of this photo's own background and
    cuts along the image's edges. Its seeds: outside the box, background; inside, probably product; far
    outside the (widened) convex hull of the segmenter's parts, background; the segmenter's confident core,
    product. It runs on the box with a ring of context at :data:`COLOUR_SIDE` px at most; the cut is brought
    back to full size with the guided filter (edges land on the photo's edges). Deterministic (OpenCV's RNG
    is seeded). Returns float32 ``[H, W]`` in [0, 1]; ``alpha`` unchanged when the cut is empty or fills the
    box."""
    import cv2

    from ..models.segment import guided_upsample
    h, w = alpha.shape
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    mx, my = max(4, int(round(BOX_CONTEXT * bw))), max(4, int(round(BOX_CONTEXT * bh)))
    cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
    crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1, :3])
    a = alpha[cy0:cy1, cx0:cx1]
    s = min(1.0, COLOUR_SIDE / max(crop.shape[:2]))
    size = (max(8, int(round(crop.shape[1] * s))), max(8, int(round(crop.shape[0] * s))))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    a_s = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
    sx, sy = size[0] / crop.shape[1], size[1] / crop.shape[0]
    inner = np.zeros(a_s.shape, bool)
    inner[int((y0 - cy0) * sy): int(np.ceil((y1 - cy0) * sy)), int((x0 - cx0) * sx): int(np.ceil((x1 - cx0) * sx))] = True
    labels = np.full(a_s.shape, cv2.GC_BGD, np.uint8)
    labels[inner] = cv2.GC_PR_FGD
    solid = (a_s > 0.5).astype(np.uint8)
    n, parts, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    if n > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        ids = np.flatnonzero(areas >= 0.02 * areas.max()) + 1
        pts = np.column_stack(np.nonzero(np.isin(parts, ids)))[:, ::-1].astype(np.int32)
        hull = np.zeros_like(solid)
        cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
        r = max(3, int(0.06 * max(inner.sum(0).max(), inner.sum(1).max())))
        hull = cv2.dilate(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        labels[inner & (hull == 0)] = cv2.GC_BGD
        core = cv2.erode((a_s > 0.9).astype(np.uint8), np.ones((7, 7), np.uint8), iterations=2).astype(bool)
        labels[inner & core] = cv2.GC_FGD
    if not (labels == cv2.GC_BGD).any() or not np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
        return alpha
    cv2.setRNGSeed(0)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, None, bgd, fgd, COLOUR_ITERATIONS,
                cv2.GC_INIT_WITH_MASK)
    cut = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
    if cut.sum() < 4 or cut[inner].mean() > 0.995:
        return alpha
    # a soft band for the guided filter, which lays the edge on the photo's own edges at full size (and smooths
    # the cut's pixel staircase where the photo's edge is smooth)
    cut = cv2.GaussianBlur(cut, (0, 0), 1.0)
    full = guided_upsample(cut, crop.astype(np.float32) / 255.0, r=2 if s < 1.0 else 3)
    out = np.zeros_like(alpha)
    out[cy0:cy1, cx0:cx1] = full
    return out


def guided_matte(image: Image.Image, segmenter: Any, *, box: tuple[int, int, int, int] | None = None,
                 point: tuple[int, int] | None = None, what: str = "image", colour: bool = True) -> np.ndarray:
    """The segmenter's matte of ``image`` (RGB), guided by the user's "this one"; see :func:`scored_matte`,
    which also says how far to trust it."""
    return scored_matte(image, segmenter, box=box, point=point, what=what, colour=colour)[0]


def scored_matte(image: Image.Image, segmenter: Any, *, box: tuple[int, int, int, int] | None = None,
                 point: tuple[int, int] | None = None, what: str = "image",
                 colour: bool = True) -> tuple[np.ndarray, float, dict[str, float]]:
    """The segmenter's matte of ``image`` (RGB) guided by the user's "this one", with its confidence and the
    confidence's parts (:func:`matte_confidence`).

    - ``box``: the segmenter sees the box widened by :data:`BOX_CONTEXT` on every side (the product fills its
      view, other objects mostly leave it), and the matte outside the box (plus a 3% margin) is dropped, as
      are parts of it that do not reach into the box. With ``colour`` (default) the box is then re-segmented
      by the photo's colours (:func:`colour_matte`); how much the two cuts agree is part of the confidence.
    - ``point``: the part of the matte under the point (or within 3% of the long side of it) is kept, every
      other part dropped; a point on the background is refused (:class:`BadRequest` naming product_point).
      With ``colour``, a part that is unclear (:func:`cutout_confidence` below :data:`MIN_CONFIDENCE`) has its
      box, widened by :data:`POINT_WIDEN`, re-segmented by colour. How much other matte lies around the part
      is part of the confidence.
    Both can be given (the point then picks inside the box's matte). Without a box or a point the matte is the
    segmenter's own: an unclear one is refused by :func:`cutout`, which asks for a box or a point."""
    import cv2
    w, h = image.size
    name = str(getattr(segmenter, "name", None) or type(segmenter).__name__)
    clues: dict[str, float] = {}
    if box is None:
        alpha = _as_matte(segmenter.predict(image), (h, w), name)
    else:
        x0, y0, x1, y1 = box
        mx, my = int(round(BOX_CONTEXT * (x1 - x0))), int(round(BOX_CONTEXT * (y1 - y0)))
        cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        crop = image.crop((cx0, cy0, cx1, cy1))
        alpha = np.zeros((h, w), np.float32)
        alpha[cy0:cy1, cx0:cx1] = _as_matte(segmenter.predict(crop), (cy1 - cy0, cx1 - cx0), name)
        gx, gy = max(2, int(0.03 * (x1 - x0))), max(2, int(0.03 * (y1 - y0)))
        inside = np.zeros((h, w), np.float32)
        inside[max(0, y0 - gy): y1 + gy, max(0, x0 - gx): x1 + gx] = 1.0
        inside = cv2.GaussianBlur(inside, (0, 0), max(1.0, 0.5 * min(gx, gy)))
        alpha = alpha * np.clip(inside * 1.5, 0, 1)
        n, labels, stats = _components(alpha)
        if n > 1:
            # parts that reach into the box, and are not slivers of a neighbour the widened view caught
            reach = np.unique(labels[y0:y1, x0:x1])
            reach = reach[reach > 0]
            if reach.size:
                areas = stats[reach, cv2.CC_STAT_AREA]
                reach = reach[areas >= BOX_PART_FRACTION * areas.max()]
            keep = np.isin(labels, reach)
            near = cv2.dilate(keep.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            alpha = np.where(near, alpha, 0.0).astype(np.float32)
        if colour:
            cut = colour_matte(np.asarray(image.convert("RGB")), alpha, box)
            clues["agreement"] = _overlap(alpha, cut)
            alpha = cut
    if point is not None:
        whole = alpha
        alpha = _keep_part_at(whole, point, what)
        clues["neighbours"] = _neighbours(whole, alpha)
        if colour and box is None and cutout_confidence(alpha)[0] < MIN_CONFIDENCE:
            # the segmenter's part under the tap is unclear: re-segment around it by colour (see colour_matte)
            part = alpha_box(alpha)
            if part is not None:
                x0, y0, x1, y1 = part
                mx, my = int(POINT_WIDEN * (x1 - x0)), int(POINT_WIDEN * (y1 - y0))
                around = (max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my))
                recut = colour_matte(np.asarray(image.convert("RGB")), alpha, around)
                try:
                    cut = _keep_part_at(recut, point, what)
                except BadRequest:  # the colour cut left the tap outside: keep the segmenter's part
                    cut = None
                if cut is not None:
                    clues["recut_agreement"] = _overlap(alpha, cut)
                    alpha = cut
    score, parts = matte_confidence(alpha, **clues)
    return alpha, score, parts


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two mattes' solid parts (1.0 when both are empty)."""
    sa, sb = a > 0.5, b > 0.5
    union = int(np.logical_or(sa, sb).sum())
    return float(np.logical_and(sa, sb).sum() / union) if union else 1.0


def _neighbours(whole: np.ndarray, part: np.ndarray) -> float:
    """The matte mass of ``whole`` that is not ``part`` within :data:`NEIGHBOUR_WIDEN` of the part's box, per
    unit of the part's own mass: the segmenter's other pieces right beside the tapped one."""
    bx = alpha_box(part)
    mass = float(part.sum())
    if bx is None or mass <= 0:
        return 0.0
    x0, y0, x1, y1 = bx
    mx, my = int(NEIGHBOUR_WIDEN * (x1 - x0)) + 2, int(NEIGHBOUR_WIDEN * (y1 - y0)) + 2
    win = (slice(max(0, y0 - my), y1 + my), slice(max(0, x0 - mx), x1 + mx))
    return float(np.clip(whole[win] - part[win], 0, 1).sum() / mass)


def matte_confidence(alpha: np.ndarray, *, agreement: float | None = None, neighbours: float | None = None,
                     recut_agreement: float | None = None) -> tuple[float, dict[str, float]]:
    """:func:`cutout_confidence` of a guided matte, scaled down by what the guiding showed (measured on the
    hard composites and the hand-masked photos, ``imagesmith eval cutout``):

    - ``agreement`` (a box): IoU of the segmenter's matte of the box and its colour re-segmentation. Two
      estimates that disagree mean one is wrong, and neither says which (the motorcycle in a garage: the
      colour cut keeps the red crates and loses the dark front wheel; its agreement 0.32): full trust from
      :data:`AGREE_FULL`, none at :data:`AGREE_NONE`.
    - ``neighbours`` (a tap): :func:`_neighbours`; a segmenter that split the product into pieces leaves
      other pieces right beside the tapped one, and the tap keeps only one: none is trusted from 0.6.
    - ``recut_agreement`` (a tap whose part was unclear and was cut again by colour): IoU of the part and its
      colour cut. The cut is hard-edged, so its own sharpness says little (scikit-image's espresso cup: the cut
      drops the spoon and leaves a hole in the saucer, sharpness 0.91, agreement 0.70): full trust from
      :data:`RECUT_AGREE_FULL`, none at :data:`RECUT_AGREE_NONE`."""
    score, parts = cutout_confidence(alpha)
    if agreement is not None:
        parts["agreement"] = round(agreement, 4)
        score *= _trust(agreement, AGREE_NONE, AGREE_FULL)
    if neighbours is not None:
        parts["neighbours"] = round(neighbours, 4)
        score *= float(np.clip(1.0 - 2.0 * max(0.0, neighbours - 0.1), 0.0, 1.0))
    if recut_agreement is not None:
        parts["recut_agreement"] = round(recut_agreement, 4)
        score *= _trust(recut_agreement, RECUT_AGREE_NONE, RECUT_AGREE_FULL)
    return round(score, 4), parts


def _trust(agreement: float, none: float, full: float) -> float:
    """How far two cuts that agree this much (IoU) are trusted: 0 at ``none``, 1 from ``full``, linear between."""
    return float(np.clip((agreement - none) / (full - none), 0.0, 1.0))


def cutout_confidence(alpha: np.ndarray) -> tuple[float, dict[str, float]]:
    """How clean a segmenter's matte looks, in [0, 1], without knowing the truth, and its parts.

    A clean product matte is mostly 0 or 1 with a thin soft edge, one main part, and free of the frame's edges
    (a phone photo frames the product; a matte that runs along the border has usually kept the table or the
    wall). Each symptom scales the score down: ``soft`` the share of uncertain alpha (0.1..0.9) against the
    product's area, ``border`` the share of the frame's edge the matte covers, ``parts`` the mass of the matte
    outside its largest part, ``coverage`` a matte too small or too big to be a product photo."""
    import cv2
    a = np.clip(alpha, 0, 1).astype(np.float32)
    h, w = a.shape
    solid = a > 0.5
    area = float(solid.sum())
    if area < 1:
        return 0.0, {"soft": 1.0, "border": 0.0, "parts": 0.0, "coverage": 0.0}
    uncertain = float(((a > 0.1) & (a < 0.9)).sum())
    perimeter = float(max(1.0, np.sqrt(area) * 4))
    soft = max(0.0, uncertain - 2.0 * perimeter) / area  # beyond a 2 px soft edge all round
    edge = np.concatenate([solid[0], solid[-1], solid[:, 0], solid[:, -1]])
    border = float(edge.mean())
    n, labels, stats, _ = cv2.connectedComponentsWithStats(solid.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    parts = float(1.0 - areas.max() / areas.sum()) if areas.size else 0.0
    coverage = area / (h * w)
    f_soft = float(np.clip(1.0 - 2.5 * soft, 0.0, 1.0))
    f_border = float(np.clip(1.0 - 2.0 * max(0.0, border - 0.05), 0.0, 1.0))
    f_parts = float(np.clip(1.0 - 1.5 * max(0.0, parts - 0.05), 0.0, 1.0))
    f_cov = float(np.clip(min(coverage / 0.01, (0.9 - coverage) / 0.2), 0.0, 1.0))
    score = f_soft * f_border * f_parts * f_cov
    return round(score, 4), {"soft": round(soft, 4), "border": round(border, 4), "parts": round(parts, 4),
                             "coverage": round(coverage, 4)}


def cutout(image: Image.Image, segmenter: Any = None, *, refine: bool = True, feather_px: float | None = None,
           what: str = "image", box: Any = None, point: Any = None,
           min_confidence: float | None = None) -> Cutout:
    """Cut the product out of ``image``.

    ``segmenter``: anything with ``predict(image) -> alpha`` (the :class:`~imagesmith.models.segment.Segmenter`
    protocol); ``None`` loads the shipped house-cutout (loading costs a little: pass one in when cutting many
    images). It is not called when the image carries its own meaningful alpha (RGBA / LA / PA / transparent
    palette with some pixel below 250 and not all transparent): that alpha is used exactly as it is.

    ``refine`` (segmenter mattes only): drop specks, feather the edge and decontaminate edge colours.
    ``feather_px``: the edge feather's Gaussian sigma in pixels; ``None`` scales it with the image (1 px per
    1024 px of the long side, at least 0.5), ``0`` turns feathering off. ``what`` names the input in errors.

    ``box`` (``x0,y0,x1,y1``) / ``point`` (``x,y``): "this one", the user's pointer at the product (see
    :func:`guided_matte`); pixels, or fractions of the size when every value is in [0, 1].
    ``min_confidence``: refuse (:class:`UnclearCutout`) a matte whose :func:`matte_confidence` is lower, asking
    for a box or a point, rather than return a broken cut-out. ``None`` never refuses (the score is still set).

    Raises :class:`BadRequest` when the matte is empty or covers the whole image, or the box or point is
    outside the image."""
    if not isinstance(image, Image.Image):
        raise BadRequest(f"{what}: cutout() takes a PIL image")
    if image.width < 1 or image.height < 1:
        raise BadRequest(f"{what} is empty (0 pixels)")
    if feather_px is not None:
        try:
            feather_px = float(feather_px)
        except (TypeError, ValueError):
            feather_px = -1.0
        if not (np.isfinite(feather_px) and feather_px >= 0):
            raise BadRequest(f"feather_px must be a non-negative number of pixels, not {feather_px!r}")

    box = parse_box(box, image.size)
    point = parse_point(point, image.size)
    confidence, parts = 1.0, None
    rgba_in = _own_rgba(image)
    if rgba_in is not None:
        alpha8 = rgba_in[..., 3]
        rgb = rgba_in[..., :3]
        source = "alpha"
    else:
        flat = flatten(image)
        seg = segmenter
        if seg is None:
            from ..models.segment import load_segmenter
            seg = load_segmenter()
        source = str(getattr(seg, "name", None) or type(seg).__name__)
        alpha, confidence, parts = scored_matte(flat, seg, box=box, point=point, what=what)
        if min_confidence is not None and confidence < min_confidence:
            hint = "a tighter product_box" if box is not None else "product_box (x0,y0,x1,y1) around the product" \
                if point is not None else "product_box (x0,y0,x1,y1) around the product or product_point (x,y) on it"
            raise UnclearCutout(f"the product in {what} could not be separated cleanly from its background "
                                f"(cut-out confidence {confidence:.2f} < {min_confidence:.2f}): give {hint}, or "
                                f"a stronger segmenter (imagesmith models install isnet), or lower the minimum "
                                f"confidence to take it as it is", confidence)
        rgb = np.asarray(flat)
        if refine:
            alpha = refine_alpha(alpha, feather_px=feather_px)
        # quantise first: the 'interior keeps its RGB' rule must hold for the alpha that ships
        alpha8 = np.clip(np.round(alpha * 255.0), 0, 255).astype(np.uint8)
        _check_coverage(alpha8.astype(np.float32) / 255.0, what)  # before the colour work: fail fast
        if refine:
            rgb = decontaminate(rgb, alpha8)

    alpha_f = alpha8.astype(np.float32) / 255.0
    coverage = _check_coverage(alpha_f, what)
    box = alpha_box(alpha_f)
    if box is None:
        raise BadRequest(f"no product found in {what}: the cutout mask is empty")
    rgba = Image.fromarray(np.dstack([rgb, alpha8]), "RGBA")
    return Cutout(rgba=rgba, alpha=alpha_f, box=box, coverage=coverage, source=source, confidence=confidence,
                  confidence_parts=parts)


# ------------------------------------------------------------------------------------------------ input
def _own_rgba(image: Image.Image) -> np.ndarray | None:
    """uint8 ``[H, W, 4]`` RGBA of ``image`` when its transparency is a meaningful cut-out, else ``None``."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return None
    try:
        rgba = np.asarray(image.convert("RGBA"))
    except (ValueError, OSError):  # an exotic mode Pillow cannot turn into RGBA: treat it as opaque
        return None
    a = rgba[..., 3]
    if a.size == 0 or a.max() == 0 or a.min() >= OWN_ALPHA_BELOW:
        return None
    return rgba


def own_alpha(image: Image.Image) -> np.ndarray | None:
    """The image's own transparency as uint8 ``[H, W]`` when it is a meaningful cut-out (some pixel below
    250, not every pixel 0), else ``None`` (no alpha channel, a fully opaque one, or a fully transparent one)."""
    rgba = _own_rgba(image)
    return None if rgba is None else rgba[..., 3].copy()


def flatten(image: Image.Image) -> Image.Image:
    """RGB for a segmenter: transparent images are flattened onto white (what a viewer shows)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        try:
            rgba = image.convert("RGBA")
        except (ValueError, OSError):
            return image.convert("RGB")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _as_matte(alpha: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """A segmenter's output as float32 ``[H, W]`` in [0, 1] of ``shape`` (resized if it answered at another
    size; NaNs become 0)."""
    import cv2
    a = np.asarray(alpha, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"segmenter {name!r} returned an alpha of shape {np.shape(alpha)}, not [H, W]")
    if a.shape != shape:
        a = cv2.resize(a, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)


def _check_coverage(alpha: np.ndarray, what: str) -> float:
    coverage = float(alpha.mean()) if alpha.size else 0.0
    if coverage < MIN_COVERAGE or not (alpha > 0.5).any():
        raise BadRequest(f"no product found in {what}: the cutout mask is empty")
    if coverage > MAX_COVERAGE:
        raise BadRequest(f"no product found in {what}: the cutout mask covers the whole image "
                         f"(use a photo with the product on a plain backdrop, or a PNG already cut out)")
    return coverage


def alpha_box(alpha: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Tight ``(x0, y0, x1, y1)`` box (exclusive end) of ``alpha > threshold``; ``None`` if there is none."""
    on = alpha > threshold
    rows = np.flatnonzero(on.any(axis=1))
    cols = np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ------------------------------------------------------------------------------------------- refinement
def default_feather(shape: tuple[int, int]) -> float:
    """Edge feather sigma for an image of ``shape``: 1 px per 1024 px of the long side, at least 0.5 px."""
    return max(0.5, max(shape) / 1024.0)


def refine_alpha(alpha: np.ndarray, *, feather_px: float | None = None) -> np.ndarray:
    """Clean and feather a segmenter's matte (float32 ``[H, W]`` in [0, 1]).

    Connected parts of ``alpha > 0.5`` smaller than 1% of the largest part are specks; every alpha farther
    than 2% of the long side (at least 3 px) from the parts kept is zeroed (specks and faint haze), then the
    edge is feathered with a Gaussian of sigma ``feather_px`` (see :func:`default_feather`)."""
    import cv2
    h, w = alpha.shape
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    solid = (a > 0.5).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    if n > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep_ids = np.flatnonzero(areas >= SPECK_FRACTION * areas.max()) + 1
        keep = np.isin(labels, keep_ids) if keep_ids.size < n - 1 else solid.astype(bool)
        reach = max(3.0, 0.02 * max(h, w))
        # distance from every pixel to the nearest kept pixel (distanceTransform measures to the zeros)
        dist = cv2.distanceTransform((~keep).astype(np.uint8), cv2.DIST_L2, 3)
        a = np.where(dist <= reach, a, 0.0).astype(np.float32)
    sigma = default_feather((h, w)) if feather_px is None else float(feather_px)
    if sigma > 0:
        a = cv2.GaussianBlur(a, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def _blur(x: np.ndarray, r: int) -> np.ndarray:
    import cv2
    k = 2 * r + 1
    return cv2.blur(x, (k, k), borderType=cv2.BORDER_REFLECT)


def _local_colours(image: np.ndarray, fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray,
                   r: int) -> tuple[np.ndarray, np.ndarray]:
    """Blur-fusion's local colour estimates: (alpha-weighted mean foreground, (1 - alpha)-weighted mean
    background) in a (2r+1)^2 box around every pixel."""
    a = alpha[..., None]
    blurred_a = _blur(alpha, r)[..., None]
    blurred_f = _blur(fg * a, r) / (blurred_a + 1e-5)
    blurred_b = _blur(bg * (1.0 - a), r) / ((1.0 - blurred_a) + 1e-5)
    return blurred_f, blurred_b


def _fuse(image: np.ndarray, alpha: np.ndarray, blurred_f: np.ndarray, blurred_b: np.ndarray) -> np.ndarray:
    """Blur-fusion's foreground: ``F_blur + a (I - a F_blur - (1 - a) B_blur)``, clipped to 0..1."""
    a = alpha[..., None]
    return np.clip(blurred_f + a * (image - a * blurred_f - (1.0 - a) * blurred_b), 0.0, 1.0)


def _resize_rows(lo: np.ndarray, full: tuple[int, int], y0: int, y1: int) -> np.ndarray:
    """Rows ``y0:y1`` of ``lo`` bilinearly resized to ``full`` (h, w), without making the whole of it (the same
    sampling as ``cv2.resize(..., INTER_LINEAR)``)."""
    import cv2
    h, w = full
    lh, lw = lo.shape[:2]
    if (lh, lw) == (h, w):
        return lo[y0:y1]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) * (lw / w) - 0.5)[None, :]
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) * (lh / h) - 0.5)[:, None]
    map_x = np.broadcast_to(xs, (y1 - y0, w)).astype(np.float32)
    map_y = np.broadcast_to(ys, (y1 - y0, w)).astype(np.float32)
    return cv2.remap(lo, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def decontaminate(rgb: np.ndarray, alpha: np.ndarray, *, radius: int | None = None) -> np.ndarray:
    """Remove the old backdrop's colour from the edge band of a cut-out.

    ``rgb``: uint8 ``[H, W, 3]``, the photo; ``alpha``: float ``[H, W]`` in [0, 1] (uint8 0..255 is accepted).
    Returns uint8 ``[H, W, 3]``: the estimated foreground colour wherever ``alpha < 0.98`` near the product
    (the edge band, and a smooth extension of the product's colours into the transparent surroundings, harmless
    there and helpful to any resampling that ignores alpha); pixels with ``alpha >= 0.98`` are returned
    unchanged, bit for bit, and so is everything far from the product.

    Blur-fusion foreground estimation (Forte & Pitie 2021) in two passes: a wide one, radius ``radius`` (default
    90 px per 1024 px of the long side, at least 3), run on a copy at most 1024 px long (its output is a smooth
    local colour average, so nothing is lost), then a narrow one at full resolution, radius a fifteenth of it
    (at least 2), processed in strips so memory stays bounded on large photos."""
    import cv2
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be [H, W, 3], not {rgb.shape}")
    a = np.asarray(alpha)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    if a.shape != rgb.shape[:2]:
        raise ValueError(f"alpha {a.shape} does not match rgb {rgb.shape[:2]}")
    rgb = rgb.astype(np.uint8, copy=False)
    edge = (a > 1.0 / 255.0) & (a < INTERIOR_ALPHA)
    if not edge.any():
        return rgb.copy()
    h, w = a.shape
    r1 = int(radius) if radius is not None else max(3, round(90 * max(h, w) / 1024))
    r2 = max(2, round(r1 / 15))
    # only the product's neighbourhood matters: crop to the soft pixels' box plus the wide radius
    rows = np.flatnonzero(edge.any(axis=1))
    cols = np.flatnonzero(edge.any(axis=0))
    y0, y1 = max(0, rows[0] - 2 * r1), min(h, rows[-1] + 1 + 2 * r1)
    x0, x1 = max(0, cols[0] - 2 * r1), min(w, cols[-1] + 1 + 2 * r1)
    crop_rgb, crop_a = rgb[y0:y1, x0:x1], np.ascontiguousarray(a[y0:y1, x0:x1])
    ch, cw = crop_a.shape

    # pass 1 (wide): local foreground / background colours, on a copy at most 1024 px long
    scale = min(1.0, 1024 / max(ch, cw))
    if scale < 1.0:
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        img_lo = cv2.resize(crop_rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        a_lo = cv2.resize(crop_a, size, interpolation=cv2.INTER_AREA)
    else:
        img_lo, a_lo = crop_rgb.astype(np.float32) / 255.0, crop_a
    bf_lo, bb_lo = _local_colours(img_lo, img_lo, img_lo, a_lo, max(3, round(r1 * scale)))

    # pass 2 (narrow) at full resolution, in strips with r2 rows of context on each side
    out = rgb.copy()
    strip = 512
    for s0 in range(0, ch, strip):
        s1 = min(ch, s0 + strip)
        c0, c1 = max(0, s0 - r2), min(ch, s1 + r2)
        img = crop_rgb[c0:c1].astype(np.float32) / 255.0
        ac = crop_a[c0:c1]
        bb = _resize_rows(bb_lo, (ch, cw), c0, c1)
        fg1 = _fuse(img, ac, _resize_rows(bf_lo, (ch, cw), c0, c1), bb)
        fg2 = _fuse(img, ac, *_local_colours(img, fg1, bb, ac, r2))[s0 - c0:s1 - c0]
        est = np.clip(np.round(fg2 * 255.0), 0, 255).astype(np.uint8)
        region = out[y0 + s0:y0 + s1, x0:x1]
        soft = crop_a[s0:s1] < INTERIOR_ALPHA
        region[soft] = est[soft]
    return out
