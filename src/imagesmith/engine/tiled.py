"""Tiled upscaling, as "Ultimate SD Upscale" does it: make the image larger with an upscaler, then repaint it tile
by tile with img2img at a low denoising strength, so detail is added at a size the model (and the machine's
memory) can take whatever the final size is.

Tiles are a grid of ``tile`` x ``tile`` squares over the upscaled image, repainted in reading order (or, with
``order="chess"``, a chessboard's white squares first and then the black ones). Each is
repainted with ``padding`` pixels of context around it (already repainted neighbours included, so a tile continues
what is beside it), at the crop's own size rounded to the model's multiple of 8, and put back through a mask that
is 1 on the tile, falls off over ``mask_blur`` pixels across its edge, and is exactly 0 beyond the padding: the
seams are blended in both directions and nothing outside the padded crop changes. Tile i's seed is ``seed + i``.
Peak memory is that of one tile's img2img, not the whole image's (measured in benchmarks/tiled_upscale.py)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.requests import GenerateRequest, TiledRefine
from .detailer import blend


def tile_grid(size: tuple[int, int], tile: int) -> list[tuple[int, int, int, int]]:
    """Tile boxes (x0, y0, x1, y1) in reading order, the last row and column as wide as what is left."""
    w, h = size
    return [(x, y, min(x + tile, w), min(y + tile, h)) for y in range(0, h, tile) for x in range(0, w, tile)]


def crop_box(box: tuple[int, int, int, int], size: tuple[int, int], padding: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return max(0, x0 - padding), max(0, y0 - padding), min(size[0], x1 + padding), min(size[1], y1 + padding)


def tile_mask(box, crop, blur: int) -> np.ndarray:
    """float32 [h, w] over ``crop``: 1 on the tile, a smooth fall-off ``blur`` pixels wide centred on its edges
    (clipped where the crop ends at the image's border), 0 beyond."""
    import cv2
    x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = crop
    m = np.zeros((cy1 - cy0, cx1 - cx0), np.float32)
    m[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] = 1.0
    if blur > 0:
        half = int(math.ceil(blur / 2))
        # the image's own borders: the tile runs on past them, so the mask stays 1 there
        pad = ((half if cy0 == y0 == 0 else 0, half if cy1 == y1 else 0),
               (half if cx0 == x0 == 0 else 0, half if cx1 == x1 else 0))
        big = np.pad(m, pad, mode="edge")
        big = cv2.GaussianBlur(big, (2 * half + 1, 2 * half + 1), blur / 4, borderType=cv2.BORDER_CONSTANT)
        m = big[pad[0][0]:pad[0][0] + m.shape[0], pad[1][0]:pad[1][0] + m.shape[1]]
    m[m < 1e-4] = 0.0
    return np.clip(m, 0.0, 1.0)


def refine_tiles(engine, image: Image.Image, spec: TiledRefine, *, progress=None, cancel=None
                 ) -> tuple[Image.Image, dict[str, Any]]:
    """``image`` (already upscaled) repainted tile by tile; (image, report)."""
    image = image.convert("RGB")
    out = np.array(image)
    seed = spec.seed if spec.seed >= 0 else int(np.random.default_rng().integers(0, 2**32 - 1))
    boxes = tile_grid(image.size, spec.tile)
    report: dict[str, Any] = {"tiles": len(boxes), "tile": spec.tile, "padding": spec.padding,
                              "mask_blur": spec.mask_blur, "strength": spec.strength, "seed": seed,
                              "order": spec.order}
    order = list(enumerate(boxes))
    if spec.order == "chess":  # the white squares first, then the black ones (stable within each colour)
        order.sort(key=lambda ib: (ib[1][0] // spec.tile + ib[1][1] // spec.tile) % 2)
    with tempfile.TemporaryDirectory(prefix="imagesmith-tiles-") as tmp:
        for i, box in order:
            if cancel is not None:
                cancel.raise_if_cancelled()
            crop = crop_box(box, image.size, spec.padding)
            piece = Image.fromarray(out[crop[1]:crop[3], crop[0]:crop[2]])
            work = (max(64, int(math.ceil(piece.width / 8)) * 8), max(64, int(math.ceil(piece.height / 8)) * 8))
            path = Path(tmp) / f"tile-{i}.png"
            (piece if piece.size == work else piece.resize(work, Image.LANCZOS)).save(path)
            req = GenerateRequest(model=spec.model, prompt=spec.prompt, negative_prompt=spec.negative_prompt,
                                  steps=spec.steps, sampler_name=spec.sampler_name, scheduler=spec.scheduler,
                                  cfg_scale=spec.cfg_scale, seed=(seed + i) % 2**32, width=work[0], height=work[1],
                                  init_image=str(path), denoising_strength=spec.strength)
            repaint = engine.generate(req, progress=_relabel(progress, i, len(boxes)), cancel=cancel).images[0]
            back = np.asarray(repaint.convert("RGB").resize(piece.size, Image.LANCZOS)
                              if repaint.size != piece.size else repaint.convert("RGB"))
            out[crop[1]:crop[3], crop[0]:crop[2]] = blend(out[crop[1]:crop[3], crop[0]:crop[2]], back,
                                                          tile_mask(box, crop, spec.mask_blur))
    return Image.fromarray(out), report


def _relabel(progress, index: int, count: int):
    if progress is None:
        return None
    from ..core.progress import ProgressEvent

    def on_event(event):
        progress(ProgressEvent(event.step, event.total, f"tile {index + 1}/{count}", event.image_index))
    return on_event
