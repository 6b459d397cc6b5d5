"""Ad formats: the social feed/story sizes and the IAB display banners, by the names users type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from ..core.errors import BadRequest

# IAB display ads are commonly capped at 150 KB per initial load
DISPLAY_MAX_BYTES = 150 * 1024


@dataclass(frozen=True)
class AdFormat:
    """One output format. ``safe_top``/``safe_bottom``: bands (px) where the platform draws its own UI
    (a story's profile bar and reply box); product and copy stay out of them. ``max_bytes``: file-size
    budget of the finished PNG, or None."""

    name: str
    width: int
    height: int
    safe_top: int = 0
    safe_bottom: int = 0
    max_bytes: int | None = None
    kind: Literal["social", "display"] = "social"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _formats() -> Mapping[str, AdFormat]:
    table = [
        AdFormat("1:1", 1080, 1080),
        AdFormat("4:5", 1080, 1350),
        AdFormat("9:16", 1080, 1920, safe_top=250, safe_bottom=250),
        AdFormat("1.91:1", 1200, 628),
        AdFormat("300x250", 300, 250, max_bytes=DISPLAY_MAX_BYTES, kind="display"),
        AdFormat("728x90", 728, 90, max_bytes=DISPLAY_MAX_BYTES, kind="display"),
        AdFormat("300x600", 300, 600, max_bytes=DISPLAY_MAX_BYTES, kind="display"),
        AdFormat("320x50", 320, 50, max_bytes=DISPLAY_MAX_BYTES, kind="display"),
    ]
    return MappingProxyType({f.name: f for f in table})


FORMATS: Mapping[str, AdFormat] = _formats()
SOCIAL: tuple[str, ...] = ("1:1", "4:5", "9:16", "1.91:1")
DISPLAY: tuple[str, ...] = ("300x250", "728x90", "300x600", "320x50")
_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"all": SOCIAL + DISPLAY, "social": SOCIAL, "display": DISPLAY})


def parse_formats(spec: str | Sequence[str]) -> list[AdFormat]:
    """``"1:1,9:16"``, ``["social", "320x50"]``, ``"all"`` -> formats in the order given, without repeats.

    Shortcuts: ``all``, ``social`` (1:1, 4:5, 9:16, 1.91:1), ``display`` (the four IAB banners).
    An unknown name raises BadRequest naming it and listing the known ones."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise BadRequest(f"ad format {item!r} is not a name like 1:1 or 300x250")
        names.extend(part.strip() for part in item.split(",") if part.strip())
    if not names:
        raise BadRequest("no ad format given; known: " + ", ".join([*FORMATS, *_GROUPS]))
    out: list[AdFormat] = []
    for name in names:
        key = name.lower()
        if key in _GROUPS:
            chosen = [FORMATS[n] for n in _GROUPS[key]]
        elif key in FORMATS:
            chosen = [FORMATS[key]]
        else:
            raise BadRequest(f"unknown ad format '{name}'; known: " + ", ".join([*FORMATS, *_GROUPS]))
        out.extend(f for f in chosen if f not in out)
    return out
