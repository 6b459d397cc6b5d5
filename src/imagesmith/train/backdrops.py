"""Procedural backdrops for the house dataset: plain colours, two-colour gradients and surface textures
(wood, marble, linen, concrete, brick, terrazzo), made with numpy and OpenCV from a seeded generator.

``make_backdrop(kind, size, rng)`` returns ``(PIL RGB image, phrase)`` where the phrase names what a person
would see, with its article: ``'a pale blue backdrop'``, ``'a pink to orange gradient'``, ``'a wooden
table'``, ``'a white marble surface'``, ``'a beige linen cloth'``, ``'a grey concrete wall'``. Colours are
named from the small table :data:`BACKDROP_COLOURS`. Feature sizes scale with ``size``, so a backdrop looks
the same at 64, 128 or 512 pixels; the same ``rng`` state gives the same pixels.

Nothing here is module-level mutable state: the tables are tuples of frozen dataclasses.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..vision.colours import BACKDROP_COLOURS, NamedColour  # noqa: F401 - the named colours live with the captioner

BACKDROP_KINDS: tuple[str, ...] = ("plain", "gradient", "wood", "marble", "linen", "concrete", "brick",
                                   "terrazzo")

# surfaces an object stands on take 'on'; walls and gradients stand behind it
_PREPOSITIONS: tuple[tuple[str, str], ...] = (
    ("plain", "on"), ("gradient", "against"), ("wood", "on"), ("marble", "on"), ("linen", "on"),
    ("concrete", "against"), ("brick", "against"), ("terrazzo", "on"),
)



# gradient ends: the brighter, clearly distinct colours (a 'white to off-white' gradient reads as plain)
_GRADIENT_NAMES: tuple[str, ...] = ("white", "pale blue", "sky blue", "navy blue", "teal", "mint green",
                                    "pale yellow", "peach", "orange", "pink", "coral", "lavender", "purple",
                                    "red", "mustard yellow", "light grey", "charcoal")


def backdrop_preposition(kind: str) -> str:
    """'on' for surfaces an object stands on (a wooden table), 'against' for walls and gradients."""
    for k, prep in _PREPOSITIONS:
        if k == kind:
            return prep
    raise ValueError(f"unknown backdrop kind {kind!r}; known: {', '.join(BACKDROP_KINDS)}")


def article(word: str) -> str:
    """'a' or 'an' before ``word`` (colour names here all follow the plain vowel rule)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def colour_by_name(name: str) -> NamedColour:
    for c in BACKDROP_COLOURS:
        if c.name == name:
            return c
    raise KeyError(name)


# ------------------------------------------------------------------------------------------- noise
def _value_noise(h: int, w: int, cells_y: float, cells_x: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish: a random grid of ``cells_y x cells_x`` values, bicubically enlarged."""
    gy, gx = max(2, int(round(cells_y)) + 3), max(2, int(round(cells_x)) + 3)
    grid = rng.standard_normal((gy, gx)).astype(np.float32)
    # enlarge a little beyond the frame and crop a random window so cell edges do not line up with it
    big = cv2.resize(grid, (int(w * gx / max(cells_x, 1)), int(h * gy / max(cells_y, 1))),
                     interpolation=cv2.INTER_CUBIC)
    oy = int(rng.integers(0, max(1, big.shape[0] - h)))
    ox = int(rng.integers(0, max(1, big.shape[1] - w)))
    return big[oy:oy + h, ox:ox + w]


def fbm(h: int, w: int, rng: np.random.Generator, *, cells: float = 3.0, octaves: int = 4,
        persistence: float = 0.5, stretch: float = 1.0) -> np.ndarray:
    """Fractal noise (sum of value-noise octaves), normalised to zero mean and unit std. ``stretch`` > 1
    makes features longer along x (wood grain, linen slubs)."""
    out = np.zeros((h, w), np.float32)
    amp, c = 1.0, cells
    for _ in range(octaves):
        out += amp * _value_noise(h, w, c, max(1.0, c / stretch), rng)
        amp *= persistence
        c *= 2.0
    out -= out.mean()
    return out / (out.std() + 1e-6)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 8.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0.0, amount, 3), 0, 255)


def _dither(img: np.ndarray, rng: np.random.Generator, amount: float = 1.2) -> np.ndarray:
    """Float RGB 0..255 -> uint8 with a little noise, so smooth ramps do not band."""
    return np.clip(img + rng.normal(0.0, amount, img.shape[:2])[..., None], 0, 255).astype(np.uint8)


def _light(size: int, rng: np.random.Generator, strength: float = 0.08) -> np.ndarray:
    """A soft studio light: brightest near a random point in the upper half, falling off to the corners."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.5)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return (1.0 + strength * 0.5 - strength * d / d.max())[..., None]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(0, len(options)))]


# ----------------------------------------------------------------------------------------- backdrops
def _plain(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    c = _pick(rng, BACKDROP_COLOURS)
    img = np.broadcast_to(_jitter(c.rgb, rng, 4.0), (size, size, 3)) * _light(size, rng, 0.10)
    return img, f"{article(c.name)} {c.name} backdrop"


def _gradient(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    names = list(_GRADIENT_NAMES)
    a = colour_by_name(_pick(rng, names))
    while True:
        b = colour_by_name(_pick(rng, names))
        if np.abs(np.subtract(a.rgb, b.rgb)).sum() > 140:
            break
    angle = rng.uniform(-0.6, 0.6) + (np.pi / 2 if rng.random() < 0.7 else 0.0)  # mostly top to bottom
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    t = t * t * (3 - 2 * t)  # smoothstep: a calm middle
    # mix in linear light so a pink-to-blue middle is not muddy
    la = (np.asarray(a.rgb, np.float32) / 255.0) ** 2.2
    lb = (np.asarray(b.rgb, np.float32) / 255.0) ** 2.2
    lin = la * (1 - t[..., None]) + lb * t[..., None]
    return 255.0 * lin ** (1 / 2.2), f"{article(a.name)} {a.name} to {b.name} gradient"


_WOODS: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    # phrase, light tone, dark tone (grain)
    ("a light wooden table", (222, 186, 140), (186, 140, 92)),
    ("a wooden table", (184, 128, 78), (128, 78, 40)),
    ("a dark wooden table", (110, 70, 44), (62, 36, 22)),
    ("a white-washed wooden table", (228, 220, 206), (190, 176, 156)),
)


def _wood(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, light, dark = _pick(rng, _WOODS)
    light_c, dark_c = _jitter(light, rng, 6.0), _jitter(dark, rng, 6.0)
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    # planks run left to right; a table seen from the front-ish, boards 1/4 to 1/3 of the frame
    shift = int(rng.integers(0, size // 5))
    edges = [0]
    while edges[-1] - shift < size:
        edges.append(edges[-1] + max(2, int(size * rng.uniform(0.22, 0.34))))
    edges = [max(0, e - shift) for e in edges]
    seam = np.zeros((size, size), np.float32)
    for top, bottom in zip(edges[:-1], edges[1:]):
        bottom = min(bottom, size)
        if bottom <= top:
            continue
        h = bottom - top
        warp = fbm(h, size, rng, cells=2.0, octaves=3, stretch=6.0)
        rings = np.sin((yy[top:bottom] * size / max(size * 0.018, 1.0)) * rng.uniform(0.8, 1.4)
                       + warp * rng.uniform(2.5, 4.5) + rng.uniform(0, 6.28))
        grain = 0.5 + 0.5 * rings
        streaks = fbm(h, size, rng, cells=size / 6, octaves=2, stretch=12.0)
        t = np.clip(0.55 * grain ** 1.5 + 0.12 * streaks + rng.uniform(-0.08, 0.08) + 0.1, 0, 1)
        img[top:bottom] = light_c * (1 - t[..., None]) + dark_c * t[..., None]
        img[top:bottom] *= rng.uniform(0.93, 1.05)
        seam[min(bottom, size) - 1] = 1.0
    seam = cv2.GaussianBlur(seam, (0, 0), max(0.5, size / 256))
    img *= (1.0 - 0.45 * np.clip(seam / (seam.max() + 1e-6), 0, 1))[..., None]
    return img * _light(size, rng, 0.12), phrase


_MARBLES: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    ("a white marble surface", (236, 234, 230), (140, 140, 146)),
    ("a white marble surface", (240, 238, 235), (172, 160, 140)),
    ("a grey marble surface", (170, 170, 172), (80, 80, 84)),
    ("a black marble surface", (36, 36, 38), (200, 200, 196)),
    ("a green marble surface", (40, 84, 64), (196, 214, 200)),
    ("a pink marble surface", (232, 200, 196), (160, 120, 120)),
)


def _marble(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, base, vein = _pick(rng, _MARBLES)
    # brightness jitter only: a tinted 'black marble' reads as purple
    base_c = np.asarray(base, np.float32) * rng.uniform(0.96, 1.03)
    vein_c = np.asarray(vein, np.float32) * rng.uniform(0.94, 1.04)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = base_c
    img *= (1.0 + 0.035 * fbm(size, size, rng, cells=2.0, octaves=4))[..., None]
    # veins: where a turbulence-warped sine crosses zero, a sharp line with a soft halo; three layers
    # running roughly the same way, from one bold vein to faint hairlines, each fading in and out
    direction = rng.uniform(0, np.pi)
    layers = ((24, 0.8, (0.6, 1.1), (0.12, 0.2)), (50, 0.45, (1.2, 2.0), (0.15, 0.25)),
              (90, 0.3, (2.0, 3.0), (0.2, 0.3)))
    for power, strength, freq, amp in layers:
        th = direction + rng.uniform(-0.5, 0.5)
        t = xx * np.cos(th) + yy * np.sin(th)
        warp = fbm(size, size, rng, cells=1.5, octaves=4, persistence=0.55)
        v = 1.0 - np.abs(np.sin(2 * np.pi * (t * rng.uniform(*freq) + warp * rng.uniform(*amp))))
        fade = np.clip(0.5 + 0.6 * fbm(size, size, rng, cells=2.0, octaves=2), 0, 1)
        a = np.clip((0.75 * v ** power + 0.2 * v ** 5) * fade * strength, 0, 1)[..., None]
        img = img * (1 - a) + vein_c * a
    return img * _light(size, rng, 0.08), phrase


_LINENS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("a beige linen cloth", (214, 196, 168)),
    ("a white linen cloth", (236, 233, 226)),
    ("a grey linen cloth", (168, 168, 166)),
    ("a sage green linen cloth", (156, 174, 146)),
    ("a blue linen cloth", (120, 146, 176)),
    ("a pink linen cloth", (226, 184, 186)),
)


def _linen(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, base = _pick(rng, _LINENS)
    base_c = _jitter(base, rng, 5.0)
    # threads: each row and each column a slightly different shade, varying slowly along its length (slubs)
    pitch = max(1.0, size / 96.0)
    n = int(size / pitch) + 2
    rows = cv2.resize(rng.standard_normal((n, max(2, size // 24))).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_LINEAR)
    cols = cv2.resize(rng.standard_normal((max(2, size // 24), n)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_LINEAR)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    weave = np.where(((np.floor(yy / pitch) + np.floor(xx / pitch)) % 2) == 0, rows, cols)
    weave = cv2.GaussianBlur(weave, (0, 0), 0.5 * pitch)
    folds = fbm(size, size, rng, cells=1.6, octaves=3, persistence=0.45)
    shade = 1.0 + 0.07 * weave + 0.06 * folds
    img = base_c * shade[..., None]
    return img * _light(size, rng, 0.10), phrase


_CONCRETES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("a grey concrete wall", (150, 150, 148)),
    ("a light grey concrete wall", (190, 189, 185)),
    ("a dark grey concrete wall", (92, 92, 92)),
    ("a beige concrete wall", (184, 172, 152)),
)


def _concrete(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, base = _pick(rng, _CONCRETES)
    base_c = np.asarray(base, np.float32) * rng.uniform(0.95, 1.05)  # stays neutral: no tint
    mottle = fbm(size, size, rng, cells=3.0, octaves=5, persistence=0.6)
    grain = rng.standard_normal((size, size)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 0.6 * size / 128)
    shade = 1.0 + 0.07 * mottle + 0.05 * grain / (grain.std() + 1e-6)
    # pores: small dark pits
    pits = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(size // 8, size // 3))):
        cv2.circle(pits, (int(rng.integers(0, size)), int(rng.integers(0, size))),
                   max(1, int(rng.uniform(0.3, 1.2) * size / 128)), 1.0, -1, lineType=cv2.LINE_AA)
    pits = cv2.GaussianBlur(pits, (0, 0), 0.4 * size / 128)
    shade *= 1.0 - 0.35 * pits
    img = base_c * shade[..., None]
    return img * _light(size, rng, 0.12), phrase


_BRICKS: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    # phrase, brick colour, mortar colour
    ("a red brick wall", (158, 70, 52), (196, 190, 180)),
    ("a brown brick wall", (120, 78, 58), (176, 168, 156)),
    ("a white brick wall", (222, 220, 214), (196, 194, 188)),
    ("a grey brick wall", (128, 128, 130), (190, 190, 186)),
)


def _brick(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, brick, mortar = _pick(rng, _BRICKS)
    brick_c, mortar_c = _jitter(brick, rng, 6.0), np.asarray(mortar, np.float32)
    row_h = size * rng.uniform(0.085, 0.11)
    brick_w = row_h * rng.uniform(2.3, 2.8)
    joint = max(1.0, size / 110.0)
    spread = 0.04 if min(brick) > 200 else 0.13  # painted bricks vary less than fired ones
    img = np.empty((size, size, 3), np.float32)
    img[:] = mortar_c
    mortar_mask = np.ones((size, size), np.float32)
    y0 = -rng.uniform(0, row_h)
    r = 0
    while y0 < size:
        x0 = -rng.uniform(0, brick_w) if r == 0 else ((r % 2) * 0.5 * brick_w) - brick_w
        while x0 < size:
            tone = brick_c * rng.uniform(1.0 - spread, 1.0 + spread * 0.7) + rng.normal(0, 2, 3)
            ya, yb = int(round(y0 + joint / 2)), int(round(y0 + row_h - joint / 2))
            xa, xb = int(round(x0 + joint / 2)), int(round(x0 + brick_w - joint / 2))
            ya, yb, xa, xb = max(ya, 0), min(yb, size), max(xa, 0), min(xb, size)
            if yb > ya and xb > xa:
                img[ya:yb, xa:xb] = np.clip(tone, 0, 255)
                mortar_mask[ya:yb, xa:xb] = 0.0
            x0 += brick_w
        y0 += row_h
        r += 1
    texture = fbm(size, size, rng, cells=size / 10, octaves=2)
    img *= (1.0 + 0.5 * spread * texture * (1 - mortar_mask))[..., None]
    # soften the joints a little and shade the brick edges next to them
    soft = cv2.GaussianBlur(mortar_mask, (0, 0), max(0.5, size / 200))
    img *= (1.0 - 0.12 * np.clip(soft - mortar_mask, 0, 1))[..., None]
    img = cv2.GaussianBlur(img, (0, 0), max(0.35, size / 300))
    return img * _light(size, rng, 0.14), phrase


_TERRAZZOS: tuple[tuple[str, tuple[int, int, int], tuple[tuple[int, int, int], ...]], ...] = (
    ("a white terrazzo surface", (236, 233, 228),
     ((200, 90, 70), (90, 120, 160), (220, 180, 120), (60, 60, 60), (170, 170, 170))),
    ("a pink terrazzo surface", (238, 206, 200),
     ((190, 80, 90), (250, 250, 245), (120, 100, 100), (230, 160, 120))),
    ("a grey terrazzo surface", (176, 176, 174),
     ((240, 240, 236), (60, 60, 62), (200, 170, 130), (110, 130, 150))),
)


def _terrazzo(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    phrase, base, chips = _pick(rng, _TERRAZZOS)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(base, np.float32) * rng.uniform(0.96, 1.03)
    img *= (1.0 + 0.03 * fbm(size, size, rng, cells=3.0))[..., None]
    canvas = img.copy()
    # chip sizes scale with the frame, so the count does not depend on ``size``
    for _ in range(int(110 * rng.uniform(0.7, 1.2))):
        r = size * rng.uniform(0.006, 0.03)
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        k = int(rng.integers(4, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = r * rng.uniform(0.55, 1.0, k)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        colour = np.clip(np.asarray(_pick(rng, chips), np.float32) + rng.normal(0, 8, 3), 0, 255)
        cv2.fillPoly(canvas, [np.round(pts * 4).astype(np.int32)], colour.tolist(), lineType=cv2.LINE_AA,
                     shift=2)
    return canvas * _light(size, rng, 0.08), phrase


_MAKERS = (("plain", _plain), ("gradient", _gradient), ("wood", _wood), ("marble", _marble),
           ("linen", _linen), ("concrete", _concrete), ("brick", _brick), ("terrazzo", _terrazzo))


def make_backdrop(kind: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A ``size x size`` RGB backdrop of ``kind`` (one of :data:`BACKDROP_KINDS`) and the phrase naming it."""
    for k, maker in _MAKERS:
        if k == kind:
            img, phrase = maker(int(size), rng)
            return Image.fromarray(_dither(np.asarray(img, np.float32), rng), "RGB"), phrase
    raise ValueError(f"unknown backdrop kind {kind!r}; known: {', '.join(BACKDROP_KINDS)}")
