"""Crisp studio scenes at the ad's full resolution, built from the concept's words: a surface, a wall, light.

A checkpoint that cannot paint the concept at the ad's size (the shipped house-ldm paints 128 px and knows eight
backdrop kinds) gave every concept the same beige blur once upscaled. A product shot on a real set is mostly a
surface, a wall and light; those can be built exactly, at any size, from a few words of the concept:

- **materials**: marble, wood, linen, concrete, terrazzo, paper, plain, gradient, bokeh (and scene words that
  imply them: a bathroom shelf is white marble against pale tiles, a cafe counter is wood against warm bokeh);
- **colours** named in the concept (the captioner's colour table): the first tints the wall, a second the surface;
- **light**: its side (left, right, above), its warmth (morning, golden, warm, cozy / cool, night), its hardness
  (soft / dramatic); the wall falls off away from the light, the surface darkens towards the back, and a soft
  ambient-occlusion band sits where they meet;
- **gloss**: marble, glass, lacquer, mirror, glossy or polished surfaces ask the composite for a reflection.

:func:`plan_scene` turns a concept into a :class:`ScenePlan` (what was understood, shown in the manifest);
:func:`render_scene` draws it at ``(width, height)`` around the product's box (the wall meets the surface a little
above the product's base, so it stands on the surface). Deterministic in the seed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from PIL import Image

from ..train.backdrops import fbm
from ..vision.colours import BACKDROP_COLOURS

SURFACES = ("marble", "wood", "linen", "concrete", "terrazzo", "paper", "plain")
WALLS = ("plain", "paper", "gradient", "concrete", "bokeh", "linen", "tiles")

# material words -> (where, material)
_MATERIAL_WORDS: tuple[tuple[str, str, str], ...] = (
    (r"marble", "surface", "marble"), (r"wood(en)?|oak|walnut|timber|plank", "surface", "wood"),
    (r"linen|cloth|fabric|cotton|tablecloth", "surface", "linen"), (r"terrazzo", "surface", "terrazzo"),
    (r"concrete|cement|stone|slate", "surface", "concrete"), (r"paper|seamless", "wall", "paper"),
    (r"gradient", "wall", "gradient"), (r"bokeh|fairy lights|string lights|city lights|blurred lights", "wall", "bokeh"),
    (r"tiles?|tiled", "wall", "tiles"), (r"plaster|wall", "wall", "plain"),
)
# scene words -> (surface, wall, warmth) defaults when no material is named
_SCENES: tuple[tuple[str, str, str, float], ...] = (
    (r"bathroom|spa|vanity", "marble", "tiles", 0.0), (r"cafe|coffee shop|bistro|bar|counter", "wood", "bokeh", 0.6),
    (r"kitchen", "marble", "plain", 0.2), (r"desk|office|workspace", "wood", "plain", 0.0),
    (r"beach|sand|summer", "concrete", "gradient", 0.5), (r"night|evening|party|festive|christmas", "wood", "bokeh", 0.5),
    (r"studio|minimal|clean", "plain", "paper", 0.0), (r"garden|outdoor|nature|forest", "wood", "bokeh", 0.2),
    (r"luxury|elegant|premium", "marble", "gradient", 0.1),
)
_DEFAULT_COLOURS = {  # material -> (light tone, dark tone) in sRGB
    "marble": ((236, 234, 230), (150, 150, 156)), "wood": ((184, 132, 86), (122, 78, 44)),
    "linen": ((222, 212, 194), (186, 174, 152)), "concrete": ((176, 174, 170), (132, 130, 128)),
    "terrazzo": ((232, 226, 216), (170, 120, 96)), "paper": ((238, 236, 232), (214, 212, 208)),
    "plain": ((226, 222, 216), (200, 196, 190)), "gradient": ((238, 232, 224), (196, 204, 216)),
    "bokeh": ((70, 56, 48), (240, 200, 140)), "tiles": ((232, 236, 238), (206, 212, 216)),
}
_GLOSSY = r"marble|glass|lacquer|mirror|glossy|polished|reflective|acrylic"


@dataclass(frozen=True)
class ScenePlan:
    surface: str
    wall: str
    wall_colour: tuple[int, int, int] | None
    surface_colour: tuple[int, int, int] | None
    light_x: float  # 0 = light from the left, 1 = from the right
    warmth: float  # -1 cool .. +1 warm
    hardness: float  # 0 soft .. 1 dramatic
    glossy: bool
    words: tuple[str, ...]  # what was understood

    def describe(self) -> dict:
        return asdict(self)


def _find(pattern: str, text: str) -> bool:
    return re.search(rf"\b(?:{pattern})\b", text) is not None


def plan_scene(concept: str) -> ScenePlan:
    """What the concept asks for, in the terms :func:`render_scene` draws."""
    text = concept.lower()
    words: list[str] = []
    surface = wall = None
    for pattern, where, material in _MATERIAL_WORDS:
        m = re.search(rf"\b(?:{pattern})\b", text)
        if m:
            if where == "surface" and surface is None:
                surface = material
                words.append(m.group(0))
            elif where == "wall" and wall is None:
                wall = material
                words.append(m.group(0))
    warmth = 0.0
    for pattern, s_mat, w_mat, warm in _SCENES:
        m = re.search(rf"\b(?:{pattern})\b", text)
        if m:
            surface = surface or s_mat
            wall = wall or w_mat
            warmth = warm
            words.append(m.group(0))
            break
    surface, wall = surface or "plain", wall or "paper"
    colours: list[tuple[int, int, int]] = []
    for c in sorted(BACKDROP_COLOURS, key=lambda c: -len(c.name)):  # 'pale blue' before 'blue'
        if _find(re.escape(c.name), text) and not any(c.name in w for w in words):
            colours.append((text.index(c.name), c.rgb, c.name))  # type: ignore[arg-type]
            words.append(c.name)
            text = text.replace(c.name, " " * len(c.name))
    colours.sort()
    rgb = [tuple(int(v) for v in c[1]) for c in colours]
    low = concept.lower()
    light_x = 0.5
    if _find(r"(from|on) the left|left[- ]lit|window (on the )?left", low):
        light_x = 0.1
        words.append("light from the left")
    elif _find(r"(from|on) the right|right[- ]lit|window (on the )?right", low):
        light_x = 0.9
        words.append("light from the right")
    if _find(r"warm|morning|golden|sunset|sunrise|cozy|cosy|candle|amber", low):
        warmth = max(warmth, 0.7)
        words.append("warm light")
    elif _find(r"cool|cold|blue hour|icy|winter", low):
        warmth = -0.6
        words.append("cool light")
    hardness = 0.35
    if _find(r"soft|diffuse[d]?|gentle|airy", low):
        hardness = 0.15
        words.append("soft")
    elif _find(r"dramatic|hard|moody|contrast|spotlight", low):
        hardness = 0.8
        words.append("dramatic")
    return ScenePlan(surface=surface, wall=wall, wall_colour=rgb[0] if rgb else None,
                     surface_colour=rgb[1] if len(rgb) > 1 else None, light_x=light_x, warmth=warmth,
                     hardness=hardness, glossy=_find(_GLOSSY, low), words=tuple(words))


# ------------------------------------------------------------------------------------------ materials
def _tones(material: str, colour: tuple[int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    light, dark = (np.asarray(c, np.float32) for c in _DEFAULT_COLOURS[material])
    if colour is not None:  # keep the material's contrast, move it to the named colour
        c = np.asarray(colour, np.float32)
        ratio = dark / np.maximum(light, 1)
        light, dark = c, c * ratio
    return light, dark


def _mix(light: np.ndarray, dark: np.ndarray, t: np.ndarray) -> np.ndarray:
    return light[None, None] * (1 - t[..., None]) + dark[None, None] * t[..., None]


def _material(material: str, h: int, w: int, colour, rng: np.random.Generator) -> np.ndarray:
    """float RGB 0..255 [h, w, 3] of a flat (unlit, unwarped) material."""
    light, dark = _tones(material, colour)
    scale = max(h, w) / 512.0
    if material == "marble":
        n = fbm(h, w, rng, cells=3, octaves=5)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(-0.8, 0.8)
        t = (xx * np.cos(ang) + yy * np.sin(ang)) / (90 * scale) + 1.6 * n
        fine = (xx * np.cos(ang + 0.7) + yy * np.sin(ang + 0.7)) / (37 * scale) + 2.4 * fbm(h, w, rng, cells=5, octaves=5)
        veins = (np.exp(-np.abs(np.sin(t * np.pi)) * 28) * 0.5 + np.exp(-np.abs(np.sin(fine * np.pi)) * 60) * 0.3
                 + 0.05 * fbm(h, w, rng, cells=12, octaves=3))
        return _mix(light, dark, np.clip(veins, 0, 1))
    if material == "wood":
        n = fbm(h, w, rng, cells=4, octaves=4, stretch=8)
        yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
        rings = 0.5 + 0.5 * np.sin((yy / (11 * scale) + 3.0 * n) * np.pi)
        planks = (np.mod(yy, 128 * scale) < 2 * scale).astype(np.float32) * 0.6
        return _mix(light, dark, np.clip(0.55 * rings ** 2 + 0.25 * (n * 0.5 + 0.5) + planks, 0, 1))
    if material == "linen":
        warp = fbm(h, w, rng, cells=60, octaves=2, stretch=8)
        weft = fbm(w, h, rng, cells=60, octaves=2, stretch=8).T
        return _mix(light, dark, np.clip(0.45 + 0.16 * warp + 0.16 * weft, 0, 1))
    if material == "concrete":
        t = 0.45 + 0.22 * fbm(h, w, rng, cells=6, octaves=6)
        speck = (rng.random((h, w)) < 0.004).astype(np.float32)
        return _mix(light, dark, np.clip(t + 0.5 * cv2.GaussianBlur(speck, (0, 0), 0.8 * scale + 0.3), 0, 1))
    if material == "terrazzo":
        img = _mix(light, light * 0.97, 0.5 + 0.1 * fbm(h, w, rng, cells=8, octaves=3))
        chips = rng.integers(0, 6, size=(int(0.0012 * h * w / max(scale, 0.5) ** 2) + 20,))
        palette = [dark, np.array([90, 110, 130], np.float32), np.array([210, 170, 120], np.float32),
                   np.array([60, 60, 64], np.float32), dark * 0.8, np.array([180, 90, 80], np.float32)]
        for k in chips:
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.uniform(2, 9) * scale) + 1
            pts = np.array([[cx + r * np.cos(a), cy + r * np.sin(a)] for a in np.sort(rng.uniform(0, 2 * np.pi, 5))],
                           np.int32)
            cv2.fillPoly(img, [pts], tuple(float(v) for v in palette[int(k)]), lineType=cv2.LINE_AA)
        return img
    if material == "paper":
        return _mix(light, dark, np.clip(0.15 + 0.05 * fbm(h, w, rng, cells=60, octaves=2), 0, 1))
    if material == "gradient":
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
        return _mix(light, dark, t * t * (3 - 2 * t))
    if material == "tiles":
        img = _mix(light, dark, np.clip(0.2 + 0.05 * fbm(h, w, rng, cells=10, octaves=2), 0, 1))
        step = int(96 * scale) + 8
        grout = np.zeros((h, w), np.float32)
        grout[::step, :] = grout[:, ::step] = 1.0
        grout = cv2.GaussianBlur(cv2.dilate(grout, np.ones((2, 2), np.uint8)), (0, 0), 0.8)
        return img * (1 - 0.18 * grout[..., None])
    if material == "bokeh":
        base, glow = light, dark
        img = _mix(base * 1.2, base * 0.7, np.linspace(0, 1, h, dtype=np.float32)[:, None] * np.ones((1, w)))
        lights = np.zeros((h, w, 3), np.float32)
        for _ in range(int(22 + 30 * rng.random())):
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, int(h * 0.9)))
            r = int(rng.uniform(0.02, 0.07) * max(h, w))
            tint = glow * rng.uniform(0.6, 1.1) + rng.normal(0, 18, 3)
            cv2.circle(lights, (cx, cy), r, tuple(float(v) for v in tint), -1, lineType=cv2.LINE_AA)
        lights = cv2.GaussianBlur(lights, (0, 0), 0.01 * max(h, w) + 1)
        return img + 0.55 * lights
    return _mix(light, dark, np.clip(0.3 + 0.04 * fbm(h, w, rng, cells=4, octaves=3), 0, 1))  # plain


# ------------------------------------------------------------------------------------------ render
def render_scene(plan: ScenePlan, size: tuple[int, int], product_box: tuple[int, int, int, int],
                 seed: int = 0) -> Image.Image:
    """The scene at ``size`` (w, h): the wall above a horizon just behind the product's base, the surface below it
    in perspective, lit from ``plan.light_x``, tinted by ``plan.warmth``."""
    w, h = size
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = product_box
    ph = max(1, y1 - y0)
    horizon = int(np.clip(y1 - 0.22 * ph, 0.3 * h, 0.9 * h))
    if h < 0.35 * w:  # a banner: the product sits low on a thin band; keep a sliver of surface
        horizon = int(np.clip(y1 - 0.3 * ph, 0.45 * h, 0.85 * h))
    wall = _material(plan.wall, h, w, plan.wall_colour, rng)
    # the surface: a square of material seen in perspective (rows far away are squeezed towards the horizon)
    depth = max(1, h - horizon)
    side = int(max(w, depth) * 1.6)
    flat = _material(plan.surface, side, side, plan.surface_colour, rng)
    src = np.float32([[0, 0], [side, 0], [side, side], [0, side]])
    spread = 0.35 * w
    dst = np.float32([[-spread, horizon], [w + spread, horizon], [w + 2.2 * spread, h + depth * 0.6],
                      [-2.2 * spread, h + depth * 0.6]])
    surface = cv2.warpPerspective(flat, cv2.getPerspectiveTransform(src, dst), (w, h), flags=cv2.INTER_AREA,
                                  borderMode=cv2.BORDER_REFLECT)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # a soft edge where the surface meets the wall (no aliased seam), and ambient occlusion along it
    seam = np.clip((yy - horizon) / max(1.0, 0.004 * h) + 0.5, 0, 1)[..., None]
    img = wall * (1 - seam) + surface * seam
    ao = 1 - 0.22 * np.exp(-np.abs(yy - horizon) / (0.035 * h + 1))
    # light: brighter towards its side and the top of the wall; the surface brightens towards the viewer
    lx = plan.light_x * w
    d = np.sqrt(((xx - lx) / w) ** 2 + ((yy - 0.15 * h) / h) ** 2)
    fall = 1 + (0.12 + 0.35 * plan.hardness) * (0.45 - d)
    floor = np.where(yy >= horizon, 0.88 + 0.16 * (yy - horizon) / depth, 1.0)
    img = img * (fall * ao * floor)[..., None]
    if plan.warmth:
        tint = np.array([1 + 0.07 * plan.warmth, 1 + 0.01 * plan.warmth, 1 - 0.09 * plan.warmth], np.float32)
        img = img * tint
    img = img + rng.normal(0, 1.1, (h, w, 1)).astype(np.float32)  # no banding in smooth ramps
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
