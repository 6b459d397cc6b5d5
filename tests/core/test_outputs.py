"""core.outputs, the one save path of every generated image: metadata, the safety gate's policy, naming, and the
callers that now go through it (CLI generate, the worker, grid cells, storyboard panels, restyle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.metadata import write_metadata_chunks
from imagesmith.core.outputs import SAFETY_KEY, flagged, save_image, save_result, screen
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.vision.safety import SafetyGate, SafetyPolicy


class FlagBright:
    """A gate with the SafetyGate interface that flags images brighter than a threshold (deterministic)."""

    def __init__(self, action: str, above: float = -1.0):
        self.policy = SafetyPolicy(action=action)
        self.above = above
        self._real = SafetyGate(self.policy)

    def check_image(self, image):
        from imagesmith.vision.safety import SafetyVerdict
        mean = float(np.asarray(image.convert("L")).mean())
        return SafetyVerdict(flagged=mean > self.above, reason=f"mean {mean:.0f}", score=mean / 255)

    def apply(self, image):
        return self._real.apply(image)  # the real gate's blur


@pytest.fixture(scope="module")
def result(tiny_home):
    engine = Engine(tiny_home, device="cpu")
    return engine.generate(GenerateRequest(prompt="a red apple", model="tiny-sd15", width=64, height=64, steps=2,
                                           seed=21, batch_size=2))


def test_metadata_and_names_are_the_webui_ones(result, tmp_path):
    (tmp_path / "00007-old.png").write_bytes(b"x")  # numbering continues after what is there
    saved = save_result(result, tmp_path, default_dir=tmp_path / "unused")
    assert [s.path.name for s in saved] == ["00008-21.png", "00009-22.png"]
    for s, record in zip(saved, result.records):
        im = Image.open(s.path)
        assert dict(im.text) == write_metadata_chunks(result, record) and s.infotext == record.infotext
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(result.images[record.index].convert("RGB")))


def test_withhold_writes_nothing_and_says_why(result, tmp_path):
    saved = save_result(result, tmp_path / "w", default_dir=tmp_path, gate=FlagBright("withhold"))
    assert all(s.path is None for s in saved) and not list((tmp_path / "w").glob("*.png"))
    assert [f["seed"] for f in flagged(saved)] == [21, 22] and flagged(saved)[0]["action"] == "withhold"


def test_blur_writes_the_blurred_image_with_the_reason(result, tmp_path):
    gate = FlagBright("blur")
    s = save_image(result.images[0], tmp_path / "b.png", result=result, record=result.records[0], gate=gate)
    im = Image.open(s.path)
    assert im.text[SAFETY_KEY].startswith("blurred: mean ") and "parameters" in im.text
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(gate.apply(result.images[0]).convert("RGB")))
    original = np.asarray(result.images[0].convert("RGB"), np.int16)
    assert np.abs(np.asarray(im.convert("RGB"), np.int16) - original).max() > 0


def test_placeholder_keeps_a_layout_and_an_unflagged_image_is_untouched(result, tmp_path):
    seen = screen(result.images[0], FlagBright("withhold"), placeholder=True)
    assert seen.image.size == result.images[0].size and seen.flag["action"] == "withhold"
    assert np.asarray(seen.image.convert("L")).std() < 40  # a flat grey tile with a word on it
    calm = screen(result.images[0], FlagBright("withhold", above=300))
    assert calm.image is result.images[0] and calm.flag is None


def test_service_grid_cells_pass_the_gate(tiny_home, tmp_path):
    """A grid job's cells went straight to disk before; now every cell and its place in the grid pass the gate."""
    from imagesmith.eval.grid import AxisSpec, GridRequest, run_grid
    engine = Engine(tiny_home, device="cpu")
    base = GenerateRequest(prompt="a red apple", model="tiny-sd15", width=64, height=64, steps=2, seed=5)
    req = GridRequest(base=base, x=AxisSpec.parse("cfg_scale=3,7"))
    plain = run_grid(engine, req, tmp_path / "plain")
    gated = run_grid(engine, req, tmp_path / "gated", gate=FlagBright("withhold"))
    data = json.loads(gated.json_path.read_text())
    assert all(c["safety"]["action"] == "withhold" for c in data["cells"])
    assert all(c["safety"] is None for c in json.loads(plain.json_path.read_text())["cells"])
    cell = Image.open(data["cells"][0]["path"])
    assert cell.text[SAFETY_KEY].startswith("withheld: ") and np.asarray(cell.convert("L")).std() < 40
    lay = gated.layout
    grid = np.asarray(Image.open(gated.grid_path).convert("RGB"), np.int16)
    tile = grid[lay.top:lay.top + 64, lay.left:lay.left + 64]
    assert np.array_equal(tile, np.asarray(cell.convert("RGB"), np.int16))  # the grid shows the tile, not the cell


def test_cli_safety_action_from_the_environment(monkeypatch, tmp_path):
    from imagesmith.core.settings import Settings
    monkeypatch.setenv("IMAGESMITH_SAFETY_ACTION", "blur")
    assert SafetyGate.from_settings(Settings.from_env(home=tmp_path)).policy.action == "blur"
    monkeypatch.setenv("IMAGESMITH_SAFETY_ACTION", "delete")
    with pytest.raises(ValueError):
        Settings.from_env(home=tmp_path)


def test_cpu_offload_modes_from_the_environment(monkeypatch, tmp_path):
    """IMAGESMITH_CPU_OFFLOAD: 1/model (each component on the GPU while it runs) or sequential (each layer)."""
    from imagesmith.core.settings import Settings
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path))
    for value, model, sequential in (("", False, False), ("1", True, False), ("model", True, False),
                                     ("sequential", True, True), ("Sequential", True, True), ("no", False, False)):
        monkeypatch.setenv("IMAGESMITH_CPU_OFFLOAD", value)
        s = Settings.from_env()
        assert (s.cpu_offload, s.sequential_offload) == (model, sequential), value
