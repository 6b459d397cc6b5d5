"""eval.grid: X/Y/Z plot parsing, validation before any pixel, the grid picture, grid.json and the CLI."""

from __future__ import annotations

import json
import time
import os

import numpy as np
import pytest
from PIL import Image

from fixtures.cli import run_cli
from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import GenerateRequest, LoraSpec
from imagesmith.engine.generate import Engine
from imagesmith.eval.grid import (AxisSpec, GridRequest, PeakMemory, expand_range, format_weight, labelled_grid,
                                  lora_set_label, parse_lora_set, run_grid, value_label, wrap_label, label_font)
from imagesmith.train import house_eval

DOC3_MIX = "a(1.0) | b(1.0) | c(1.0) | a(0.7)+b(0.5) | a(0.7)+c(0.5) | b(0.7)+c(0.5) | a(0.6)+b(0.4)+c(0.4)"
LORA = "tiny-lora-peft"


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def base(**kw) -> GenerateRequest:
    fields = dict(prompt="a red apple", model="tiny-sd15", width=64, height=64, steps=2, seed=5)
    return GenerateRequest(**{**fields, **kw})


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------- parsing
def test_document3_mix_parses_into_seven_lora_sets():
    axis = AxisSpec.parse(f"loras={DOC3_MIX}")
    assert axis.field == "loras"
    want = [[("a", 1.0)], [("b", 1.0)], [("c", 1.0)], [("a", 0.7), ("b", 0.5)], [("a", 0.7), ("c", 0.5)],
            [("b", 0.7), ("c", 0.5)], [("a", 0.6), ("b", 0.4), ("c", 0.4)]]
    assert [[(s.name, s.weight) for s in v] for v in axis.values] == want
    labels = [lora_set_label(v) for v in axis.values]
    assert labels == [t.strip() for t in DOC3_MIX.split("|")]


def test_lora_set_forms_and_errors():
    assert parse_lora_set("none") == [] and parse_lora_set("  ") == []
    assert parse_lora_set("x:0.3+y") == [LoraSpec(name="x", weight=0.3), LoraSpec(name="y", weight=1.0)]
    assert format_weight(1) == "1.0" and format_weight(0.45) == "0.45" and format_weight(-0.5) == "-0.5"
    for bad in ("a(x)", "a(1)+a(2)", "a(0.5)++b", "a(11)"):
        with pytest.raises(BadRequest):
            parse_lora_set(bad)


def test_values_ranges_separators_and_labels():
    assert AxisSpec.parse("steps=10-30 (+10)").values == [10, 20, 30]
    assert AxisSpec.parse("cfg_scale=3-7 [3]").values == [3.0, 5.0, 7.0]
    assert AxisSpec.parse("seed=1-3, 9").values == [1, 2, 3, "9"]
    assert expand_range("7-3 (-2)", float) == [7.0, 5.0, 3.0] and expand_range("-1", int) is None
    assert AxisSpec.parse("sampler=Euler a, DPM++ 2M").values == ["Euler a", "DPM++ 2M"]
    assert AxisSpec.parse("cfg=3,5").field == "cfg_scale"
    assert AxisSpec.parse("prompt_sr=red | blue, green").values == ["red", "blue, green"]
    assert value_label("cfg_scale", 5.0) == "CFG Scale: 5" and value_label("sampler_name", "Euler a") == "Euler a"
    assert value_label("steps", 20) == "Steps: 20" and value_label("model", None) == "default"
    with pytest.raises(BadRequest, match="cannot be a grid axis"):
        AxisSpec.parse("bogus=1,2")
    with pytest.raises(BadRequest, match="never gets"):
        AxisSpec.parse("steps=1-10 (0)")


def test_plan_builds_every_cell_and_shares_one_random_seed():
    req = GridRequest(base=base(seed=-1), x=AxisSpec.parse("cfg_scale=3,7"), y=AxisSpec.parse(f"loras=none|{LORA}(0.5)"),
                      z=AxisSpec.parse("prompt_sr=red,green"))
    plan = req.plan()
    assert plan.shape == (2, 2, 2) and len(plan.cells) == 8
    assert len({c.request.seed for c in plan.cells}) == 1 and plan.cells[0].request.seed >= 0
    last = plan.cells[-1].request
    assert last.cfg_scale == 7 and last.loras == [LoraSpec(name=LORA, weight=0.5)] and last.prompt == "a green apple"
    assert plan.labels(plan.cells[-1]) == ("CFG Scale: 7", f"{LORA}(0.5)", "green")


@pytest.mark.parametrize("axis, message", [
    ("bogus=1,2", "cannot be a grid axis"),
    ("cfg_scale=3,abc", r"x axis \(cfg_scale\): bad value 'abc'"),
    ("steps=5,0", r"x axis \(steps\): bad value '0'"),
    ("sampler_name=Euler,Nope", r"x axis \(sampler_name\): bad value 'Nope'"),
    ("width=64,60", "multiple of 8"),
    ("prompt_sr=green,blue", r"x axis \(prompt_sr\): 'green' is not in the prompt"),
    ("model=tiny-sd15,no-such-model", "no-such-model"),
    ("loras=none|no-such-lora(0.5)", "no-such-lora"),
])
def test_bad_axes_fail_before_any_png(engine, tmp_path, axis, message):
    out = tmp_path / "grid"
    with pytest.raises(BadRequest, match=message):
        run_grid(engine, GridRequest(base=base(), x=AxisSpec.parse(axis)), out)
    assert not list(tmp_path.rglob("*.png")) and not out.exists()


# ------------------------------------------------------------------------------------------- running
def test_cfg_by_lora_grid_files_sizes_json_and_pixels(engine, tmp_path):
    req = GridRequest(base=base(seed=-1), x=AxisSpec.parse("cfg_scale=3,7"), y=AxisSpec.parse(f"loras=none | {LORA}(1.0)"))
    events = []
    result = run_grid(engine, req, tmp_path / "g", progress=events.append)
    cells = sorted((tmp_path / "g" / "cells").glob("*.png"))
    assert len(cells) == 4 and result.grid_path == tmp_path / "g" / "grid.png" and not result.panel_paths
    lay = result.layout
    assert lay.left > 0 and lay.top > 0 and (lay.cell_width, lay.cell_height, lay.columns, lay.rows) == (64, 64, 2, 2)
    grid = Image.open(result.grid_path).convert("RGB")
    assert grid.size == (lay.left + 2 * 64, lay.top + 2 * 64)
    data = json.loads(result.json_path.read_text())
    assert set(data["axes"]) == {"x", "y"} and data["axes"]["y"]["labels"] == ["none", f"{LORA}(1.0)"]
    assert data["base"]["prompt"] == "a red apple" and data["base"]["seed"] >= 0
    assert len(data["cells"]) == 4 and len({c["seed"] for c in data["cells"]}) == 1
    for c in data["cells"]:
        assert c["seconds"] > 0 and c["peak_memory_bytes"] > 0 and c["memory_kind"] == "rss"
        assert os.path.exists(c["path"]) and c["x"].startswith("CFG Scale: ")
        # every cell sits in the grid at its place, pixel for pixel
        box = (lay.left + c["xi"] * 64, lay.top + c["yi"] * 64)
        crop = np.asarray(grid.crop((*box, box[0] + 64, box[1] + 64)), np.int16)
        assert np.array_equal(crop, pixels(c["path"]))
        meta = json.loads(Image.open(c["path"]).text["imagesmith"])
        assert meta["request"]["cfg_scale"] == (3.0 if c["xi"] == 0 else 7.0) and meta["seed"] == c["seed"]
    by = {(c["xi"], c["yi"]): pixels(c["path"]) for c in data["cells"]}
    assert np.abs(by[(0, 0)] - by[(0, 1)]).max() > 0  # the LoRA changes the picture
    assert np.abs(by[(0, 0)] - by[(1, 0)]).max() > 0  # so does CFG
    assert events and events[-1].step == events[-1].total == 4


def test_lora_weight_zero_matches_base_and_prompt_sr_rewrites_each_cell(engine, tmp_path):
    req = GridRequest(base=base(), x=AxisSpec.parse(f"loras=none | {LORA}(0.0)"),
                      y=AxisSpec.parse("prompt_sr=red,green"), z=AxisSpec.parse("steps=2,3"))
    result = run_grid(engine, req, tmp_path / "g")
    assert len(result.cells) == 8 and len(result.panel_paths) == 2
    by = {(c.xi, c.yi, c.zi): c for c in result.cells}
    for yi in (0, 1):
        assert np.array_equal(pixels(by[(0, yi, 0)].path), pixels(by[(1, yi, 0)].path))
    for c in result.cells:
        meta = json.loads(Image.open(c.path).text["imagesmith"])
        want = "a red apple" if c.yi == 0 else "a green apple"
        assert meta["request"]["prompt"] == want == c.prompt and c.y == ("red", "green")[c.yi]
        assert meta["request"]["steps"] == (2, 3)[c.zi]
    panel = Image.open(result.panel_paths[0])
    assert panel.size[0] == result.layout.left + 2 * 64 and panel.size[1] > result.layout.top + 2 * 64
    grid = Image.open(result.grid_path)
    assert grid.size == (panel.size[0], 2 * panel.size[1])


def test_peak_memory_sees_a_short_lived_allocation():
    """The sampled peak covers what the process held during the cell, even when the block is freed before
    the cell ends. (Compared with RSS read inside the cell, not with a fixed +96 MiB: in a long test run the
    allocator may reuse pages that are already resident.)"""
    from imagesmith.eval.grid import current_rss_bytes
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as busy:
        block = np.ones(96 * 2**20, np.uint8)  # 96 MiB, touched
        inside = current_rss_bytes()
        time.sleep(0.5)                         # alive for many sampling intervals (10 ms)
        del block
        after = current_rss_bytes()
    assert quiet.kind == busy.kind == "rss" and quiet.peak_bytes > 0
    assert busy.peak_bytes >= inside >= after - 2**20


def test_wrap_label_breaks_lora_sets_after_plus():
    font = label_font(12)
    lines = wrap_label("a(0.6)+b(0.4)+c(0.4)", font, 50)
    assert len(lines) > 1 and "".join(lines) == "a(0.6)+b(0.4)+c(0.4)"


def test_labelled_grid_moved_and_reexported():
    assert house_eval.labelled_grid is labelled_grid
    sheet = labelled_grid([(Image.new("RGB", (32, 32), "red"), "one"), (Image.new("RGB", (32, 32), "blue"), "two")], 2)
    assert sheet.size == (2 * 40, 32 + 6 + 26)


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def env(tiny_home, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))


TINY = ["--model", "tiny-sd15", "-W", "64", "-H", "64", "--steps", "2", "--seed", "3"]


def test_cli_grid_json(env, capsys, tmp_path):
    code, out, err = run_cli(capsys, "grid", "a red apple", "--x", "cfg_scale=3,7", "--y", f"loras=none|{LORA}(0.8)",
                             *TINY, "-o", str(tmp_path / "g"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["cells"]) == 4 and all(c["seed"] == 3 for c in data["cells"])
    assert os.path.exists(data["grid"]) and (tmp_path / "g" / "grid.json").exists()
    assert [c["y"] for c in data["cells"]] == ["none", "none", f"{LORA}(0.8)", f"{LORA}(0.8)"]


@pytest.mark.parametrize("axis", ["cfg_scale=3,abc", "nope=1", "cfg_scale"])
def test_cli_bad_axis_exits_2_with_one_line(env, capsys, tmp_path, axis):
    code, out, err = run_cli(capsys, "grid", "a red apple", "--x", axis, *TINY, "-o", str(tmp_path / "g"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("imagesmith: error:")
    assert not (tmp_path / "g").exists()
