"""Prompt styles as A1111 keeps them: ``styles.csv`` (columns ``name``, ``prompt``, ``negative_prompt``) under the
home, applied as A1111 applies them: a style text holding ``{prompt}`` takes the prompt in that place; any
other style text is appended after a comma. Styles apply in the order they are named, to the prompt and to the
negative prompt alike. The file stays readable and writable by A1111 itself (the same CSV dialect), so an
existing ``styles.csv`` can simply be copied in."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadRequest, NotFound

FIELDS = ("name", "prompt", "negative_prompt")
MAX_STYLES = 1000


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def styles_path(home: Path) -> Path:
    return Path(home) / "styles.csv"


def load_styles(path: Path) -> dict[str, Style]:
    """The styles of `path` by name, in file order; no file: none. A1111's own files load as they are."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8-sig")
    out: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text), skipinitialspace=True):
        name = (row.get("name") or "").strip()
        if name:
            out[name] = Style(name, (row.get("prompt") or "").strip(), (row.get("negative_prompt") or "").strip())
    return out


def save_styles(path: Path, styles: dict[str, Style]) -> None:
    """Write the whole file through a temporary sibling, renamed into place (never half a CSV)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for s in styles.values():
        writer.writerow(s.as_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def check_style(name, prompt, negative_prompt) -> Style:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise BadRequest("name: give a style name of 1 to 200 characters")
    for field, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(value, str) or len(value) > 8000:
            raise BadRequest(f"{field}: give text of at most 8000 characters")
    return Style(name.strip(), prompt.strip(), negative_prompt.strip())


def put_style(path: Path, style: Style) -> dict[str, Style]:
    styles = load_styles(path)
    if style.name not in styles and len(styles) >= MAX_STYLES:
        raise BadRequest(f"at most {MAX_STYLES} styles")
    styles[style.name] = style
    save_styles(path, styles)
    return styles


def delete_style(path: Path, name: str) -> None:
    styles = load_styles(path)
    if name not in styles:
        raise NotFound(f"no style {name!r}")
    del styles[name]
    save_styles(path, styles)


def merge(style_text: str, prompt: str) -> str:
    """A1111's rule for one style text and one prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names, styles: dict[str, Style]) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order; an unknown name is a BadRequest
    naming the styles there are."""
    if names is None:
        return prompt, negative_prompt
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequest("styles must be a list of style names")
    for name in names:
        style = styles.get(name)
        if style is None:
            known = ", ".join(styles) or "none (add them with POST /sdapi/v1/prompt-styles or a styles.csv)"
            raise BadRequest(f"style {name!r} does not exist; styles: {known}")
        prompt = merge(style.prompt, prompt)
        negative_prompt = merge(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
