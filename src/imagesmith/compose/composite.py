"""Put the cut-out product into its scene: contact shadow, optional reflection, optional colour
harmonisation, and the product's own pixels pasted back last.

The guarantee a brand needs: with ``harmonize="off"`` every pixel of the product's core (alpha >= 0.5,
eroded by 2 px) in the output equals the cutout's RGB exactly. The function checks it before returning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np
from PIL import Image

from ..core.errors import BadImage

Harmonize = Literal["off", "edge", "full"]
HARMONIZE_MODES: tuple[str, ...] = ("off", "edge", "full")

# the protected core: alpha >= 0.5, eroded by this many px (the soft rim may blend with the scene)
PROTECT_ERODE_PX = 2
# how far the product's colour statistics move toward the scene's (0 = none, 1 = all the way);
# a full transfer would paint an orange bottle marble-grey, so it only leans toward the scene's light
HARMONIZE_STRENGTH = 0.5
# edge mode recolours a band this fraction of the product's short side deep (at least 3 px)
EDGE_BAND_FRACTION = 0.06


@dataclass(frozen=True)
class ShadowSpec:
    """Contact shadow. ``direction_deg``: where the light comes from, counter-clockwise from the right
    (90 = from above: the shadow sits straight under the product; 0 = from the right: it falls to the
    left). ``softness`` 0-1 blurs it; ``opacity`` 0-1 is its darkest point."""

    direction_deg: float = 90.0
    softness: float = 0.5
    opacity: float = 0.45
    enabled: bool = True


@dataclass
class CompositeResult:
    image: Image.Image
    protected_mask: np.ndarray  # bool H x W: the product core whose pixels are the cutout's own
    preserved: bool  # True when every protected pixel equals the cutout's RGB
    harmonized: str  # the harmonize mode applied


def fit_product(cutout_rgba: Image.Image, box_size: tuple[int, int]) -> Image.Image:
    """Crop the cutout to its alpha's tight bounding box and resize it (Lanczos, premultiplied alpha so
    no dark fringe bleeds in from transparent pixels) to fit ``box_size`` keeping its aspect ratio.

    When the box already has the product's aspect (within one pixel of rounding, as
    :func:`~imagesmith.compose.placement.place_product` makes it) the result is exactly ``box_size``, so
    fitting twice to the result's own size gives the same image."""
    rgba = cutout_rgba.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise BadImage("the product cutout is empty: no opaque pixels")
    rgba = rgba.crop(bbox)
    w, h = rgba.size
    bw, bh = (int(v) for v in box_size)
    if bw <= 0 or bh <= 0:
        raise ValueError(f"cannot fit the product into a {bw}x{bh} box")
    if abs(h * bw / w - bh) <= 1.0 or abs(w * bh / h - bw) <= 1.0:
        size = (bw, bh)
    else:
        f = min(bw / w, bh / h)
        size = (min(bw, max(1, round(w * f))), min(bh, max(1, round(h * f))))
    if size == (w, h):
        return rgba
    return rgba.convert("RGBa").resize(size, Image.LANCZOS).convert("RGBA")


def _protected_core(alpha: np.ndarray) -> np.ndarray:
    """alpha (uint8, box coordinates) -> bool core: >= 50 % opaque, eroded by PROTECT_ERODE_PX. Erosion
    treats the crop border as opaque (OpenCV's default), matching how callers re-derive it."""
    k = 2 * PROTECT_ERODE_PX + 1
    return cv2.erode((alpha >= 128).astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    return np.clip(cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB) * 255.0, 0, 255)


def _scene_ring(shape: tuple[int, int], box: Sequence[int], product_alpha_full: np.ndarray) -> np.ndarray:
    """Background pixels around the product (box grown by half its size), the product excluded."""
    h, w = shape
    x0, y0, x1, y1 = box
    gx, gy = (x1 - x0) // 2 + 4, (y1 - y0) // 2 + 4
    ring = np.zeros((h, w), bool)
    ring[max(0, y0 - gy):min(h, y1 + gy), max(0, x0 - gx):min(w, x1 + gx)] = True
    return ring & (product_alpha_full < 0.05)


def _harmonize(product_rgb: np.ndarray, alpha: np.ndarray, scene: np.ndarray, mode: str) -> np.ndarray:
    """Reinhard-style colour transfer in Lab: the product's per-channel mean and std move
    HARMONIZE_STRENGTH of the way toward the scene's. ``full`` recolours the whole product; ``edge`` only
    a band along its outline, faded toward the inside."""
    solid = alpha >= 128
    if solid.sum() < 4 or len(scene) < 4:
        return product_rgb.astype(np.float32)
    lab = _rgb_to_lab(product_rgb)
    scene_lab = _rgb_to_lab(scene.reshape(-1, 1, 3)).reshape(-1, 3)
    mu_p, sd_p = lab[solid].mean(0), lab[solid].std(0) + 1e-3
    mu_s, sd_s = scene_lab.mean(0), scene_lab.std(0) + 1e-3
    mu_t = mu_p + HARMONIZE_STRENGTH * (mu_s - mu_p)
    ratio = np.clip(sd_s / sd_p, 0.5, 2.0)
    sd_t = sd_p * (1.0 + HARMONIZE_STRENGTH * (ratio - 1.0))
    moved = _lab_to_rgb((lab - mu_p) / sd_p * sd_t + mu_t)
    if mode == "full":
        weight = np.ones(alpha.shape, np.float32)
    else:
        depth = max(3.0, EDGE_BAND_FRACTION * min(alpha.shape))
        inside = cv2.distanceTransform((alpha >= 128).astype(np.uint8), cv2.DIST_L2, 3)
        weight = np.clip(1.0 - inside / depth, 0.0, 1.0).astype(np.float32)
    weight = weight[..., None]
    return product_rgb.astype(np.float32) * (1 - weight) + moved * weight


def _contact_shadow(shape: tuple[int, int], box: Sequence[int], alpha: np.ndarray, spec: ShadowSpec) -> np.ndarray:
    """Shadow opacity (float H x W, 0..spec.opacity): an occlusion ellipse under the product's footprint
    plus its silhouette squashed onto the floor, shifted away from the light, both blurred."""
    h, w = shape
    x0, y0, x1, y1 = box
    pw, ph = x1 - x0, y1 - y0
    solid = alpha >= 128
    rows = np.nonzero(solid.any(axis=1))[0]
    if len(rows) == 0:
        return np.zeros(shape, np.float32)
    base = y0 + int(rows[-1])
    foot_rows = solid[max(0, rows[-1] - max(2, ph // 12)):rows[-1] + 1]
    cols = np.nonzero(foot_rows.any(axis=0))[0]
    fx0, fx1 = x0 + int(cols[0]), x0 + int(cols[-1]) + 1
    theta = math.radians(spec.direction_deg)
    # light from the right (cos > 0) pushes the shadow left; light from below (sin < 0) lengthens it
    dx = -math.cos(theta) * 0.35 * pw
    squash = 0.16 + 0.2 * max(0.0, -math.sin(theta)) + 0.1 * abs(math.cos(theta))
    blur = 1.0 + spec.softness * 0.05 * max(pw, ph)
    pad = int(abs(dx) + 4 * blur + pw + 8)
    X0, X1 = max(0, x0 - pad), min(w, x1 + pad)
    Y0, Y1 = max(0, y0), min(h, base + int(squash * ph) + int(4 * blur) + 8)
    if X1 <= X0 or Y1 <= Y0:
        return np.zeros(shape, np.float32)
    local = np.zeros((Y1 - Y0, X1 - X0), np.float32)
    # occlusion: a flat ellipse centred on the base line, as wide as the footprint
    cx, cy = (fx0 + fx1) / 2 - X0, base - Y0
    ax, ay = max(2.0, 0.55 * (fx1 - fx0)), max(1.5, 0.05 * (fx1 - fx0) + 0.02 * ph)
    cv2.ellipse(local, (int(round(cx)), int(round(cy))), (int(round(ax)), int(round(ay))), 0, 0, 360, 1.0, -1,
                lineType=cv2.LINE_AA)
    # cast: the silhouette flattened onto the floor, its base on the product's base
    sh = max(1, int(round(squash * ph)))
    flat = cv2.resize(alpha.astype(np.float32) / 255.0, (pw, sh), interpolation=cv2.INTER_AREA)
    flat = flat[::-1]  # mirrored: the top of the product lands farthest from its base
    sx = int(round(x0 + dx)) - X0
    sy = base - Y0 - sh // 4
    ys0, ys1 = max(0, sy), min(local.shape[0], sy + sh)
    xs0, xs1 = max(0, sx), min(local.shape[1], sx + pw)
    if ys1 > ys0 and xs1 > xs0:
        region = local[ys0:ys1, xs0:xs1]
        np.maximum(region, 0.6 * flat[ys0 - sy:ys1 - sy, xs0 - sx:xs1 - sx], out=region)
    local = cv2.GaussianBlur(local, (0, 0), blur)
    out = np.zeros(shape, np.float32)
    out[Y0:Y1, X0:X1] = np.clip(local, 0, 1) * float(np.clip(spec.opacity, 0, 1))
    return out


def _reflection(canvas: np.ndarray, box: Sequence[int], product_rgb: np.ndarray, alpha: np.ndarray) -> None:
    """A mirrored, fading copy of the product just under its base (in place on ``canvas``)."""
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = box
    depth = max(1, int(0.35 * (y1 - y0)))
    flipped_rgb = product_rgb[::-1][:depth].astype(np.float32)
    fade = np.linspace(0.35, 0.0, depth, dtype=np.float32)[:, None]
    flipped_a = alpha[::-1][:depth].astype(np.float32) / 255.0 * fade
    ye = min(h, y1 + depth)
    if ye <= y1:
        return
    n = ye - y1
    a = flipped_a[:n, :, None]
    region = canvas[y1:ye, x0:x1]
    region[:] = region * (1 - a) + flipped_rgb[:n] * a


def composite(background: Image.Image, product_rgba: Image.Image, box: Sequence[int], *,
              shadow: ShadowSpec | None = ShadowSpec(), reflection: bool = False,
              harmonize: Harmonize = "off") -> CompositeResult:
    """Composite ``product_rgba`` (already fitted: its size is the box's) onto ``background`` at ``box``
    (x0, y0, x1, y1). Order: contact shadow multiplied into the scene, reflection, the product blended by
    its alpha, then the product's original pixels written over the protected core."""
    if harmonize not in HARMONIZE_MODES:
        raise ValueError(f"harmonize must be one of {HARMONIZE_MODES}, got {harmonize!r}")
    bg = background.convert("RGB")
    W, H = bg.size
    x0, y0, x1, y1 = (int(v) for v in box)
    product = product_rgba.convert("RGBA")
    if product.size != (x1 - x0, y1 - y0):
        raise ValueError(f"the product is {product.size[0]}x{product.size[1]} but the box is {x1 - x0}x{y1 - y0}")
    if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
        raise ValueError(f"box {tuple(box)} lies outside the {W}x{H} background")
    parr = np.asarray(product)
    rgb, alpha = parr[..., :3], parr[..., 3]
    canvas = np.asarray(bg).astype(np.float32)

    alpha_full = np.zeros((H, W), np.float32)
    alpha_full[y0:y1, x0:x1] = alpha / 255.0
    if shadow is not None and shadow.enabled and shadow.opacity > 0:
        canvas *= (1.0 - _contact_shadow((H, W), (x0, y0, x1, y1), alpha, shadow))[..., None]
    if reflection:
        _reflection(canvas, (x0, y0, x1, y1), rgb, alpha)

    if harmonize == "off":
        shown = rgb.astype(np.float32)
    else:
        scene = np.asarray(bg)[_scene_ring((H, W), (x0, y0, x1, y1), alpha_full)]
        shown = _harmonize(rgb, alpha, scene, harmonize)
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1 - a) + shown * a
    out = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    core = _protected_core(alpha)
    if harmonize == "off":
        out[y0:y1, x0:x1][core] = rgb[core]
    else:
        out[y0:y1, x0:x1][core] = np.clip(np.rint(shown[core]), 0, 255).astype(np.uint8)
    protected = np.zeros((H, W), bool)
    protected[y0:y1, x0:x1] = core
    preserved = bool(np.array_equal(out[y0:y1, x0:x1][core], rgb[core]))
    if harmonize == "off" and not preserved:  # the guarantee; a failure here is a bug, not user input
        raise AssertionError("product pixels changed although harmonize is off")
    return CompositeResult(image=Image.fromarray(out, "RGB"), protected_mask=protected, preserved=preserved,
                           harmonized=harmonize)


def calm_region(image: Image.Image, box, *, sigma_frac: float = 0.02, feather_frac: float = 0.08) -> Image.Image:
    """Defocus the background inside ``box`` (the copy area), feathered into its surroundings: the
    photographer's shallow depth of field where the copy goes, so text sits on calm pixels. Blur sigma is
    ``sigma_frac`` of the image's short side; apply it BEFORE the product is composited (it never touches it)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return image
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    short = min(image.size)
    sigma = max(1.0, sigma_frac * short)
    blurred = cv2.GaussianBlur(arr, (0, 0), sigma)
    weight = np.zeros(arr.shape[:2], np.float32)
    weight[y0:y1, x0:x1] = 1.0
    feather = max(1.0, feather_frac * min(x1 - x0, y1 - y0))
    weight = np.maximum(cv2.GaussianBlur(weight, (0, 0), feather), weight * 0.9)
    out = arr * (1 - weight[..., None]) + blurred * weight[..., None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _fill_from_surroundings(rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill ``hole`` (bool H x W) of a uint8 RGB image with the colours around it: normalised convolution (the
    known pixels' Gaussian-weighted mean) at growing radii, each pixel from the smallest radius that reaches
    enough known pixels. Smooth, like a studio backdrop, and fed by everything around a large hole; Telea's
    inpainting marches in from the rim only, so a trace of colour on the rim (the fringe of a cleared object)
    was drawn across the whole hole as a faint copy of the object."""
    known = (~hole).astype(np.float32)
    if known.sum() < 1:
        return rgb
    src = rgb.astype(np.float32) * known[..., None]
    out = rgb.astype(np.float32).copy()
    todo = hole.copy()
    side = max(rgb.shape[:2])
    for sigma in (0.02 * side, 0.05 * side, 0.12 * side, 0.3 * side, 1.0 * side):
        den = cv2.GaussianBlur(known, (0, 0), max(1.0, sigma))
        num = cv2.GaussianBlur(src, (0, 0), max(1.0, sigma))
        ok = todo & (den > 0.15)
        if sigma >= side:
            ok = todo & (den > 1e-6)
        out[ok] = num[ok] / den[ok][:, None]
        todo &= ~ok
        if not todo.any():
            break
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def clear_footprint(image: Image.Image, alpha: np.ndarray, *, grow_frac: float = 0.03,
                    work_side: int = 256) -> Image.Image:
    """Paint the scene over where the product stood in a generated background (filled from the surrounding
    colours on a downscaled copy, see :func:`_fill_from_surroundings`; blended back only inside the grown
    footprint). The generator saw a low-resolution
    product there; upscaled, its blurred rim would show as a light or dark halo around the crisp product
    that is composited on top. ``alpha``: H x W in 0..1 (or 0..255) at the image's size."""
    a = alpha.astype(np.float32)
    if a.max() > 1.0:
        a = a / 255.0
    solid = (a > 0.02).astype(np.uint8)
    if not solid.any():
        return image
    w, h = image.size
    grow = max(2, int(round(grow_frac * min(w, h))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    region = cv2.dilate(solid, kernel)
    s = min(1.0, work_side / max(w, h))
    sw, sh = max(8, int(round(w * s))), max(8, int(round(h * s)))
    arr = np.asarray(image.convert("RGB"))
    small = cv2.resize(arr, (sw, sh), interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(region * 255, (sw, sh), interpolation=cv2.INTER_NEAREST)
    small_mask = cv2.dilate(small_mask, np.ones((3, 3), np.uint8))
    filled = _fill_from_surroundings(small, small_mask > 0)
    filled = cv2.resize(filled, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    # a feather across the region's edge (inside and out), so the filled backdrop fades into the painted one
    # instead of ending at a contour; the product's own footprint stays fully cleared
    weight = cv2.GaussianBlur(region.astype(np.float32), (0, 0), max(1.0, float(grow)))
    weight = np.maximum(weight, cv2.dilate(solid, kernel).astype(np.float32))[..., None]
    out = arr.astype(np.float32) * (1 - weight) + filled * weight
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
