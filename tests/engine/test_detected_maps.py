"""A1111's "detected maps": the control image each ControlNet unit's preprocessor made, as the ControlNet saw it,
comes back with the pictures (GenerationResult.control_maps), is saved beside them by the CLI, and is listed in the
JSON summary; a unit whose preprocessor is 'none' (a ready-made map) has none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.requests import ControlNetSpec, GenerateRequest
from imagesmith.engine.controlnet import canny
from imagesmith.engine.generate import Engine


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def _photo(tmp_path) -> str:
    im = Image.new("RGB", (96, 96), (230, 230, 230))
    im.paste((20, 40, 160), (24, 20, 72, 80))
    im.save(tmp_path / "photo.png")
    return str(tmp_path / "photo.png")


def test_each_preprocessed_unit_returns_its_map(engine, tmp_path):
    photo = _photo(tmp_path)
    kw = dict(prompt="a box", model="tiny-sd15", width=64, height=64, steps=1, seed=1, sampler_name="Euler")
    units = [ControlNetSpec(model="tiny-controlnet", image=photo, preprocessor="canny"),
             ControlNetSpec(model="tiny-controlnet", image=photo, preprocessor="none", weight=0.5),
             ControlNetSpec(model="tiny-controlnet", image=photo, preprocessor="invert", weight=0.5)]
    result = engine.generate(GenerateRequest(**kw, controlnet=units))
    assert [(m["unit"], m["preprocessor"]) for m in result.control_maps] == [(0, "canny"), (2, "invert")]
    want = canny(Image.open(photo)).convert("RGB").resize((64, 64), Image.LANCZOS)
    assert np.array_equal(np.asarray(result.control_maps[0]["image"]), np.asarray(want))
    plain = engine.generate(GenerateRequest(**kw, controlnet=units[1]))
    assert plain.control_maps == []


def test_the_cli_saves_the_maps_beside_the_picture(tiny_home, tmp_path, monkeypatch, capsys):
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))
    photo = _photo(tmp_path)
    out = tmp_path / "out" / "boxed.png"
    code, stdout, err = run_cli(capsys, "generate", "a box", "--model", "tiny-sd15", "--width", "64", "--height",
                                "64", "--steps", "1", "--seed", "3", "--controlnet", "tiny-controlnet",
                                "--control-image", photo, "--control-preprocessor", "canny", "-o", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    saved = tmp_path / "out" / "boxed-control-0.png"
    assert summary["control_maps"] == [{"path": str(saved), "unit": 0, "preprocessor": "canny", "width": 64,
                                        "height": 64}]
    edges = np.asarray(Image.open(saved).convert("L"))
    assert edges.max() > 150 and (edges < 30).mean() > 0.5  # an edge map (resized to the output), not the photo


def test_several_controlnet_units_from_the_cli(tiny_home, tmp_path, monkeypatch, capsys):
    """--controlnet repeated: each --control-* option once for every unit or once per unit in order; the picture
    records both units and each preprocessed unit's map is saved; a count that fits neither is one line."""
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))
    photo = _photo(tmp_path)
    out = tmp_path / "two.png"
    args = ["generate", "a box", "--model", "tiny-sd15", "--width", "64", "--height", "64", "--steps", "1",
            "--seed", "3", "--controlnet", "tiny-controlnet", "--controlnet", "tiny-controlnet",
            "--control-image", photo, "--control-preprocessor", "canny", "--control-preprocessor", "invert",
            "--control-start", "0", "--control-end", "0.8"]
    code, stdout, err = run_cli(capsys, *args, "--control-weight", "0.5", "-o", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert [(m["unit"], m["preprocessor"]) for m in summary["control_maps"]] == [(0, "canny"), (1, "invert")]
    assert 'tiny-controlnet (canny, 0.5); tiny-controlnet (invert, 0.5)' in summary["images"][0]["infotext"]
    code, _, err = run_cli(capsys, *args, "--control-weight", "0.2", "--control-weight", "0.3",
                           "--control-weight", "0.4", "-o", str(tmp_path / "bad.png"))
    assert code != 0 and "--control-weight is given 3 times for 2 ControlNet units" in err
    assert not (tmp_path / "bad.png").exists()
