"""An ad as editable HTML: the copy-free image as background, every piece of copy as live text.

The page references, never embeds: the background PNG by its name beside the HTML file, fonts from a
relative ``fonts/`` folder (falling back to sans-serif when absent). Boxes, sizes, colours, scrims and
buttons come from the typesetter's :class:`~.typeset.TextElement` list, so the HTML starts out as the
PNG looks and a designer can retype any line in the browser."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from .contrast import parse_hex
from .typeset import TextElement


def _css_colour(hex_colour: str, opacity: float | None = None) -> str:
    r, g, b = parse_hex(hex_colour)
    if opacity is None or opacity >= 1.0:
        return f"rgb({r}, {g}, {b})"
    return f"rgba({r}, {g}, {b}, {max(0.0, opacity):.3f})"


def _family(font_file: str) -> str:
    """A CSS family name for a font file: its stem, letters and digits only."""
    stem = Path(font_file).stem
    return "".join(ch for ch in stem if ch.isalnum() or ch in "-_") or "AdFont"


def _attr(value: str) -> str:
    """Escaped for a double-quoted attribute (single quotes may stay: CSS font names use them)."""
    return html.escape(value, quote=False).replace('"', "&quot;")


def _element_html(el: TextElement) -> str:
    x0, y0, x1, y1 = el.box
    pad_x, pad_y = (el.padding + [0, 0])[:2]
    style = [
        f"left: {x0}px", f"top: {y0}px", f"width: {x1 - x0}px", f"height: {y1 - y0}px",
        f"padding: {pad_y}px {pad_x}px",
        f"font-family: '{_family(el.font)}', sans-serif",
        f"font-size: {el.font_size}px",
        f"line-height: {el.line_height or round(1.2 * el.font_size)}px",
        f"color: {_css_colour(el.color)}",
        f"text-align: {el.align}",
    ]
    if el.background_color:
        style.append(f"background: {_css_colour(el.background_color, el.background_opacity)}")
        style.append(f"border-radius: {el.radius}px")
    body = "<br>".join(html.escape(line, quote=False) for line in el.lines)
    return (f'    <div class="copy {el.role}" contenteditable="true" spellcheck="false" '
            f'data-role="{el.role}" data-text="{_attr(el.text)}" '
            f'data-contrast="{el.contrast_ratio}" style="{_attr("; ".join(style))}">'
            f"{body}</div>")


def render_html(background_png_name: str, width: int, height: int, elements: Sequence[TextElement], *,
                title: str = "") -> str:
    """The page as a string (see :func:`export_html`)."""
    fonts = sorted({el.font for el in elements})
    faces = "\n".join(
        f"  @font-face {{ font-family: '{_family(f)}'; src: url(\"fonts/{quote(Path(f).name)}\"); }}"
        for f in fonts)
    bg_url = quote(background_png_name)
    items = "\n".join(_element_html(el) for el in elements)
    hangul = any("\uac00" <= ch <= "\ud7a3" for el in elements for ch in el.text)
    return f"""<!doctype html>
<html lang="{'ko' if hangul else 'en'}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width={int(width)}">
<title>{html.escape(title)}</title>
<style>
{faces}
  body {{ margin: 0; background: #f2f2f2; }}
  .ad {{ position: relative; width: {int(width)}px; height: {int(height)}px; overflow: hidden;
         background: url("{bg_url}") no-repeat 0 0 / {int(width)}px {int(height)}px; }}
  .copy {{ position: absolute; box-sizing: border-box; margin: 0; white-space: nowrap; overflow: visible;
           font-weight: normal; }}
  .copy:focus {{ outline: 1px dashed rgba(0, 128, 255, 0.8); }}
</style>
</head>
<body>
  <div class="ad" data-width="{int(width)}" data-height="{int(height)}">
{items}
  </div>
</body>
</html>
"""


def export_html(path: str | os.PathLike[str], background_png_name: str, width: int, height: int,
                elements: Sequence[TextElement], *, title: str = "") -> Path:
    """Write a self-contained HTML ad: a ``width`` x ``height`` div with ``background_png_name`` (a file
    name relative to the HTML) as its background, each element an absolutely positioned,
    ``contenteditable`` block at its box with its font size, colour and scrim/button. Fonts are looked up
    in ``fonts/<font file>`` next to the page (nothing is copied), else sans-serif. Written atomically."""
    target = Path(path)
    text = render_html(background_png_name, width, height, elements, title=title)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
