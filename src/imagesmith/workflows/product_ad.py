"""Product-ad studio: product photos + a concept -> finished ads in every format.

One ad is a short recipe over the layers below, each stage timed:

    cutout (vision)  ->  placement per format (compose)  ->  background painted AROUND the product at its
    placed position (engine inpainting with the product as context, then upscaled)  ->  composite with
    contact shadow, original product pixels pasted back (compose)  ->  saliency / free space (vision)
    ->  typesetting with measured contrast (compose)  ->  PNG + copy-free PNG + editable HTML + manifest.

Placement and copy positions come from measured maps, never from parsing a model's prose."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from ..core.errors import BadRequest, ImagesmithError
from ..core.imageio import load_image, save_png_atomic
from ..core.outputs import safety_chunks, screen
from ..core.requests import AdRequest, GenerateRequest
from ..core.settings import Settings

# on the generation canvas the product must stay as it is (black = keep in the inpainting mask)
_KEEP_THRESHOLD = 0.5
PRODUCT_UPSCALE_ABOVE = 2.0
"""a product the largest format would show at more than this many times its pixels goes through the upscaler first
(a phone photo's small product, or a tight box around it, would otherwise be a Lanczos blur)"""
PRODUCT_UPSCALE_MAX_PIXELS = 40_000
"""...when it is this small at most (200 x 200): R-ESRGAN 4x+ costs about 0.5 ms an input pixel on this 2-core CPU
(measured 2026-12-05 on a slow day: 128 px 8.5 s, 256 px 32.8 s, 346 px 58.1 s; about half that on a normal day),
so the pass stays near 20 s at worst and four formats within the 60 s budget; a bigger product, enlarged no more
than 4x, is sharp enough with Lanczos. (It was 120k px: a 346 px product then took a whole minute.)"""
MAX_PRODUCT_ENLARGE = 4.0
"""a product is never shown at more than this many times its photo's pixels (the upscaler's 4x at most)"""
_BAND_ASPECT = 3.0  # formats wider (or taller) than this are bands cropped from a scene painted at most 2.5:1

AdProgress = Callable[[int, int, str], None]  # (done, total, label)


class AdOutput(BaseModel):
    """One finished ad (a manifest entry)."""

    product: str
    format: str
    variation: int
    path: str
    html_path: str
    background_path: str
    width: int
    height: int
    seed: int
    bytes: int
    product_box: list[int]
    product_scale: float
    product_pixels_preserved: bool
    harmonized: str
    text: list[dict] = Field(default_factory=list)
    occ: float
    rea: float
    seconds: dict[str, float] = Field(default_factory=dict)
    request: dict = Field(default_factory=dict)
    safety: dict | None = Field(None, description="the safety gate's verdict when it flagged the painted background "
                                "(blurred by the policy; a withheld one fails the ad instead)")
    background: str = Field("paint", description="paint (the checkpoint painted the scene) or studio (built from "
                            "the concept's words at full resolution)")
    scene: dict | None = Field(None, description="studio: what the concept was understood as")
    cutout_confidence: float | None = None
    product_upscaled: int | None = Field(None, description="the factor the upscaler enlarged the product by before "
                                         "placing it (the photo had fewer pixels than the format shows)")


class AdFailure(BaseModel):
    product: str
    format: str | None = None
    error: str


class AdResult(BaseModel):
    outputs: list[AdOutput] = Field(default_factory=list)
    failures: list[AdFailure] = Field(default_factory=list)
    manifest_path: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time per stage, summed")


@dataclass
class _Stopwatch:
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds


def generation_canvas(fmt_w: int, fmt_h: int, native: int, *, max_aspect: float = 2.5,
                      multiple: int = 32) -> tuple[int, int]:
    """The size the model paints at: about ``native**2`` pixels with the format's aspect ratio (clamped,
    so banners are painted as a wide scene and cropped), sides multiples of ``multiple``."""
    aspect = min(max(fmt_w / fmt_h, 1 / max_aspect), max_aspect)
    w = math.sqrt(native * native * aspect)
    h = w / aspect
    snap = lambda v: max(multiple * 2, int(round(v / multiple)) * multiple)  # noqa: E731
    return snap(w), snap(h)


def cover_transform(src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float, float]:
    """(scale, offset_x, offset_y) mapping ``dst`` (format) coordinates into ``src`` (canvas) coordinates
    for a centred 'cover' fit: canvas_xy = format_xy * scale + offset."""
    scale = min(src[0] / dst[0], src[1] / dst[1])  # the canvas is scaled UP by 1/scale to cover dst
    ox = (src[0] - dst[0] * scale) / 2
    oy = (src[1] - dst[1] * scale) / 2
    return scale, ox, oy


def cover_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``size`` and crop the centre (the inverse of :func:`cover_transform`)."""
    s = max(size[0] / image.width, size[1] / image.height)
    w, h = max(size[0], round(image.width * s)), max(size[1], round(image.height * s))
    big = image.resize((w, h), Image.LANCZOS)
    x, y = (w - size[0]) // 2, (h - size[1]) // 2
    return big.crop((x, y, x + size[0], y + size[1]))


def save_within(image: Image.Image, path: Path, max_bytes: int | None, text_chunks: dict[str, str]) -> int:
    """Save a PNG; over ``max_bytes`` it is re-encoded with an adaptive palette (256, then fewer colours,
    dithered) until it fits. Returns the file size. Raises BadRequest if nothing fits."""
    save_png_atomic(image, path, text_chunks=text_chunks)
    size = path.stat().st_size
    if max_bytes is None or size <= max_bytes:
        return size
    for colors in (256, 192, 128, 96, 64):
        pal = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.FLOYDSTEINBERG)
        save_png_atomic(pal, path, text_chunks=text_chunks)
        size = path.stat().st_size
        if size <= max_bytes:
            return size
    path.unlink(missing_ok=True)
    raise BadRequest(f"{path.name}: cannot fit within {max_bytes // 1024} KB")


class ProductAdStudio:
    """``ProductAdStudio().make(AdRequest(...), out_dir)`` -> :class:`AdResult` (and ``out_dir/manifest.json``).

    The engine, segmenter and settings can be passed in (tests, the service); by default the house
    models are used: house-cutout cuts, the default checkpoint (house-ldm) paints."""

    def __init__(self, engine=None, *, settings: Settings | None = None, segmenter=None, safety_gate=None):
        self._engine = engine
        self.settings = settings or (engine.settings if engine is not None else Settings.from_env())
        self._segmenter = segmenter
        self.safety_gate = safety_gate  # the service's: every painted background passes it (core.outputs)

    # ------------------------------------------------------------------ parts
    @property
    def engine(self):
        if self._engine is None:
            from ..engine.generate import Engine
            self._engine = Engine(self.settings)
        return self._engine

    def segmenter(self, name: str | None = None):
        """The segmenter passed in, else ``name`` resolved in the engine's registry (default house-cutout)."""
        from ..models.segment import resolve_segmenter
        if name is None and self._segmenter is not None:
            return self._segmenter
        seg = resolve_segmenter(name, self.engine.registry if name else None)
        if name is None:
            self._segmenter = seg
        return seg

    def _checkpoint(self, model: str | None):
        return self.engine.registry.get(model, "checkpoint") if model else self.engine._default_checkpoint()

    def _native(self, model: str | None) -> int:
        return self.engine._native_size(self._checkpoint(model))

    def clear_props(self, req: AdRequest, fmt) -> bool:
        """Whether objects painted away from the product go (``props``): always in banners under auto, where
        the band crop cuts them; elsewhere under auto only for the shipped house models, which paint stray
        emoji-like blobs rather than props a person would keep."""
        if req.props != "auto":
            return req.props == "clear"
        return _is_band(fmt) or bool(self._checkpoint(req.model).builtin)

    def background_mode(self, req: AdRequest) -> str:
        """``studio`` or ``paint``: ``auto`` builds a studio scene when the checkpoint is a shipped house model (it
        paints 128 px and eight backdrop kinds: upscaled, every concept became the same blur) and lets a user's
        checkpoint paint."""
        if req.background != "auto":
            return req.background
        return "studio" if self._checkpoint(req.model).builtin else "paint"

    def paint_background(self, req: AdRequest, fmt, box: tuple[int, int, int, int], product: Image.Image,
                         seed: int, workdir: Path, progress: Optional[Callable] = None) -> Image.Image:
        """The scene, painted by the engine around the product at ``box`` (format coordinates) and brought
        to the format's size. The product (RGBA, already fitted to ``box``) is the inpainting context: the
        model sees it where it will stand and paints everything else."""
        native = self._native(req.model)
        cw, ch = generation_canvas(fmt.width, fmt.height, native)
        scale, ox, oy = cover_transform((cw, ch), (fmt.width, fmt.height))
        x0, y0 = box[0] * scale + ox, box[1] * scale + oy
        pw, ph = max(1, round(product.width * scale)), max(1, round(product.height * scale))
        small = product.resize((pw, ph), Image.LANCZOS)
        # init: a neutral ground (the sampler repaints it at strength 1) with the product at its place
        init = Image.new("RGB", (cw, ch), (128, 128, 128))
        init.paste(small, (round(x0), round(y0)), small)
        alpha = np.zeros((ch, cw), np.float32)
        a = np.asarray(small.getchannel("A"), np.float32) / 255.0
        xi, yi = round(x0), round(y0)
        xs, ys = max(0, xi), max(0, yi)
        xe, ye = min(cw, xi + pw), min(ch, yi + ph)
        if xe > xs and ye > ys:
            alpha[ys:ye, xs:xe] = a[ys - yi:ye - yi, xs - xi:xe - xi]
        keep = alpha >= _KEEP_THRESHOLD
        mask = Image.fromarray(np.where(keep, 0, 255).astype(np.uint8))
        init_path, mask_path = workdir / "init.png", workdir / "mask.png"
        init.save(init_path)
        mask.save(mask_path)
        gen = GenerateRequest(prompt=req.concept, negative_prompt=req.negative_prompt, model=req.model,
                              steps=req.steps, cfg_scale=req.cfg_scale, sampler_name=req.sampler_name,
                              scheduler=req.scheduler, seed=seed, width=cw, height=ch,
                              init_image=str(init_path), mask=str(mask_path), denoising_strength=1.0,
                              mask_blur=1, ground_concepts=False)  # a scene around the product, not an object
        painted = self.engine.generate(gen, progress=progress).images[0]
        if _is_band(fmt) and self.clear_props(req, fmt):
            # a banner is a thin band cropped from a wider scene: objects the model painted around the small
            # product are whole in the canvas (and cut by both edges of the band), so they are found and
            # cleared here, before the crop, where they can still be told from the backdrop
            from ..compose.composite import clear_footprint
            props = ghost_objects(painted, np.where(keep, 1.0, 0.0).astype(np.float32),
                                  self.segmenter(req.segmenter), props=True, max_prop_frac=0.5)
            if props.any():
                painted = clear_footprint(painted, props)
        painted = _settle_border(painted)
        factor = max(fmt.width / painted.width, fmt.height / painted.height)
        if factor > 1.01 and req.upscaler != "Lanczos":
            painted = self.engine.upscalers().get(req.upscaler).upscale(painted, min(4.0, math.ceil(factor)))
        return cover_resize(painted, (fmt.width, fmt.height))

    # ------------------------------------------------------------------ one ad
    def product_layer(self, req: AdRequest, cut, formats) -> tuple[Image.Image, int]:
        """The cut-out product as the ads place it, and the factor it was enlarged by: when the largest format
        would show it at more than :data:`PRODUCT_UPSCALE_ABOVE` times its pixels and it is small (at most
        :data:`PRODUCT_UPSCALE_MAX_PIXELS`), its colour goes through ``req.upscaler`` (R-ESRGAN 4x+ by default;
        Lanczos leaves it as it is) by up to 4x, its alpha through Lanczos."""
        import math

        from ..compose.placement import place_product
        product = product_crop(cut)
        scales = []
        for fmt in formats:
            try:
                scales.append(place_product(fmt, product.size, position=req.position, scale=req.product_scale,
                                            max_enlarge=MAX_PRODUCT_ENLARGE).product_scale)
            except ImagesmithError:  # that format fails later with its own message
                continue
        need = max(scales, default=1.0)
        if (need <= PRODUCT_UPSCALE_ABOVE or product.width * product.height > PRODUCT_UPSCALE_MAX_PIXELS
                or str(req.upscaler).strip().lower() in ("lanczos", "none", "")):
            return product, 1
        factor = min(4, math.ceil(need))
        if self._engine is not None:
            upscalers = self._engine.upscalers()
        else:
            from ..engine.upscale import UpscalerSet
            upscalers = self.__dict__.setdefault("_upscalers", UpscalerSet(self.settings))
        size = (product.width * factor, product.height * factor)
        rgb = upscalers.get(req.upscaler).upscale(product.convert("RGB"), factor).resize(size, Image.LANCZOS)
        rgb.putalpha(product.getchannel("A").resize(size, Image.LANCZOS))  # a matte's edge is soft: Lanczos holds it
        return rgb, factor

    def make_one(self, req: AdRequest, product_path: str, cut, fmt, variation: int, seed: int,
                 out_dir: Path, watch: _Stopwatch, progress: Optional[Callable] = None,
                 layer: tuple[Image.Image, int] | None = None) -> AdOutput:
        from ..compose.composite import ShadowSpec, calm_region, clear_footprint, composite, fit_product
        from ..compose.html import export_html
        from ..compose.placement import place_product
        from ..compose.typeset import CopySpec, typeset
        from ..eval.layout import occ, rea
        from ..vision.analyze import saliency_map

        times: dict[str, float] = {}
        t = time.perf_counter()
        product, enlarged = layer or (product_crop(cut), 1)
        placement = place_product(fmt, product.size, position=req.position, scale=req.product_scale,
                                  max_enlarge=MAX_PRODUCT_ENLARGE / enlarged)
        box = tuple(int(v) for v in placement.product_box)
        fitted = fit_product(product, (box[2] - box[0], box[3] - box[1]))
        box = (box[0], box[1], box[0] + fitted.width, box[1] + fitted.height)
        times["composite"] = time.perf_counter() - t

        t = time.perf_counter()
        mode, scene = self.background_mode(req), None
        product_alpha = np.zeros((fmt.height, fmt.width), np.float32)
        fa = np.asarray(fitted.getchannel("A"), np.float32) / 255.0
        product_alpha[box[1]:box[3], box[0]:box[2]] = fa[:box[3] - box[1], :box[2] - box[0]]
        if mode == "studio":  # built, not generated: nothing for the safety gate or the prop clearing to judge
            from .studio_scene import plan_scene, render_scene
            scene = plan_scene(req.concept)
            background = render_scene(scene, (fmt.width, fmt.height), box, seed)
            seen = screen(background, None)
        else:
            with tempfile.TemporaryDirectory(prefix="imagesmith-ad-") as tmp:
                background = self.paint_background(req, fmt, box, fitted, seed, Path(tmp), progress)
            seen = screen(background, self.safety_gate)  # the model's part of the ad, as every generated output
            if seen.image is None:
                raise ImagesmithError(f"the painted background was withheld by the safety policy: "
                                      f"{seen.flag['reason']}")
            background = seen.image
            ghosts = ghost_objects(background, product_alpha, self.segmenter(req.segmenter),
                                   props=self.clear_props(req, fmt) and not _is_band(fmt))  # bands: on the scene
            background = clear_footprint(background, np.maximum(product_alpha, ghosts))
        if req.copy_blur > 0:
            background = calm_region(background, placement.copy_area, sigma_frac=req.copy_blur)
        times["generation"] = time.perf_counter() - t

        t = time.perf_counter()
        shadow = ShadowSpec(direction_deg=req.shadow_direction, softness=req.shadow_softness,
                            opacity=req.shadow_opacity) if req.shadow else None
        comp = composite(background, fitted, box, shadow=shadow,
                         reflection=req.reflection or bool(scene is not None and scene.glossy), harmonize=req.harmonize)
        times["composite"] += time.perf_counter() - t

        t = time.perf_counter()
        saliency = saliency_map(comp.image, mask=product_alpha)
        times["analysis"] = time.perf_counter() - t

        t = time.perf_counter()
        copy = CopySpec(headline=req.headline, subline=req.subline, cta=req.cta, brand_color=req.brand_color)
        final, elements, _masks = typeset(comp.image, copy, tuple(placement.copy_area), saliency=saliency,
                                          fmt_name=fmt.name)
        times["typesetting"] = time.perf_counter() - t

        t = time.perf_counter()
        boxes = [e.box for e in elements]
        preserved = bool(np.array_equal(np.asarray(final)[comp.protected_mask],
                                        _product_pixels(fitted, box, final.size)[comp.protected_mask]))
        if req.harmonize == "off" and not preserved:  # the guarantee: never ship a silently altered product
            raise RuntimeError("product pixels changed outside harmonize: compose layer bug")
        stem = f"{Path(product_path).stem}_{_safe(fmt.name)}_v{variation}"
        png, html, bg = out_dir / f"{stem}.png", out_dir / f"{stem}.html", out_dir / f"{stem}.background.png"
        chunks = {"imagesmith-ad": json.dumps({"format": fmt.name, "seed": seed, "concept": req.concept}),
                  **safety_chunks(seen.flag)}
        size = save_within(final, png, fmt.max_bytes, chunks)
        save_within(comp.image, bg, fmt.max_bytes, safety_chunks(seen.flag))
        export_html(html, bg.name, fmt.width, fmt.height, elements, title=req.headline)
        times["export"] = time.perf_counter() - t
        for k, v in times.items():
            watch.add(k, v)
        return AdOutput(
            product=str(product_path), format=fmt.name, variation=variation, path=str(png), html_path=str(html),
            background_path=str(bg), width=fmt.width, height=fmt.height, seed=seed, bytes=size,
            product_box=list(box), product_scale=round(fitted.width * enlarged / max(1, product.width), 4),
            product_upscaled=enlarged if enlarged > 1 else None,
            product_pixels_preserved=preserved, harmonized=req.harmonize,
            text=[e.model_dump() for e in elements],
            occ=round(float(occ(saliency, boxes)), 4), rea=round(float(rea(comp.image, boxes)), 5),
            seconds={k: round(v, 3) for k, v in times.items()}, request=req.model_dump(), safety=seen.flag,
            background=mode, scene=scene.describe() if scene is not None else None,
            cutout_confidence=getattr(cut, "confidence", None),
        )

    # ------------------------------------------------------------------ batch
    def make(self, req: AdRequest, out_dir: str | os.PathLike[str], *, progress: Optional[AdProgress] = None,
             step_progress: Optional[Callable] = None) -> AdResult:
        """All products x formats x variations. A bad product or a format whose copy cannot fit is
        recorded in ``failures`` and the rest still finish. ``manifest.json`` lists everything."""
        from ..compose.contrast import parse_hex
        from ..compose.formats import parse_formats
        from ..vision.cutout import cutout

        formats = parse_formats(req.formats)  # bad names and colours fail the whole call, before any work
        if req.brand_color:
            parse_hex(req.brand_color)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        base_seed = req.seed if req.seed >= 0 else int(np.random.SeedSequence().entropy % (2**32 - 64))
        result = AdResult()
        watch = _Stopwatch()
        total = len(req.products) * len(formats) * req.variations
        done = 0
        segmenter = self.segmenter(req.segmenter)
        for product_path in req.products:
            t = time.perf_counter()
            try:
                image = load_image(product_path, settings=self.settings, mode=None, what="product photo")
                cut = cutout(image, segmenter, box=req.product_box, point=req.product_point,
                             min_confidence=req.min_cutout_confidence or None, what=Path(product_path).name)
            except ImagesmithError as exc:
                result.failures.append(AdFailure(product=str(product_path), error=str(exc)))
                done += len(formats) * req.variations
                if progress:
                    progress(done, total, f"{Path(product_path).name}: failed")
                continue
            finally:
                watch.add("cutout", time.perf_counter() - t)
            t = time.perf_counter()
            layer = self.product_layer(req, cut, formats)
            watch.add("product upscale", time.perf_counter() - t)
            for fmt in formats:
                for v in range(req.variations):
                    try:
                        result.outputs.append(self.make_one(req, product_path, cut, fmt, v, base_seed + v, out,
                                                            watch, step_progress, layer))
                    except ImagesmithError as exc:
                        result.failures.append(AdFailure(product=str(product_path), format=fmt.name, error=str(exc)))
                    done += 1
                    if progress:
                        progress(done, total, f"{Path(product_path).name} {fmt.name}")
        result.seconds = {k: round(v, 3) for k, v in watch.totals.items()}
        copy_fonts(out / "fonts", {t["font"] for o in result.outputs for t in o.text})
        manifest = out / "manifest.json"
        tmp = manifest.with_name(manifest.name + ".tmp")
        tmp.write_text(json.dumps({"request": req.model_dump(), "outputs": [o.model_dump() for o in result.outputs],
                                   "failures": [f.model_dump() for f in result.failures],
                                   "seconds": result.seconds}, indent=2))
        tmp.replace(manifest)
        result.manifest_path = str(manifest)
        return result


def product_crop(cut) -> Image.Image:
    """The cutout cropped to everything with visible alpha (the soft edge included, not just alpha > 0.5)."""
    visible = cut.rgba.getchannel("A").point(lambda v: 255 if v > 4 else 0).getbbox()
    return cut.rgba.crop(visible or cut.box)


def copy_fonts(folder: Path, names: set[str]) -> list[Path]:
    """Put the font files the HTML pages name (``fonts/<file>``) next to them, once per output folder,
    so the editable copy renders exactly as in the PNG (NanumGothic, OFL)."""
    import shutil
    from ..compose.typeset import font_candidates
    copied = []
    for weight in ("regular", "bold", "extrabold"):
        for path in font_candidates(weight):
            if path.name in names and not (folder / path.name).exists():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, folder / path.name)
                copied.append(folder / path.name)
    return copied


def _product_pixels(fitted: Image.Image, box, size) -> np.ndarray:
    """The fitted product's RGB placed on an otherwise black canvas of ``size``."""
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    rgb = np.asarray(fitted.convert("RGB"))
    canvas[box[1]:box[1] + rgb.shape[0], box[0]:box[0] + rgb.shape[1]] = rgb[:size[1] - box[1], :size[0] - box[0]]
    return canvas


def _safe(name: str) -> str:
    return name.replace(":", "x").replace(".", "_").replace("/", "_")


def _settle_border(image: Image.Image) -> Image.Image:
    """The outer two rings of a decoded image with the next ring's colours. The VAE decodes the border
    a little darker; the upscaler mirrors the image at that ring and sharpens the valley into a dark line
    along the ad's edge (seen at x = 2 of the 728x90 banners: 63 levels darker in red), so the rings take
    the third row/column's pixels."""
    a = np.array(image.convert("RGB"))
    if min(a.shape[:2]) < 8:
        return image
    a[:2], a[-2:] = a[2], a[-3]
    a[:, :2], a[:, -2:] = a[:, 2:3], a[:, -3:-2]
    return Image.fromarray(a)


def _is_band(fmt) -> bool:
    return max(fmt.width / fmt.height, fmt.height / fmt.width) > _BAND_ASPECT


def ghost_objects(background: Image.Image, product_alpha: np.ndarray, segmenter, *, grow_frac: float = 0.06,
                  threshold: float = 0.25, props: bool = False, max_prop_frac: float = 0.25) -> np.ndarray:
    """Objects the generator painted around the product: regions of the segmenter's matte of the painted scene
    that touch the product's (grown) footprint. A text-to-image model that knows the product draws more of it
    in the hole around it (a second, larger sneaker behind the real one); these are cleared with the footprint.
    Objects elsewhere in the scene are props and stay, unless ``props``: then compact regions (at most
    ``max_prop_frac`` of the image, touching at most two edges) go too; a table or a wall is never one.
    Returns an H x W 0/1 float mask."""
    import cv2
    matte = np.asarray(segmenter.predict(background.convert("RGB")), np.float32)
    if matte.max() > 1.0:
        matte = matte / 255.0
    if matte.shape != product_alpha.shape:
        matte = cv2.resize(matte, (product_alpha.shape[1], product_alpha.shape[0]), interpolation=cv2.INTER_LINEAR)
    solid = (product_alpha > 0.02).astype(np.uint8)
    grow = max(2, int(round(grow_frac * min(product_alpha.shape))))
    near = cv2.dilate(solid, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    n, labels = cv2.connectedComponents((matte > threshold).astype(np.uint8))
    ghosts = np.zeros(product_alpha.shape, np.float32)
    for k in range(1, n):
        region = labels == k
        if (region & (near > 0)).any():
            ghosts[region] = 1.0
        elif props and region.mean() <= max_prop_frac:
            edges = int(region[0].any()) + int(region[-1].any()) + int(region[:, 0].any()) + int(region[:, -1].any())
            if edges <= 2:
                ghosts[region] = 1.0
    return ghosts
