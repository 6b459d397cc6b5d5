"""`imagesmith cutout`, `analyze` and `ad` from the command line: files written, JSON readable, and one
clear line with a non-zero exit for every bad input (no partial output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.cli import run_cli
from test_product_ad import product_photo


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    return tmp_path


def test_cutout_writes_rgba_with_the_product(home, capsys):
    photo = product_photo(home / "p.jpg")
    out = home / "cut.png"
    code, stdout, err = run_cli(capsys, "cutout", str(photo), "-o", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    alpha = np.asarray(Image.open(out).getchannel("A"))
    assert Image.open(out).mode == "RGBA" and alpha.shape == (400, 480)
    assert alpha[230, 240] > 250 and alpha[20, 20] < 5          # bottle body kept, table corner gone
    x0, y0, x1, y1 = summary["box"]
    assert 180 <= x0 <= 200 and 280 <= x1 <= 300 and 60 <= y0 <= 80 and 330 <= y1 <= 350


def test_cutout_bad_inputs_one_line(home, capsys):
    txt = home / "notes.txt"
    txt.write_text("not an image")
    code, stdout, err = run_cli(capsys, "cutout", str(txt), "-o", str(home / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not (home / "x.png").exists()
    blank = home / "blank.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(blank)
    code, _, err = run_cli(capsys, "cutout", str(blank), "-o", str(home / "y.png"))
    assert code == 2 and "product" in err and not (home / "y.png").exists()


def test_analyze_json(home, capsys):
    photo = product_photo(home / "p.jpg")
    code, stdout, err = run_cli(capsys, "analyze", str(photo), "--json", "--maps", str(home / "maps"))
    assert code == 0, err
    data = json.loads(stdout)
    assert data["tone"] in ("warm", "cool", "neutral") and 0 <= data["brightness"] <= 1
    assert abs(sum(c["share"] for c in data["dominant_colors"]) - 1) < 1e-3
    assert data["copy_regions"] and all(Path(p).is_file() for p in data["maps"].values())


@pytest.mark.parametrize("args, needle", [
    (["--formats", "1:1,16:10"], "16:10"),
    (["--brand-color", "#12345g"], "#12345g"),
    (["--harmonize", "--harmonize-mode", "most"], "most"),
])
def test_ad_bad_options_fail_before_work(home, capsys, args, needle):
    photo = product_photo(home / "p.jpg")
    code, _, err = run_cli(capsys, "ad", str(photo), "--concept", "x", "--headline", "Hi", *args,
                           "-o", str(home / "ads"))
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (home / "ads" / "manifest.json").exists()


def test_ad_folder_batch_json(home, capsys):
    folder = home / "photos"
    folder.mkdir()
    product_photo(folder / "a.jpg", seed=1)
    product_photo(folder / "b.jpg", seed=2)
    code, stdout, err = run_cli(capsys, "ad", str(folder), "--concept", "a bottle on a wooden table",
                                "--headline", "신제품 출시 Sale", "--cta", "Buy", "--formats", "300x250",
                                "--steps", "2", "--upscaler", "Lanczos", "--seed", "5", "-o", str(home / "ads"),
                                "--json")
    assert code == 0, err
    manifest = json.loads(stdout)
    assert [Path(o["product"]).name for o in manifest["outputs"]] == ["a.jpg", "b.jpg"]
    for o in manifest["outputs"]:
        assert o["seed"] == 5 and Path(o["path"]).stat().st_size <= 150 * 1024
        assert {t["role"] for t in o["text"]} >= {"headline", "cta"}
        assert all(t["contrast_ratio"] >= 4.5 for t in o["text"])
