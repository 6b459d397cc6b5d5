"""The shipped house style LoRAs: registered, small, each changes house-ldm's pixels, weight 0 is the base;
and the SVG path the style datasets are rendered with."""

from __future__ import annotations

import numpy as np
import pytest

from imagesmith.core.requests import GenerateRequest, LoraSpec
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.house import SHIPPED_DIR
from imagesmith.train import house_styles as HS

NAMES = [HS.lora_name(s) for s in HS.STYLES]


def test_icon_svg_renders_with_alpha():
    icons = {"width": 16, "height": 16, "icons": {"dot": {"body": '<circle cx="8" cy="8" r="6" fill="#f00"/>'}}}
    im = HS.render_svg(HS.icon_svg(icons, "dot"), 64)
    a = np.asarray(im)
    assert im.size == (64, 64) and a[32, 32].tolist() == [255, 0, 0, 255] and a[0, 0, 3] == 0


def test_style_config_fills_each_style():
    cfg = HS.style_config("noto", SHIPPED_DIR)
    assert cfg.output_name == "style-noto" and cfg.trigger_word == "notomoji" and cfg.base_model == "house-ldm"
    assert all(p.startswith("notomoji, ") for p in cfg.sample_prompts)


def test_shipped_style_loras_are_small_with_cards():
    files = [SHIPPED_DIR / "loras" / f"{n}.safetensors" for n in NAMES]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 3_000_000  # "within a few MB" together
    for n in NAMES:
        card = (SHIPPED_DIR / "loras" / f"{n}.md").read_text()
        assert "Trigger word" in card and "@iconify-json/" in card


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("home"))
    settings.ensure_home()
    return Engine(settings, device="cpu")


def test_style_loras_are_registered_and_change_the_picture(engine):
    listed = {e.name for e in engine.registry.list("lora")}
    assert set(NAMES) <= listed
    req = dict(prompt="a red apple on a white backdrop", width=128, height=128, steps=8, seed=5)
    base = np.asarray(engine.generate(GenerateRequest(**req)).images[0], np.int16)
    for name in NAMES:
        trigger = HS.STYLES[name.removeprefix("style-")].trigger
        styled = dict(req, prompt=f"{trigger}, {req['prompt']}")
        zero = np.asarray(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=0)])).images[0], np.int16)
        one = np.asarray(engine.generate(GenerateRequest(**styled, loras=[LoraSpec(name=name, weight=1)])).images[0], np.int16)
        assert np.array_equal(zero, base), name
        assert np.abs(one - base).mean() > 3, name
