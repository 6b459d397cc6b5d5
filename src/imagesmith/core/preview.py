"""Live previews of a running generation from its latents, without the VAE (A1111's "Approx cheap"): a linear map
from the latent channels to RGB, upscaled. Cheap enough for every progress event (well under a millisecond of
matrix work per step at SD sizes).

Factors: SD1.x/SD2.x and SDXL use the published approximations (as A1111 and ComfyUI do); house-ldm ships its own
least-squares fit in its ``model_index.json`` (``_imagesmith.latent_rgb``). Other latent spaces (SD3, FLUX: 16
channels, packed) get no preview rather than a wrong one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# rows: latent channels (+ an optional bias row); columns: R, G, B; output in -1..1
SD1_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
               (-0.2120, -0.2616, -0.7177))
SDXL_FACTORS = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
                (-0.3112, -0.2359, -0.2076))


def factors_for(arch: str, model_path: str | Path | None = None) -> tuple[np.ndarray, bool] | None:
    """``(matrix, unit_range)`` for a model: house folders' own fit (output 0..1) when they ship one, else the
    architecture's published factors (output -1..1); None where no linear preview is known."""
    if model_path is not None:
        index = Path(model_path) / "model_index.json"
        if index.is_file():
            try:
                info = json.loads(index.read_text())
            except (OSError, ValueError):
                info = {}
            rows = (info.get("_imagesmith") or {}).get("latent_rgb")
            if rows:
                return np.asarray(rows, np.float32), True
    if arch in ("sd1", "sd2"):
        return np.asarray(SD1_FACTORS, np.float32), False
    if arch == "sdxl":
        return np.asarray(SDXL_FACTORS, np.float32), False
    return None


def latents_preview(latents: torch.Tensor, matrix: np.ndarray | Sequence, *, unit_range: bool = False,
                    size: int | None = None) -> Image.Image | None:
    """The first image of a ``[B, C, h, w]`` latent batch as a PIL preview (``size``: longest side, default 8x
    the latent). None if the channel count does not match the factors."""
    m = np.asarray(matrix, np.float32)
    if latents is None or latents.ndim != 4:
        return None
    z = latents[0].detach().float().cpu().numpy()  # [C, h, w]
    c = z.shape[0]
    if m.shape[0] not in (c, c + 1):
        return None
    rgb = np.einsum("chw,ck->hwk", z, m[:c])
    if m.shape[0] == c + 1:
        rgb = rgb + m[c]
    if not unit_range:
        rgb = (rgb + 1.0) / 2.0
    im = Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8), "RGB")
    h, w = z.shape[1:]
    scale = (size or 8 * max(h, w)) / max(h, w)
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
