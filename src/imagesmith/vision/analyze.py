"""Image analysis for layout: where the eye goes, where text can sit, which colours and mood the image has.

Everything here is measured, cheap (OpenCV on a downscaled copy) and deterministic:

- :func:`saliency_map` - spectral residual saliency (Hou & Zhang 2007: the log-amplitude spectrum minus its
  local average, transformed back) on the L*, a* and b* channels, averaged with two contrast cues in CIELAB
  (each pixel's distance to the image's mean colour, as in Achanta et al. 2009's frequency-tuned saliency,
  and a centre-surround difference of Gaussians). An optional ``mask`` (the product's alpha) is merged in as
  fully salient: the product is what the ad is about.
- :func:`free_space_map` - calm space for text: low saliency and low local Sobel gradient energy.
- :func:`copy_regions` - candidate text boxes: sliding windows of several sizes and aspect ratios ranked by
  mean saliency + mean gradient energy, chosen greedily without overlap.
- :func:`dominant_colors` (k-means in RGB), :func:`tone` (warm / cool / neutral from chroma-weighted CIELAB
  hue), :func:`brightness` (mean L*).
- :func:`analyze` bundles them into an :class:`Analysis` plus the maps; :func:`save_maps` writes the maps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

Tone = Literal["warm", "cool", "neutral"]

# working sizes (long side, pixels): saliency is a coarse, blurry quantity; gradients need a bit more detail
SR_SIZE = 64
CONTRAST_SIZE = 128
GRADIENT_SIZE = 512
REGION_GRID = 64
PALETTE_SIZE = 96
# local gradient energy (mean Sobel magnitude, see sobel_magnitude) that counts as fully busy
BUSY_GRADIENT = 0.06
# an image whose colours vary less than this (CIELAB std, Delta E units) is flat: no saliency at all
FLAT_LAB_STD = 0.5


class ColorShare(TypedDict):
    """A dominant colour: ``hex`` '#rrggbb' and its ``share`` of the pixels (0..1)."""

    hex: str
    share: float


class CopyRegion(TypedDict):
    """A candidate text region: ``box`` [x0, y0, x1, y1] (pixels, exclusive end), ``score`` 0..1 (1 = calm)."""

    box: list[int]
    score: float


class Analysis(BaseModel):
    """What :func:`analyze` measures about an image (the maps travel separately, as arrays)."""

    width: int = Field(description="image width in pixels")
    height: int = Field(description="image height in pixels")
    dominant_colors: list[ColorShare] = Field(description="k-means colours, largest share first; shares sum to 1")
    tone: Tone = Field(description="colour temperature from chroma-weighted CIELAB hue")
    brightness: float = Field(ge=0.0, le=1.0, description="mean CIELAB lightness L*/100")
    copy_regions: list[CopyRegion] = Field(description="calm boxes for text, best first, not overlapping")
    description: str | None = Field(default=None, description="a caption, when a describer filled it in")


# --------------------------------------------------------------------------------------------- helpers
def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a PIL image (transparent images flattened onto white) or an array."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return np.asarray(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return np.asarray(flat)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array [H, W, 3], got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
    return arr


def _shrink(arr: np.ndarray, long_side: int, *, nearest: bool = False) -> np.ndarray:
    """``arr`` scaled down (never up) so its long side is at most ``long_side``."""
    import cv2
    h, w = arr.shape[:2]
    s = long_side / max(h, w)
    if s >= 1.0:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """float32 CIELAB (L* 0..100, a*/b* about -128..127) of uint8 sRGB."""
    import cv2
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Shift to min 0 and scale to max 1 (zeros if ``x`` is constant)."""
    x = x.astype(np.float32) - float(x.min())
    top = float(x.max())
    return x / top if top > 1e-12 else np.zeros_like(x)


def _upsample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2
    if x.shape == shape:
        return x.astype(np.float32)
    return cv2.resize(x.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _mask_array(mask: np.ndarray | Image.Image | None, shape: tuple[int, int], *,
                nearest: bool = False) -> np.ndarray | None:
    """``mask`` as float32 [H, W] in 0..1 at ``shape`` (uint8 and PIL masks are scaled from 0..255; bool
    masks are 0/1); resized bilinearly, or by nearest neighbour to match a nearest-sampled image."""
    import cv2
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L"))
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., -1]
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(m), 0.0, 1.0)


def _spectral_residual(channel: np.ndarray) -> np.ndarray:
    """Spectral residual saliency of one float channel (any size; computed at its own size)."""
    import cv2
    spectrum = np.fft.fft2(channel)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amp - cv2.blur(log_amp.astype(np.float32), (3, 3), borderType=cv2.BORDER_REFLECT)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    return sal.astype(np.float32)


# -------------------------------------------------------------------------------------------- saliency
def saliency_map(image: Image.Image | np.ndarray, *, mask: np.ndarray | Image.Image | None = None) -> np.ndarray:
    """Saliency, float32 ``[H, W]`` in [0, 1] at the image's size, normalised so its maximum is 1 (all zeros for
    a flat image without a mask).

    The mean of three normalised cues computed on a small copy: spectral residual on L*, a*, b* (64 px, with
    reflected padding so the image border is not mistaken for an edge), distance to the mean CIELAB colour, and
    a centre-surround difference of Gaussians (128 px). ``mask`` (float 0..1 or uint8 alpha, any size; e.g. the
    product's alpha) is merged in as salient: ``max(saliency, mask)``."""
    import cv2
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    m = _mask_array(mask, (h, w))
    lab = _lab(_shrink(rgb, CONTRAST_SIZE))
    if float(lab.reshape(-1, 3).std(axis=0).max()) < FLAT_LAB_STD:
        sal = np.zeros((h, w), np.float32)
        return sal if m is None else m.copy()
    sh, sw = lab.shape[:2]
    scale = max(sh, sw)

    # spectral residual on a square 64 px copy of the reflect-padded image (padding keeps the FFT's wrap-around
    # from lighting up the border)
    pad_y, pad_x = sh // 4, sw // 4
    padded = cv2.copyMakeBorder(lab, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_REFLECT)
    sq = cv2.resize(padded, (SR_SIZE, SR_SIZE), interpolation=cv2.INTER_AREA)
    sr = sum(_spectral_residual(sq[..., c]) for c in range(3))
    sr = cv2.GaussianBlur(sr, (0, 0), 2.0)
    sr = cv2.resize(sr, (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_LINEAR)
    sr = _normalise(sr[pad_y:pad_y + sh, pad_x:pad_x + sw])

    smooth = cv2.GaussianBlur(lab, (0, 0), max(1.0, scale / 128))
    global_contrast = _normalise(np.linalg.norm(smooth - lab.reshape(-1, 3).mean(axis=0), axis=2))
    surround = cv2.GaussianBlur(lab, (0, 0), scale / 8, borderType=cv2.BORDER_REFLECT)
    local_contrast = _normalise(np.linalg.norm(smooth - surround, axis=2))

    sal = (sr + global_contrast + local_contrast) / 3.0
    sal = _normalise(cv2.GaussianBlur(sal, (0, 0), max(1.0, scale / 64)))
    sal = _normalise(np.clip(_upsample(sal, (h, w)), 0.0, None))  # interpolation moves the peak: max 1 again
    if m is not None:
        sal = np.maximum(sal, m)
    return sal.astype(np.float32)


def sobel_magnitude(gray01: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, float32 ``[H, W]``, of a float32 gray image in 0..1: ``sqrt(gx^2 + gy^2) / 8``
    with the 3x3 Sobel kernels (the /8 makes it the slope per pixel: a ramp rising 0.01 a pixel reads 0.01, a
    hard black/white step 0.5 on the two pixels beside it; the maximum, a corner, is about 0.71)."""
    import cv2
    gx = cv2.Sobel(gray01, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(gray01, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    return (np.sqrt(gx * gx + gy * gy) / 8.0).astype(np.float32)


def _gray01(rgb: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def gradient_energy_map(image: Image.Image | np.ndarray) -> np.ndarray:
    """How busy each neighbourhood is, float32 ``[H, W]`` in [0, 1]: the Sobel magnitude (see
    :func:`sobel_magnitude` for the scale) of a copy at most 512 px long, averaged over a window of
    1/32 of the long side and divided by 0.06 (a texture that strong or stronger reads 1), clipped."""
    import cv2
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    small = _shrink(rgb, GRADIENT_SIZE)
    g = sobel_magnitude(_gray01(small))
    k = max(3, (max(small.shape[:2]) // 32) | 1)
    g = cv2.blur(g, (k, k), borderType=cv2.BORDER_REFLECT)
    return np.clip(_upsample(g / BUSY_GRADIENT, (h, w)), 0.0, 1.0)


def free_space_map(image: Image.Image | np.ndarray, saliency: np.ndarray | None = None) -> np.ndarray:
    """Calm space for text, float32 ``[H, W]`` in [0, 1]: ``(1 - saliency) * (1 - gradient energy)``, so 1 means
    nothing important and nothing busy under it. ``saliency`` defaults to :func:`saliency_map`."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    sal = saliency_map(rgb) if saliency is None else np.clip(_upsample(np.asarray(saliency), (h, w)), 0.0, 1.0)
    busy = gradient_energy_map(rgb)
    return np.clip((1.0 - sal) * (1.0 - busy), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- colour
def _hex(c: np.ndarray) -> str:
    r, g, b = (int(v) for v in np.clip(np.round(c), 0, 255))
    return f"#{r:02x}{g:02x}{b:02x}"


def _initial_centres(px: np.ndarray, k: int) -> np.ndarray:
    """Deterministic k-means seeds: the means of the most populated 4-bit-per-channel colour bins, skipping
    bins whose mean is within 24 (RGB units) of a seed already taken."""
    q = (px // 16).astype(np.int32)
    key = (q[:, 0] << 8) | (q[:, 1] << 4) | q[:, 2]
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    sums = np.zeros((uniq.size, 3), np.float64)
    np.add.at(sums, inverse.ravel(), px)
    means = sums / counts[:, None]
    centres: list[np.ndarray] = []
    for i in np.argsort(-counts, kind="stable"):
        if all(np.linalg.norm(means[i] - c) >= 24.0 for c in centres):
            centres.append(means[i])
        if len(centres) == k:
            break
    return np.asarray(centres, np.float32)


def dominant_colors(image: Image.Image | np.ndarray, k: int = 5, *,
                    mask: np.ndarray | Image.Image | None = None) -> list[ColorShare]:
    """The ``k`` (at most) dominant colours: ``[{"hex": "#rrggbb", "share": float}, ...]``, largest share first,
    shares summing to 1.

    k-means (``cv2.kmeans``, seeded deterministically) on a copy at most 96 px long sampled without blending
    (edge pixels are not new colours); an image with at most ``k`` distinct colours is counted exactly.
    Centres closer than 12 RGB units are merged. ``mask`` (alpha) restricts it to pixels with mask > 0.5,
    e.g. the product's own colours."""
    import cv2
    if k < 1:
        raise ValueError("k must be at least 1")
    rgb = _rgb(image)
    small = _shrink(rgb, PALETTE_SIZE, nearest=True)
    px = small.reshape(-1, 3)
    m = _mask_array(mask, small.shape[:2], nearest=True)
    if m is not None:
        px = px[m.reshape(-1) > 0.5]
        if px.size == 0:
            return []
    key = (px[:, 0].astype(np.int64) << 16) | (px[:, 1].astype(np.int64) << 8) | px[:, 2]
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    if uniq.size <= k:
        centres = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float32)
        weights = counts.astype(np.float64)
    else:
        data = px.astype(np.float32)
        init = _initial_centres(data, k)
        dist = ((data[:, None, :] - init[None, :, :]) ** 2).sum(axis=2)
        labels = dist.argmin(axis=1).astype(np.int32).reshape(-1, 1)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.25)
        _, labels, centres = cv2.kmeans(data, len(init), labels, criteria, 1, cv2.KMEANS_USE_INITIAL_LABELS)
        weights = np.bincount(labels.ravel(), minlength=len(centres)).astype(np.float64)
    # merge near-duplicate centres (largest first absorbs the rest)
    order = np.argsort(-weights, kind="stable")
    merged: list[tuple[np.ndarray, float]] = []
    for i in order:
        if weights[i] <= 0:
            continue
        for j, (c, wt) in enumerate(merged):
            if np.linalg.norm(c - centres[i]) < 12.0:
                merged[j] = ((c * wt + centres[i] * weights[i]) / (wt + weights[i]), wt + weights[i])
                break
        else:
            merged.append((centres[i].astype(np.float64), float(weights[i])))
    total = sum(wt for _, wt in merged)
    out = [ColorShare(hex=_hex(c), share=wt / total) for c, wt in merged]
    out.sort(key=lambda d: -d["share"])
    return out


def _warm_cool(image: Image.Image | np.ndarray) -> tuple[float, float]:
    """(temperature in -1..1: chroma-weighted share of warm minus cool hues, mean chroma)."""
    lab = _lab(_shrink(_rgb(image), CONTRAST_SIZE)).reshape(-1, 3)
    a, b = lab[:, 1].astype(np.float64), lab[:, 2].astype(np.float64)
    chroma = np.hypot(a, b)
    hue = np.degrees(np.arctan2(b, a)) % 360.0
    # CIELAB hue: red ~40, orange ~60, yellow ~100, green ~135, cyan ~200, blue ~300, magenta ~330
    warm = (hue < 110.0) | (hue >= 345.0)
    cool = (hue >= 130.0) & (hue < 315.0)
    total = float(chroma.sum())
    if total <= 1e-9:
        return 0.0, 0.0
    return float((chroma[warm].sum() - chroma[cool].sum()) / total), float(chroma.mean())


def tone(image: Image.Image | np.ndarray) -> Tone:
    """'warm' (reds, oranges, yellows dominate), 'cool' (greens, cyans, blues, violets) or 'neutral' (greyish,
    mean CIELAB chroma under 8, or no clear majority: the chroma-weighted warm/cool balance within +-0.25)."""
    temperature, chroma = _warm_cool(image)
    if chroma < 8.0 or abs(temperature) < 0.25:
        return "neutral"
    return "warm" if temperature > 0 else "cool"


def brightness(image: Image.Image | np.ndarray) -> float:
    """Mean CIELAB lightness L*/100 (0 black .. 1 white), perceptual rather than linear."""
    lab = _lab(_shrink(_rgb(image), CONTRAST_SIZE))
    return float(np.clip(lab[..., 0].mean() / 100.0, 0.0, 1.0))


# ----------------------------------------------------------------------------------------- copy regions
# (width / height) of candidate windows: banner-like lines to a squarish block and a column
REGION_ASPECTS = (4.0, 2.5, 1.6, 1.0, 0.6)
REGION_AREAS = (0.05, 0.08, 0.12, 0.18, 0.25)


def copy_regions(image: Image.Image | np.ndarray, saliency: np.ndarray | None = None, n: int = 3,
                 min_frac: float = 0.04) -> list[CopyRegion]:
    """Up to ``n`` calm, non-overlapping boxes for text, best first: ``[{"box": [x0, y0, x1, y1], "score": s}]``.

    Windows of aspect ratios 4:1 to 3:5 and areas from ``max(min_frac, 5%)`` to 25% of the image slide over a
    grid of 64 cells along the long side; each is scored ``1 - (mean saliency + mean gradient energy) / 2`` (1 = perfectly calm; see
    :func:`saliency_map`, :func:`gradient_energy_map`). Ranking adds a small bonus for area (0.15 per unit of
    image fraction) so a bigger box wins over a slightly calmer sliver; boxes are then taken greedily,
    skipping any that overlap one already taken
    (sharing an edge is allowed). ``saliency`` defaults to :func:`saliency_map`."""
    import cv2
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    sal = saliency_map(rgb) if saliency is None else np.clip(_upsample(np.asarray(saliency), (h, w)), 0.0, 1.0)
    cost_full = sal + gradient_energy_map(rgb)
    s = REGION_GRID / max(h, w)
    gh, gw = max(1, round(h * s)), max(1, round(w * s))
    cost = cv2.resize(cost_full, (gw, gh), interpolation=cv2.INTER_AREA).astype(np.float64)
    integral = np.zeros((gh + 1, gw + 1), np.float64)
    integral[1:, 1:] = cost.cumsum(0).cumsum(1)

    # every window position of every shape, as flat arrays: rank, score, x0, y0, x1, y1 (grid cells)
    parts: list[np.ndarray] = []
    areas = sorted({a for a in REGION_AREAS if a >= min_frac} | {max(min_frac, REGION_AREAS[0])})
    for aspect in REGION_ASPECTS:
        for frac in areas:
            # the window in full-image pixels for this area fraction and aspect, then in grid cells
            ww = np.sqrt(frac * w * h * aspect)
            wh = ww / aspect
            cw, ch = max(1, round(ww * s)), max(1, round(wh * s))
            if ww > w * 1.001 or wh > h * 1.001 or cw > gw or ch > gh:
                continue
            sums = integral[ch:, cw:] - integral[:-ch, cw:] - integral[ch:, :-cw] + integral[:-ch, :-cw]
            score = 1.0 - sums / (cw * ch) / 2.0
            ys, xs = np.mgrid[0:score.shape[0], 0:score.shape[1]]
            rank = score + 0.15 * (cw * ch) / (gw * gh)
            parts.append(np.stack([rank.ravel(), score.ravel(), xs.ravel(), ys.ravel(),
                                   xs.ravel() + cw, ys.ravel() + ch], axis=1))
    if not parts:
        return []
    cand = np.concatenate(parts)
    cand = cand[np.argsort(-cand[:, 0], kind="stable")]
    alive = np.ones(len(cand), bool)
    chosen: list[np.ndarray] = []
    while len(chosen) < n and alive.any():
        c = cand[int(np.argmax(alive))]  # the best one still alive (cand is sorted)
        chosen.append(c)
        overlap = (cand[:, 2] < c[4]) & (c[2] < cand[:, 4]) & (cand[:, 3] < c[5]) & (c[3] < cand[:, 5])
        alive &= ~overlap
    out: list[CopyRegion] = []
    for _, score, x0, y0, x1, y1 in chosen:
        box = [min(w, round(x0 / s)), min(h, round(y0 / s)), min(w, round(x1 / s)), min(h, round(y1 / s))]
        if x1 >= gw:  # grid rounding must not leave a sliver at the far edge
            box[2] = w
        if y1 >= gh:
            box[3] = h
        out.append(CopyRegion(box=[int(v) for v in box], score=round(float(np.clip(score, 0.0, 1.0)), 4)))
    return out


# ------------------------------------------------------------------------------------------------ bundle
def analyze(image: Image.Image | np.ndarray, *, mask: np.ndarray | Image.Image | None = None,
            k: int = 5, n_regions: int = 3) -> tuple[Analysis, dict[str, np.ndarray]]:
    """Measure ``image``: (:class:`Analysis`, ``{"saliency": map, "free_space": map}``), maps float32 ``[H, W]``
    in [0, 1]. ``mask`` (the product's alpha) is merged into the saliency, so copy regions avoid the product."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    sal = saliency_map(rgb, mask=mask)
    free = free_space_map(rgb, saliency=sal)
    result = Analysis(width=w, height=h, dominant_colors=dominant_colors(rgb, k), tone=tone(rgb),
                      brightness=round(brightness(rgb), 4), copy_regions=copy_regions(rgb, sal, n=n_regions))
    return result, {"saliency": sal, "free_space": free}


def save_maps(maps: dict[str, np.ndarray], folder: str | os.PathLike[str]) -> dict[str, str]:
    """Write each map (float 0..1) as an 8-bit grayscale PNG ``<folder>/<name>.png``; returns name -> path."""
    from ..core.imageio import save_png_atomic
    folder = Path(folder)
    paths: dict[str, str] = {}
    for name, arr in maps.items():
        if not name or any(ch in name for ch in "/\\\0") or name in (".", ".."):
            raise ValueError(f"map name {name!r} cannot be a file name")
        a = np.asarray(arr, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"map {name!r} must be [H, W], not {a.shape}")
        img = Image.fromarray(np.clip(np.round(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8), "L")
        paths[name] = str(save_png_atomic(img, folder / f"{name}.png"))
    return paths
