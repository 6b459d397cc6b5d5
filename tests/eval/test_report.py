"""`imagesmith eval report` on the tiny SD1.5 model with the tiny LoRAs: every configuration and metric in the
HTML, Markdown and JSON; a plain-language summary; bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from imagesmith.engine.generate import Engine
from imagesmith.eval.report import ReportConfig, run_report

from fixtures.cli import run_cli

CONFIG = {
    "title": "tiny check",
    "base": {"model": "tiny-sd15", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler"},
    "prompts": ["a red apple", "a blue car"],
    "seeds": [1, 2],
    "configurations": [
        {"name": "base", "loras": "none"},
        {"name": "peft", "loras": "tiny-lora-peft(1.0)", "prompt_prefix": "shiny, "},
        {"name": "mix", "loras": "tiny-lora-peft(0.6)+tiny-lora-kohya(0.4)", "overrides": {"cfg_scale": 3}},
    ],
}


def test_report_has_every_configuration_and_metric(tiny_home, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    cfg = ReportConfig.from_yaml(path)
    report = run_report(Engine(tiny_home, device="cpu"), cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert len(report["images"]) == 3 * 2 * 2 and len(list((out / "images").glob("*.png"))) == 12
    names = [t["configuration"] for t in report["per_configuration"]]
    assert names == ["base", "peft", "mix"]
    for t in report["per_configuration"]:
        assert 0 <= t["clip_score_house"] <= 100 and t["seconds_per_image"] > 0 and t["peak_memory_mb"] > 0
        assert t["clip_score_house_seed_std"] >= 0 and t["seed_pixel_difference"] > 0  # seeds differ
    assert set(report["winners"]) >= {"clip_score_house", "seconds_per_image", "peak_memory_mb",
                                      "seed_pixel_difference"}
    assert "Fastest" in report["summary"] and "Least memory" in report["summary"]
    # the LoRAs act: the configurations' images differ for the same prompt and seed
    rows = {(r["configuration"], r["prompt"], r["seed"]): r for r in report["images"]}
    from PIL import Image
    import numpy as np
    a = np.asarray(Image.open(out / rows[("base", "a blue car", 1)]["image"]), np.int16)
    b = np.asarray(Image.open(out / rows[("mix", "a blue car", 1)]["image"]), np.int16)
    assert np.abs(a - b).mean() > 0.5
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name in names:
        assert name in html and f"| {name} |" in md
    for header in ("CLIP score (house-clip)", "s / image", "peak memory MB", "pixel difference between seeds"):
        assert header in html and header in md
    assert html.count("data:image/jpeg;base64,") == 12  # self-contained
    assert (out / "sheet.jpg").is_file() and json.loads((out / "report.json").read_text())["title"] == "tiny check"


def test_bad_report_configs_name_the_key(tiny_home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))
    for cfg, expected in ((dict(CONFIG, promts=["x"]), "unknown key 'promts'"),
                          (dict(CONFIG, configurations=[{"name": "x", "overrides": {"steps": -3}}]),
                           "configuration 'x': 'steps'"),
                          (dict(CONFIG, prompts=[]), "'prompts'")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, _, err = run_cli(capsys, "eval", "report", str(path))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_example_report_config_is_valid():
    path = Path(__file__).resolve().parents[2] / "examples" / "report" / "house-styles.yaml"
    cfg = ReportConfig.from_yaml(path)
    assert len(cfg.requests()) == 8 * 3 * 2
    assert [c.loras for c in cfg.configurations][1:] == [
        "style-fluent-flat(1.0)", "style-noto(1.0)", "style-openmoji(1.0)", "style-fluent-flat(0.7)+style-noto(0.5)",
        "style-fluent-flat(0.7)+style-openmoji(0.5)", "style-noto(0.7)+style-openmoji(0.5)",
        "style-fluent-flat(0.6)+style-noto(0.4)+style-openmoji(0.4)"]  # document 3's seven mixes


def test_a_local_transformers_clip_adds_its_own_score_column(tiny_home, tmp_path):
    """A user's own CLIP (here a tiny random one saved as a transformers folder) gives a second, named score."""
    from fixtures.tiny import build_tiny_transformers_clip
    folder = build_tiny_transformers_clip(tmp_path / "tiny-clip")
    small = dict(CONFIG, prompts=["a red apple"], seeds=[1, 2], configurations=CONFIG["configurations"][:2],
                 clip_model=str(folder))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small))
    report = run_report(Engine(tiny_home, device="cpu"), ReportConfig.from_yaml(path), tmp_path / "out")
    assert report["clip_backbones"]["clip_score_extra"] == "transformers CLIP (tiny-clip)"
    assert all(0 <= r["clip_score_extra"] <= 100 for r in report["images"])
    assert "CLIP score (transformers CLIP (tiny-clip))" in (tmp_path / "out" / "report.md").read_text()
