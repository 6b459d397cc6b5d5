"""Editable HTML export."""

from __future__ import annotations

import re

from PIL import Image

from imagesmith.compose.html import export_html
from imagesmith.compose.typeset import CopySpec, TextElement, typeset


def test_html_holds_escaped_live_text_at_its_boxes(tmp_path):
    elements = [
        TextElement(role="headline", text="<Sale> & 'more'", lines=["<Sale> &", "'more'"], box=[40, 50, 600, 210],
                    font_size=64, font="NanumGothicExtraBold.ttf", color="#111111", contrast_ratio=15.6,
                    line_height=77, padding=[20, 7]),
        TextElement(role="cta", text='Buy "now"', lines=['Buy "now"'], box=[40, 260, 300, 340], font_size=30,
                    font="NanumGothicBold.ttf", color="#ffffff", background_color="#0a6cff", background_opacity=1.0,
                    contrast_ratio=4.56, align="center", line_height=38, padding=[30, 14], radius=28),
    ]
    out = export_html(tmp_path / "ad.html", "ad bg.png", 1080, 1080, elements, title="Summer <3")
    page = out.read_text(encoding="utf-8")
    assert "&lt;Sale&gt; &amp;<br>'more'" in page and "<Sale>" not in page
    assert 'data-text="&lt;Sale&gt; &amp; \'more\'"' in page
    assert "<title>Summer &lt;3</title>" in page
    assert page.count('contenteditable="true"') == 2
    assert 'data-text="Buy &quot;now&quot;"' in page and '>Buy "now"</div>' in page
    assert "width: 1080px; height: 1080px" in page
    assert 'url("ad%20bg.png")' in page
    assert "left: 40px; top: 50px; width: 560px; height: 160px" in page
    assert "font-size: 64px" in page and "color: rgb(17, 17, 17)" in page
    assert "background: rgb(10, 108, 255)" in page and "border-radius: 28px" in page
    assert re.search(r"@font-face \{ font-family: 'NanumGothicBold'; src: url\(\"fonts/NanumGothicBold.ttf\"\)", page)
    assert "'NanumGothicExtraBold', sans-serif" in page
    assert [p.name for p in tmp_path.iterdir()] == ["ad.html"]  # no temporary file left behind


def test_html_from_a_real_typeset(tmp_path):
    base = Image.new("RGB", (300, 250), (30, 30, 60))
    _, elements, _ = typeset(base, CopySpec(headline="Night & Day", cta="Go"), (15, 15, 285, 120), fmt_name="300x250")
    page = export_html(tmp_path / "a.html", "a.background.png", 300, 250, elements).read_text()
    assert "Night &amp; Day" in page
    for el in elements:
        assert f"left: {el.box[0]}px; top: {el.box[1]}px" in page
