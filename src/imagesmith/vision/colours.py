"""Named studio colours: the backdrops the house data renders, and the names the captioner gives them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamedColour:
    name: str
    rgb: tuple[int, int, int]


# Plain backdrops and gradient ends: muted studio colours a person names the same way at a glance.
BACKDROP_COLOURS: tuple[NamedColour, ...] = (
    NamedColour("white", (244, 244, 242)),
    NamedColour("off-white", (236, 231, 220)),
    NamedColour("cream", (243, 232, 200)),
    NamedColour("beige", (222, 203, 172)),
    NamedColour("light grey", (205, 207, 210)),
    NamedColour("grey", (150, 152, 156)),
    NamedColour("charcoal", (58, 60, 64)),
    NamedColour("black", (24, 24, 26)),
    NamedColour("pale blue", (196, 220, 238)),
    NamedColour("sky blue", (128, 186, 230)),
    NamedColour("navy blue", (34, 48, 92)),
    NamedColour("teal", (30, 128, 130)),
    NamedColour("mint green", (186, 232, 208)),
    NamedColour("sage green", (160, 180, 148)),
    NamedColour("dark green", (36, 84, 56)),
    NamedColour("pale yellow", (248, 236, 168)),
    NamedColour("mustard yellow", (214, 170, 48)),
    NamedColour("peach", (250, 200, 170)),
    NamedColour("orange", (240, 136, 52)),
    NamedColour("terracotta", (190, 98, 70)),
    NamedColour("pink", (244, 178, 196)),
    NamedColour("coral", (240, 120, 110)),
    NamedColour("red", (200, 40, 44)),
    NamedColour("burgundy", (110, 28, 44)),
    NamedColour("lavender", (204, 190, 236)),
    NamedColour("purple", (110, 62, 150)),
)
