"""`imagesmith restyle`: gate -> describe -> prompt -> generate -> object boxes, on the house models (few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.core.errors import NotFound
from imagesmith.core.requests import LoraSpec
from imagesmith.engine.generate import Engine
from imagesmith.models.house_clip import default_house_clip_dir
from imagesmith.workflows.restyle import Refused, RestyleRequest, find_objects, restyle

from fixtures.cli import run_cli

LABELS = set(json.loads((default_house_clip_dir() / "labels.json").read_text(encoding="utf-8")))
FAST = dict(steps=3, seed=11)


def product(colour=(220, 40, 40), backdrop=(235, 225, 200), size=128, kind="disc") -> Image.Image:
    """A product-like photo: one object on a plain studio backdrop."""
    im = Image.new("RGB", (size, size), backdrop)
    d = ImageDraw.Draw(im)
    box = [size * 0.25, size * 0.25, size * 0.75, size * 0.75]
    (d.ellipse if kind == "disc" else d.rectangle)(box, fill=colour)
    return im


def make_gate_folder(root):
    rng = np.random.default_rng(0)
    for cls, colour in (("yes", (210, 30, 30)), ("no", (30, 60, 210))):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            bg = tuple(int(v) for v in rng.integers(200, 250, 3))
            product(colour, bg, 96, "disc" if i % 2 else "square").save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An IMAGESMITH_HOME with one trained gate ('red-gate': yes = red objects)."""
    from imagesmith.core.settings import Settings
    from imagesmith.vision.classify import train_gate
    root = tmp_path_factory.mktemp("restyle-home")
    settings = Settings(home=root / "home")
    train_gate(make_gate_folder(root / "gate"), "red-gate", settings=settings, steps=150)
    product().save(root / "red.png")
    product((30, 60, 210), (240, 240, 240), kind="square").save(root / "blue.png")
    return root, settings


@pytest.fixture(scope="module")
def engine(home):
    return Engine(home[1], device="cpu")


@pytest.fixture(scope="module")
def parts():
    from imagesmith.models.segment import resolve_segmenter
    from imagesmith.vision.caption import Captioner
    seg = resolve_segmenter(None)
    return Captioner(segmenter=seg), seg


@pytest.fixture
def env(home, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(home[1].home))
    return home[0]


def _check_record(rec: dict, size: tuple[int, int]):
    w, h = size
    assert rec["objects"], rec
    for o in rec["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert o["label"] in LABELS and 0 < o["score"] <= 1
        assert all(a["label"] in LABELS for a in o["alternatives"])
    areas = [o["area"] for o in rec["objects"]]
    assert areas == sorted(areas, reverse=True) and min(areas) >= 0.01


def test_restyle_txt2img_end_to_end(home, engine, parts, tmp_path):
    root, _ = home
    cap, seg = parts
    out = tmp_path / "out"
    req = RestyleRequest(photo=str(root / "red.png"), gate="red-gate", concept="on a marble table",
                         loras=[LoraSpec(name="style-noto", weight=0.8)], **FAST)
    result = restyle(req, engine=engine, output=out, captioner=cap, segmenter=seg)
    rec = result.record
    assert sorted(p.name for p in out.iterdir()) == ["boxes.png", "restyle.json", "restyled.png"]
    assert json.loads((out / "restyle.json").read_text()) == json.loads(json.dumps(rec))
    assert rec["gate"]["passed"] and rec["gate"]["class"] == "yes" and rec["gate"]["score"] >= 0.5
    from imagesmith.vision.imagenet import classes, short_label
    named_by = LABELS if rec["description"]["object_source"] == "house-clip" else {short_label(c) for c in classes()}
    assert rec["description"]["object"] in named_by and rec["prompt"].endswith(", on a marble table")
    assert rec["description"]["object"] in rec["prompt"]
    assert rec["mode"] == "txt2img" and rec["seed"] == 11 and rec["settings"]["model"] == "house-ldm"
    image = Image.open(out / "restyled.png")
    assert image.size == (rec["settings"]["width"], rec["settings"]["height"]) == (128, 128)
    assert "Seed: 11" in image.text["parameters"] and "<lora:style-noto:0.8>" in image.text["parameters"]
    _check_record(rec, image.size)
    boxes = Image.open(out / "boxes.png")
    assert boxes.size == (128 * rec["boxes_scale"], 128 * rec["boxes_scale"]) and rec["boxes_scale"] >= 4
    # re-running into the same folder replaces the files; no temporary folder is left beside it
    restyle(req, engine=engine, output=out, captioner=cap, segmenter=seg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_restyle_img2img_with_strength(home, engine, parts):
    root, _ = home
    cap, seg = parts
    wide = product(size=192).crop((0, 32, 192, 160))  # 192x128: the aspect is kept at the native long side
    wide.save(root / "wide.png")
    result = restyle(RestyleRequest(photo=str(root / "wide.png"), strength=0.6, **FAST), engine=engine,
                     captioner=cap, segmenter=seg)
    rec = result.record
    assert rec["mode"] == "img2img" and rec["settings"]["strength"] == 0.6 and rec["gate"] is None
    assert result.image.size == (128, 88) and "Denoising strength: 0.6" in rec["infotext"]
    assert rec["prompt"] == rec["description"]["caption"]  # no concept: the caption is the prompt
    _check_record(rec, result.image.size)


def test_gate_refusal_and_unknown_gate(home, engine, parts, tmp_path):
    root, _ = home
    cap, seg = parts
    out = tmp_path / "never"
    with pytest.raises(Refused, match=r"refused by gate 'red-gate': yes 0\.\d+ < 0\.5 \(no 0\.\d+\)"):
        restyle(RestyleRequest(photo=str(root / "blue.png"), gate="red-gate", **FAST), engine=engine, output=out,
                captioner=cap, segmenter=seg)
    with pytest.raises(NotFound, match="no gate named 'nope'"):
        restyle(RestyleRequest(photo=str(root / "red.png"), gate="nope", **FAST), engine=engine, output=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_find_objects_boxes_from_the_matte(parts):
    cap, _ = parts

    class Blobs:  # a matte with two objects and one speck
        def predict(self, image):
            a = np.zeros((100, 160), np.float32)
            a[10:50, 20:70] = 1.0
            a[60:90, 100:150] = 0.9
            a[5:7, 150:152] = 1.0
            return a
    objs = find_objects(Image.new("RGB", (160, 100), "white"), Blobs(), cap)
    assert [o["box"] for o in objs] == [[20, 10, 70, 50], [100, 60, 150, 90]]
    assert [o["area"] for o in objs] == [0.125, 0.0938]
    assert all(o["label"] in LABELS for o in objs)
    assert find_objects(Image.new("RGB", (64, 64)), type("Empty", (), {"predict": lambda s, im: np.zeros((64, 64))})(),
                        cap) == []


def test_cli_restyle_json(env, capsys, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = run_cli(capsys, "restyle", str(env / "red.png"), "--gate", "red-gate", "--concept", "studio",
                                "--lora", "style-openmoji:0.5", "--seed", "5", "--steps", "2", "-o", str(out), "--json")
    assert code == 0, err
    rec = json.loads(stdout)
    assert rec["seed"] == 5 and rec["gate"]["passed"] and (out / "boxes.png").is_file()
    assert rec["settings"]["loras"] == [{"name": "style-openmoji", "weight": 0.5}]


@pytest.mark.parametrize("args,needle", [
    (["MISSING", "--concept", "x"], "missing.png"),
    (["RED", "--gate", "nope"], "no gate named 'nope'"),
    (["BLUE", "--gate", "red-gate"], "refused by gate 'red-gate'"),
    (["RED", "--lora", "bad:weight"], "NAME:WEIGHT"),
    (["RED", "--strength", "1.5"], "strength"),
    (["RED", "--gate", "red-gate", "--gate-class", "maybe"], "no class 'maybe'"),
])
def test_cli_restyle_bad_inputs(env, capsys, tmp_path, args, needle):
    photos = {"MISSING": str(tmp_path / "missing.png"), "RED": str(env / "red.png"), "BLUE": str(env / "blue.png")}
    args = [photos.get(a, a) for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "restyle", *args, "--steps", "2", "-o", str(out))
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("imagesmith: error:") and needle in lines[0], lines
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_restyle_with_a_gate_and_describer_on_a_users_clip(home, engine, parts, tmp_path):
    """A gate trained on a user's transformers CLIP keeps using that CLIP even when the caller shares its
    house-clip captioner; --clip makes the user's CLIP describe the photo and label the objects."""
    from fixtures.tiny import build_tiny_transformers_clip
    from imagesmith.vision.classify import train_gate
    root, settings = home
    build_tiny_transformers_clip(settings.models_dir / "clip" / "tiny-clip")
    train_gate(make_gate_folder(tmp_path / "gate"), "red-gate-tiny", settings=settings, steps=150, clip="tiny-clip")
    cap, seg = parts
    res = restyle(RestyleRequest(photo=str(root / "red.png"), gate="red-gate-tiny", gate_threshold=0.0, **FAST),
                  engine=engine, captioner=cap, segmenter=seg)
    assert res.record["gate"]["passed"] and set(res.record["gate"]["probabilities"]) == {"no", "yes"}
    assert res.record["description"]["clip"] == "house-clip"  # the shared captioner described it
    res = restyle(RestyleRequest(photo=str(root / "red.png"), clip="tiny-clip", **FAST), engine=engine, segmenter=seg)
    assert res.record["description"]["clip"] == "tiny-clip"
    assert res.record["description"]["describer"].startswith("tiny-clip + ")
