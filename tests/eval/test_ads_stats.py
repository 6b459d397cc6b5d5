"""`eval.ads.summarize_ads` recounts the studio's statistics from manifests."""

import json

import pytest

from imagesmith.core.errors import BadRequest
from imagesmith.eval.ads import summarize_ads


def _ad(fmt, w, h, occ, contrasts, size=1000, preserved=True):
    return {"format": fmt, "width": w, "height": h, "occ": occ, "rea": 0.01, "bytes": size,
            "product_pixels_preserved": preserved,
            "text": [{"role": "headline", "contrast_ratio": c, "background_color": None} for c in contrasts]}


def test_summary_from_two_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"outputs": [_ad("1:1", 1080, 1080, 0.1, [7.0, 4.6])]}))
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"outputs": [
        _ad("300x250", 300, 250, 0.3, [4.4], size=160 * 1024, preserved=False)]}))
    s = summarize_ads([tmp_path])
    assert s["ads"] == 2 and s["occ_mean"] == pytest.approx(0.2)
    assert s["contrast_min"] == 4.4 and s["contrast_pass_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["product_pixels_preserved_rate"] == 0.5 and s["display_max_kb"] == 160.0
    assert s["occ_by_format"] == {"1:1": 0.1, "300x250": 0.3}


def test_summary_errors(tmp_path):
    with pytest.raises(BadRequest):
        summarize_ads([tmp_path])
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BadRequest, match="not a product-ad manifest"):
        summarize_ads([tmp_path / "manifest.json"])
