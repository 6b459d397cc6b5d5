"""Ad formats by name."""

from __future__ import annotations

import pytest

from imagesmith.compose.formats import FORMATS, SOCIAL, AdFormat, parse_formats
from imagesmith.core.errors import BadRequest


def test_the_table():
    sizes = {n: (f.width, f.height) for n, f in FORMATS.items()}
    assert sizes == {"1:1": (1080, 1080), "4:5": (1080, 1350), "9:16": (1080, 1920), "1.91:1": (1200, 628),
                     "300x250": (300, 250), "728x90": (728, 90), "300x600": (300, 600), "320x50": (320, 50)}
    assert FORMATS["9:16"].safe_top == FORMATS["9:16"].safe_bottom == 250
    assert all(f.max_bytes == 150 * 1024 and f.kind == "display" for f in FORMATS.values() if "x" in f.name)
    assert all(FORMATS[n].kind == "social" and FORMATS[n].max_bytes is None for n in SOCIAL)


def test_immutable():
    with pytest.raises(TypeError):
        FORMATS["2:1"] = AdFormat("2:1", 2, 1)  # type: ignore[index]
    with pytest.raises(AttributeError):
        FORMATS["1:1"].width = 5  # type: ignore[misc]


def test_parse_shortcuts_lists_and_order():
    assert [f.name for f in parse_formats("all")] == list(FORMATS)
    assert [f.name for f in parse_formats("social")] == list(SOCIAL)
    assert [f.name for f in parse_formats("DISPLAY")] == ["300x250", "728x90", "300x600", "320x50"]
    assert [f.name for f in parse_formats("9:16, 1:1,9:16")] == ["9:16", "1:1"]
    assert [f.name for f in parse_formats(["320x50", "social"])] == ["320x50", *SOCIAL]


@pytest.mark.parametrize("spec", ["16:10", ["1:1", "bogus"], "1:1,,2:3"])
def test_unknown_names_are_named_with_the_known_ones(spec):
    with pytest.raises(BadRequest) as err:
        parse_formats(spec)
    msg = str(err.value)
    assert ("16:10" in msg or "bogus" in msg or "2:3" in msg) and "1.91:1" in msg and "320x50" in msg
    assert "\n" not in msg


def test_empty_spec():
    with pytest.raises(BadRequest):
        parse_formats("")
