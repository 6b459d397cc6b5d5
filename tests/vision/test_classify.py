"""`imagesmith classify`: zero-shot labels with house-clip, few-shot gates trained on frozen embeddings."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from fixtures.cli import run_cli


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


def _user_clip(home):
    """A user's transformers CLIP, dropped into models/clip/NAME (tiny and random here)."""
    from fixtures.tiny import build_tiny_transformers_clip
    return build_tiny_transformers_clip(home / "models" / "clip" / "tiny-clip")


def test_zero_shot_with_a_users_transformers_clip_matches_transformers_itself(tmp_path, capsys, monkeypatch):
    """--clip NAME runs zero-shot on the user's CLIP: the probabilities are exactly what transformers' own
    CLIPModel + CLIPProcessor give for the same prompts, and the row names the backbone."""
    import torch
    from transformers import CLIPModel, CLIPProcessor
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGESMITH_HOME", str(home))
    folder = _user_clip(home)
    shape((200, 30, 30), "disc", 1).save(tmp_path / "a.png")
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "apple,car,teapot",
                             "--clip", "tiny-clip", "--top", "3", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["model"] == "tiny-clip"
    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = CLIPProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        enc = proc(text=["a photo of an apple", "a photo of a car", "a photo of a teapot"],
                   images=[Image.open(tmp_path / "a.png").convert("RGB")], return_tensors="pt", padding=True)
        expected = model(**enc).logits_per_image.softmax(-1)[0].tolist()
    got = [row["probabilities"][k] for k in ("apple", "car", "teapot")]
    assert np.allclose(got, expected, atol=2e-4), (got, expected)
    # the same CLIP by folder path; house-clip by default gives another model's answer
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "apple,car,teapot",
                             "--clip", str(folder), "--top", "3", "--json")
    assert code == 0 and np.allclose([json.loads(out)["probabilities"][k] for k in ("apple", "car", "teapot")], got)
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "apple,car,teapot", "--json")
    assert json.loads(out)["model"] == "house-clip"
    # it is registered: models list --kind clip names it
    code, out, err = run_cli(capsys, "models", "list", "--kind", "clip", "--json")
    listed = json.loads(out)
    rows = listed if isinstance(listed, list) else listed.get("models", listed)
    assert any(r["name"] == "tiny-clip" and r["format"] == "transformers" for r in rows)
    assert any(r["name"] == "house-clip" for r in rows)
    # bad inputs: one clear line each
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "a,b", "--clip", "nope")
    assert code != 0 and "no CLIP named 'nope'" in err and "tiny-clip" in err and "Traceback" not in err
    pickled = home / "models" / "clip" / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "a.png"), "--labels", "a,b", "--clip", "pickled")
    assert code != 0 and "pickle" in err and "Traceback" not in err


def test_a_gate_trained_on_a_users_clip_records_and_reloads_that_clip(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGESMITH_HOME", str(home))
    folder = _user_clip(home)
    gate_dir = make_gate_folder(tmp_path / "gate")
    code, out, err = run_cli(capsys, "classify", "train", str(gate_dir), "--name", "red-gate-clip", "--clip",
                             "tiny-clip", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["embedder"] == "tiny-clip"
    # the head sits on tiny-clip's 16-d embeddings, not house-clip's
    from safetensors.torch import load_file
    assert load_file(str(home / "models" / "gates" / "red-gate-clip.safetensors"))["weight"].shape == (16, 2)
    shape((210, 40, 20), "disc", seed=999).save(tmp_path / "new.png")
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "new.png"), "--gate", "red-gate-clip", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert set(row["probabilities"]) == {"no", "yes"} and abs(sum(row["probabilities"].values()) - 1) < 1e-3
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "new.png"), "--gate", "red-gate-clip", "--clip",
                             "house-clip")
    assert code != 0 and "runs on the CLIP it was trained on (tiny-clip)" in err
    import shutil
    shutil.rmtree(folder)  # its CLIP removed: the gate says which one it needs
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "new.png"), "--gate", "red-gate-clip")
    assert code != 0 and "trained on the CLIP 'tiny-clip'" in err and "Traceback" not in err
