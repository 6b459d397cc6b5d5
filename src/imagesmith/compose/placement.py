"""Where the product stands and where the copy goes, per format: plain geometry, no model.

Two layouts: ``stack`` (copy above, product below: square and tall formats) and ``side`` (copy on one
side, product on the other: wide formats and banners). The product keeps its aspect ratio, stays inside
the margins and the format's safe zones, never overlaps the copy area, and stands on a floor line
(its base is placed, not its centre), so it looks set down rather than floating."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..core.errors import BadRequest
from .formats import AdFormat

Box = tuple[int, int, int, int]
Position = Literal["auto", "center", "bottom", "left", "right"]
POSITIONS: tuple[str, ...] = ("auto", "center", "bottom", "left", "right")

# formats at least this wide (width / height) put copy beside the product: 1.91:1, 728x90, 320x50
WIDE_ASPECT = 1.6
# default linear fraction of its region the product fills: prominent but with room for its shadow
AUTO_SCALE = 0.85
# in a side layout the product may take at most this much of the width whatever copy_fraction says,
# and the copy at least copy_fraction of it
_SIDE_MIN_COPY = 0.3
# grounded: the product's base sits this fraction of the unused height above the region's bottom
_FLOOR_LIFT = 0.15


class Placement(BaseModel):
    """Boxes are (x0, y0, x1, y1) in format pixels, x1/y1 exclusive."""

    product_box: Box = Field(description="where the product's tight bounding box goes")
    product_scale: float = Field(description="placed width / cutout bounding-box width")
    copy_area: Box = Field(description="region reserved for the copy; never overlaps product_box")
    layout: Literal["stack", "side"]
    position: str = Field(description="the resolved position: center, bottom, left or right")
    floor_y: int = Field(description="the floor line the product stands on (= product_box[3])")


def _usable(fmt: AdFormat, m: int) -> Box:
    """The canvas minus margins and safe zones."""
    x0, x1 = m, fmt.width - m
    y0, y1 = max(m, fmt.safe_top), fmt.height - max(m, fmt.safe_bottom)
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise BadRequest(f"the {fmt.name} format has no room inside its margins and safe zones")
    return x0, y0, x1, y1


def _fit(pw: float, ph: float, max_w: float, max_h: float) -> tuple[int, int, float]:
    """Largest (w, h) with the product's aspect inside max_w x max_h; returns (w, h, factor)."""
    f = min(max_w / pw, max_h / ph)
    w, h = max(1, int(round(pw * f))), max(1, int(round(ph * f)))
    # rounding must never push the box past its region
    if w > max_w or h > max_h:
        f = min((max_w - 0.5) / pw, (max_h - 0.5) / ph)
        w, h = max(1, int(round(pw * f))), max(1, int(round(ph * f)))
    return w, h, f


def place_product(fmt: AdFormat, product_size: tuple[int, int], *, position: Position = "auto",
                  margin: float = 0.06, scale: float | None = None, copy_fraction: float = 0.3,
                  max_enlarge: float | None = None) -> Placement:
    """Lay out one format for a product whose tight bounding box is ``product_size`` (w, h).

    - ``position``: ``auto`` = ``right`` for wide formats (aspect >= 1.6), else ``bottom``;
      ``bottom``: copy above, product grounded low; ``center``: copy above, product centred in the rest;
      ``left``/``right``: side by side, the product on that side, grounded, copy on the other.
    - ``margin``: fraction of the format's short side kept clear on every edge (safe zones come on top).
    - ``scale``: linear fraction (0-1] of its region the product fills; default 0.85.
    - ``copy_fraction``: share of the usable height (stack) or width (side) reserved for copy; the copy
      also gets whatever the product does not need.
    - ``max_enlarge``: the product is never shown at more than this many times its pixels (a small product stays
      smaller rather than blurred; the copy and the scene take the room).
    """
    if position not in POSITIONS:
        raise BadRequest(f"unknown product position '{position}'; known: {', '.join(POSITIONS)}")
    pw, ph = (int(v) for v in product_size)
    if pw <= 0 or ph <= 0:
        raise BadRequest(f"the product's bounding box is empty ({pw}x{ph})")
    if scale is not None and not 0.0 < scale <= 1.0:
        raise BadRequest(f"product scale must be in (0, 1], got {scale}")
    if not 0.05 <= copy_fraction <= 0.8:
        raise BadRequest(f"copy fraction must be in [0.05, 0.8], got {copy_fraction}")
    if not 0.0 <= margin < 0.3:
        raise BadRequest(f"margin must be in [0, 0.3), got {margin}")
    s = AUTO_SCALE if scale is None else float(scale)
    if max_enlarge is not None and not max_enlarge > 0:
        raise BadRequest(f"max_enlarge must be positive, got {max_enlarge}")
    cap_w = cap_h = float("inf")
    if max_enlarge is not None:
        cap_w, cap_h = pw * max_enlarge, ph * max_enlarge
    m = int(round(margin * min(fmt.width, fmt.height)))
    ux0, uy0, ux1, uy1 = _usable(fmt, m)
    uw, uh = ux1 - ux0, uy1 - uy0
    resolved = position if position != "auto" else ("right" if fmt.aspect >= WIDE_ASPECT else "bottom")
    layout: Literal["stack", "side"] = "side" if resolved in ("left", "right") else "stack"

    if layout == "stack":
        gap = max(2, int(round(0.5 * m)), int(round(0.02 * uh)))
        region_max_h = int((1.0 - copy_fraction) * uh) - gap
        if region_max_h < 2:
            raise BadRequest(f"the {fmt.name} format has no room for the product below the copy")
        w, h, _ = _fit(pw, ph, min(s * uw, cap_w), min(s * region_max_h, cap_h))
        # the product's region is only as tall as it needs; the copy gets the rest
        region_h = min(region_max_h, max(h, int(round(h / s))))
        ry0 = uy1 - region_h
        x0 = ux0 + (uw - w) // 2
        if resolved == "center":
            y1 = ry0 + (region_h + h) // 2
        else:
            y1 = uy1 - int(round(_FLOOR_LIFT * (region_h - h)))
        product = (x0, y1 - h, x0 + w, y1)
        copy = (ux0, uy0, ux1, ry0 - gap)
    else:
        gap = max(2, int(round(0.5 * m)), int(round(0.02 * uw)))
        region_max_w = int((1.0 - max(copy_fraction, _SIDE_MIN_COPY)) * uw) - gap
        if region_max_w < 2:
            raise BadRequest(f"the {fmt.name} format has no room for the product beside the copy")
        w, h, _ = _fit(pw, ph, min(s * region_max_w, cap_w), min(s * uh, cap_h))
        region_w = min(region_max_w, max(w, int(round(w / s))))
        y1 = uy1 - int(round(_FLOOR_LIFT * (uh - h)))
        if resolved == "left":
            rx0 = ux0
            copy = (ux0 + region_w + gap, uy0, ux1, uy1)
        else:
            rx0 = ux1 - region_w
            copy = (ux0, uy0, rx0 - gap, uy1)
        x0 = rx0 + (region_w - w) // 2
        product = (x0, y1 - h, x0 + w, y1)
    if copy[2] - copy[0] < 4 or copy[3] - copy[1] < 4:
        raise BadRequest(f"the {fmt.name} format has no room left for the copy")
    return Placement(product_box=product, product_scale=round((product[2] - product[0]) / pw, 6),
                     copy_area=copy, layout=layout, position=resolved, floor_y=product[3])
