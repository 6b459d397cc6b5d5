"""Statistics over finished ads (one or more product-ad studio ``manifest.json`` files).

The studio's quality bars that are statistics rather than per-ad properties live here: mean Occ (<= 0.2
wanted; saliency normalised to 0-1), mean Rea, and the share of text elements, products and display files
that meet their bars. Per-ad properties (contrast >= 4.5, product pixels preserved) are also re-counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..core.errors import BadRequest

OCC_GOAL = 0.2
CONTRAST_GOAL = 4.5


def manifest_paths(items: Iterable[str | Path]) -> list[Path]:
    """Manifest files from files or folders (searched recursively)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(p.rglob("manifest.json"))
        elif p.is_file():
            out.append(p)
        else:
            raise BadRequest(f"{p}: no such file or folder")
    if not out:
        raise BadRequest("no manifest.json found in " + ", ".join(str(i) for i in items))
    return out


def summarize_ads(manifests: Iterable[str | Path]) -> dict:
    outputs = []
    for path in manifest_paths(manifests):
        try:
            outputs += json.loads(Path(path).read_text())["outputs"]
        except (ValueError, KeyError) as exc:
            raise BadRequest(f"{path}: not a product-ad manifest ({exc})") from None
    if not outputs:
        raise BadRequest("the manifests list no ads")
    texts = [t for o in outputs for t in o["text"]]
    contrasts = np.array([t["contrast_ratio"] for t in texts])
    display = [o for o in outputs if o["width"] * o["height"] <= 300 * 600]
    by_format: dict[str, list[float]] = {}
    for o in outputs:
        by_format.setdefault(o["format"], []).append(o["occ"])
    return {
        "ads": len(outputs),
        "occ_mean": round(float(np.mean([o["occ"] for o in outputs])), 4),
        "occ_goal": OCC_GOAL,
        "occ_by_format": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_format.items())},
        "rea_mean": round(float(np.mean([o["rea"] for o in outputs])), 5),
        "text_elements": len(texts),
        "contrast_min": round(float(contrasts.min()), 2) if len(texts) else None,
        "contrast_pass_rate": round(float((contrasts >= CONTRAST_GOAL).mean()), 4) if len(texts) else None,
        "scrim_rate": round(float(np.mean([t.get("background_color") is not None and t["role"] != "cta"
                                           for t in texts])), 4) if texts else None,
        "product_pixels_preserved_rate": round(float(np.mean([o["product_pixels_preserved"] for o in outputs])), 4),
        "display_ads": len(display),
        "display_max_kb": round(max((o["bytes"] for o in display), default=0) / 1024, 1),
    }
