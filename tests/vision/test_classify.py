"""`imagesmith classify`: zero-shot labels with house-clip, few-shot gates trained on frozen embeddings."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from test_cli import run_cli


def shape(colour, kind: str, seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 250, 3)))
    d = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(16, 40, 2))
    r = int(rng.integers(18, 28))
    box = [x, y, x + 2 * r, y + 2 * r]
    (d.ellipse if kind == "disc" else d.rectangle)(box, fill=colour)
    return im


def make_gate_folder(root):
    for cls, colour in (("yes", (200, 30, 30)), ("no", (30, 60, 210))):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            shape(colour, "disc" if i % 2 else "square", seed=i + (0 if cls == "yes" else 100)).save(root / cls / f"{i}.png")
    return root


def test_gate_trains_reports_held_out_accuracy_and_classifies(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    folder = make_gate_folder(tmp_path / "gate")
    code, out, err = run_cli(capsys, "classify", "train", str(folder), "--name", "red-gate", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["classes"] == ["no", "yes"] and card["holdout_images"] == 4 and card["holdout_accuracy"] >= 0.75
    assert (tmp_path / "home" / "models" / "gates" / "red-gate.safetensors").is_file()
    shape((210, 40, 20), "disc", seed=999).save(tmp_path / "new.png")
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "new.png"), "--gate", "red-gate", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["label"] == "yes" and row["score"] > 0.5 and abs(sum(row["probabilities"].values()) - 1) < 1e-3
    # the gate is registered: `imagesmith models list --kind gate` names it with its classes and accuracy
    code, out, err = run_cli(capsys, "models", "list", "--kind", "gate", "--json")
    assert code == 0, err
    listed = json.loads(out)
    rows = listed if isinstance(listed, list) else listed.get("models", listed)
    gate = next(r for r in rows if r["name"] == "red-gate")
    assert gate["kind"] == "gate" and any("classes: no, yes" in n for n in gate["notes"])
    assert any(n.startswith("held-out accuracy") for n in gate["notes"])


def test_zero_shot_and_bad_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    shape((200, 30, 30), "disc", 1).save(tmp_path / "a.png")
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "red apple, blue car, teapot", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert set(row["probabilities"]) == {"red apple", "blue car", "teapot"} and row["label"] in row["probabilities"]
    for args, text in ((["classify", str(tmp_path / "a.png"), "--gate", "nope"], "no gate named 'nope'"),
                       (["classify", str(tmp_path / "a.png")], "--labels"),
                       (["classify", str(tmp_path / "missing.png"), "--labels", "a,b"], "missing.png"),
                       (["classify", str(tmp_path / "a.png"), "--labels", "only-one"], "at least two labels"),
                       (["classify", "train", str(tmp_path), "--name", "g"], "one sub-folder of images per class"),
                       (["classify", "train", str(tmp_path / "none"), "--name", "g"], "does not exist")):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and text in err and len(err.strip().splitlines()) == 1, (args, err)
