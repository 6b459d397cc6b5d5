"""The CLI end to end: files, metadata, --from, --json, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.cli import TINY, run_cli



@pytest.fixture
def env(tiny_home, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))
    return {**os.environ, "IMAGESMITH_HOME": str(tiny_home.home)}




def test_generate_json_and_info_round_trip(env, capsys, tmp_path):
    out = tmp_path / "a.png"
    code, stdout, err = run_cli(capsys, "generate", "a (red:1.2) apple", "--seed", "11", *TINY, "-o", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["images"][0]["path"] == str(out) and summary["images"][0]["seed"] == 11
    im = Image.open(out)
    assert "Seed: 11" in im.text["parameters"] and "Model: tiny-sd15" in im.text["parameters"]
    payload = json.loads(im.text["imagesmith"])
    assert payload["request"]["prompt"] == "a (red:1.2) apple" and payload["seed"] == 11
    assert payload["version"]
    code, stdout, _ = run_cli(capsys, "info", str(out), "--json")
    assert code == 0 and json.loads(stdout)["imagesmith"]["seed"] == 11


@pytest.mark.parametrize("sampler,noise,pick", [("Euler a", "a1111-cpu", 2), ("DPM++ 2M SDE", "comfy", 3),
                                               ("dpmpp_sde", "a1111-cpu", 1)])
def test_from_regenerates_identical_pixels_from_a_batch(env, capsys, tmp_path, sampler, noise, pick):
    folder = tmp_path / "batch"
    code, _, err = run_cli(capsys, "generate", "a pear", "--seed", "20", "--batch-size", "2", "--batch-count", "2",
                           "--sampler", sampler, "--noise", noise, *TINY, "-o", str(folder))
    assert code == 0, err
    files = sorted(folder.glob("*.png"))
    assert len(files) == 4
    third = files[pick]
    code, _, err = run_cli(capsys, "generate", "--from", str(third), "-o", str(tmp_path / "again.png"))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(third)), np.asarray(Image.open(tmp_path / "again.png")))


def test_latents_are_written_for_comparison_with_other_tools(env, capsys, tmp_path):
    from safetensors import safe_open
    out = tmp_path / "lat.safetensors"
    code, _, err = run_cli(capsys, "generate", "a pear", "--seed", "5", "--batch-size", "2", "--noise", "comfy",
                           "--sampler", "euler", "--scheduler", "normal", *TINY, "-o", str(tmp_path / "imgs"),
                           "--latents", str(out))
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        lat = f.get_tensor("latents")
        assert f.metadata()["noise"] == "comfy" and f.metadata()["seeds"] == "5,5"
    assert tuple(lat.shape) == (2, 4, 8, 8) and lat.dtype == torch.float32 and lat.std() > 0.05
    code, _, err = run_cli(capsys, "generate", "x", *TINY, "--latents", str(tmp_path / "lat.pt"))
    assert code != 0 and "--latents needs a .safetensors file" in err and not (tmp_path / "lat.pt").exists()


def test_seed_determinism_across_processes(env, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"p{i}.png"
        subprocess.run([sys.executable, "-m", "imagesmith.cli", "generate", "a lemon", "--seed", "3",
                        "--sampler", "DPM++ 2M SDE", *TINY, "-o", str(p)], env=env, check=True, capture_output=True)
        paths.append(p)
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))


def test_models_list_json(env, capsys):
    code, stdout, _ = run_cli(capsys, "models", "list", "--json")
    rows = json.loads(stdout)
    names = {r["name"]: r for r in rows}
    assert names["tiny-sd15"]["kind"] == "checkpoint" and names["tiny-sd15"]["arch"] == "sd1"
    assert names["tiny-sdxl"]["arch"] == "sdxl"
    assert any(r["kind"] == "lora" for r in rows) and any(r["kind"] == "upscaler" for r in rows)
    assert all({"name", "kind", "arch", "path", "size_bytes"} <= set(r) for r in rows)


BAD = [
    (["generate", "x", "--model", "nope"], "nope"),
    (["generate", "x", *TINY, "--lora", "missing-lora:0.5"], "missing-lora"),
    (["generate", "x", *TINY, "--sampler", "Euler z"], "unknown sampler"),
    (["generate", "x", "--model", "tiny-sd15", "-W", "65", "-H", "64"], "multiple of 8"),
    (["generate", "x", "--model", "tiny-sd15", "-W", "4096", "-H", "4096"], "pixel cap"),
    (["generate", "x", "--model", "tiny-sd15", "--steps", "0"], "steps"),
    (["generate", "x", "--model", "tiny-sd15", "--steps", "-3"], "steps"),
    (["generate", "x", *TINY, "--lora", "bad:weight"], "NAME:WEIGHT"),
    (["generate", "x", "--model", "tiny-sd15", "--steps", "abc"], "integer"),
    (["generate", "x", *TINY, "--no-such-flag"], "no-such-flag"),
    (["generate", "x", *TINY, "--outpaint", "8,8"], "outpaint"),
    (["generate", "x", *TINY, "--init-image", "i.png", "--outpaint", "8,0,8,0", "--mask", "m.png"], ""),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_input_one_line_nonzero(env, capsys, tmp_path, args, needle):
    out = tmp_path / "never.png"
    code, stdout, err = run_cli(capsys, *args, "-o", str(out))
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert needle.lower() in lines[0].lower()
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def _bad_images(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "missing.png",
        "not an image": tmp_path / "text.png",
        "truncated": tmp_path / "trunc.png",
    }
    files["not an image"].write_text("hello, I am not a picture")
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


@pytest.mark.parametrize("kind", ["missing", "not an image", "truncated"])
def test_bad_init_image(env, capsys, tmp_path, kind):
    path = _bad_images(tmp_path)[kind]
    out = tmp_path / "out" / "never.png"
    code, _, err = run_cli(capsys, "generate", "x", *TINY, "--init-image", str(path), "-o", str(out))
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_oversized_image_bytes(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_MAX_IMAGE_BYTES", "1000")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    code, _, err = run_cli(capsys, "generate", "x", *TINY, "--init-image", str(big), "-o", str(tmp_path / "o.png"))
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_decompression_bomb(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_MAX_INPUT_PIXELS", str(100 * 100))
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    code, _, err = run_cli(capsys, "generate", "x", *TINY, "--init-image", str(tmp_path / "bomb.png"),
                           "-o", str(tmp_path / "o.png"))
    assert code != 0 and "pixels" in err.lower() and len(err.strip().splitlines()) == 1


def test_mask_size_mismatch_cli(env, capsys, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    Image.new("L", (40, 40)).save(tmp_path / "m.png")
    code, _, err = run_cli(capsys, "generate", "x", *TINY, "--init-image", str(tmp_path / "i.png"),
                           "--mask", str(tmp_path / "m.png"), "-o", str(tmp_path / "o.png"))
    assert code != 0 and "mask" in err and not (tmp_path / "o.png").exists()


def test_upscale_command(env, capsys, tmp_path):
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "s.png")
    code, stdout, err = run_cli(capsys, "upscale", str(tmp_path / "s.png"), "--upscaler", "Lanczos", "--scale", "2",
                                "-o", str(tmp_path / "u.png"), "--json")
    assert code == 0, err
    assert Image.open(tmp_path / "u.png").size == (32, 32)
    code, _, err = run_cli(capsys, "upscale", str(tmp_path / "s.png"), "--upscaler", "nope", "-o", str(tmp_path / "x.png"))
    assert code != 0 and not (tmp_path / "x.png").exists()


def test_model_by_path_draws_the_same_as_by_name(env, capsys, tmp_path, tiny_models):
    """`--model PATH` takes a checkpoint folder outside the model folders (a fresh training export)."""
    import shutil
    export = tmp_path / "my-export"
    shutil.copytree(tiny_models.paths["tiny-sd15"], export)
    (tmp_path / "pickled.ckpt").write_bytes(b"\x80\x04K\x01.")
    images = []
    for ref in ("tiny-sd15", str(export)):
        out = tmp_path / f"{len(images)}.png"
        code, _, err = run_cli(capsys, "generate", "a pear", "--seed", "5", *TINY, "--model", ref, "-o", str(out))
        assert code == 0, err
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(images[0], images[1]) and images[0].std() > 0
    assert "Model: my-export" in Image.open(tmp_path / "1.png").text["parameters"]
    for ref, needle in ((str(tmp_path / "no-such-export"), "no such file"), (str(tmp_path / "pickled.ckpt"), "pickle"),
                        (str(tmp_path), "not a diffusers model folder")):
        out = tmp_path / "never.png"
        code, _, err = run_cli(capsys, "generate", "a pear", *TINY, "--model", ref, "-o", str(out))
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code != 0 and len(lines) == 1 and needle in lines[0], err
        assert not out.exists()


def test_generate_flags_are_the_api_field_names_with_webui_aliases(env, capsys, tmp_path):
    """Every scalar field of GenerateRequest (what the API and A1111 clients send) is a flag of `generate` under
    its own name; the WebUI-style short names stay as aliases and mean the same."""
    import typer.main

    from imagesmith.cli import app
    from imagesmith.core.requests import GenerateRequest
    command = typer.main.get_command(app).commands["generate"]
    flags = {name for p in command.params if p.param_type_name == "option" for name in p.opts + p.secondary_opts}
    nested = {"prompt", "loras", "hires", "controlnet", "detailer", "outpaint", "init_image", "mask", "variation_seed"}
    missing = [f for f in GenerateRequest.model_fields if f not in nested and "--" + f.replace("_", "-") not in flags]
    assert not missing, missing
    for alias in ("--cfg", "--sampler", "--strength", "--hires", "--hires-steps", "--hires-strength", "--upscaler",
                  "--negative", "-n", "--ensd", "--schedule", "--ground"):
        assert alias in flags, alias
    common = ["generate", "a lemon", *TINY, "--seed", "3", "--json"]
    long = run_cli(capsys, *common, "--cfg-scale", "5", "--sampler-name", "Euler", "--negative-prompt", "blur",
                   "-o", str(tmp_path / "long.png"))
    short = run_cli(capsys, *common, "--cfg", "5", "--sampler", "Euler", "-n", "blur", "-o", str(tmp_path / "short.png"))
    assert long[0] == short[0] == 0
    a = json.loads(long[1])["images"][0]["infotext"]
    assert a == json.loads(short[1])["images"][0]["infotext"] and "CFG scale: 5" in a and "Negative prompt: blur" in a
    assert np.array_equal(np.asarray(Image.open(tmp_path / "long.png")), np.asarray(Image.open(tmp_path / "short.png")))


def test_controlnet_detect_saves_the_detected_map(env, capsys, tmp_path):
    drawing = Image.new("RGB", (64, 64), "white")
    drawing.paste((0, 0, 0), (30, 8, 34, 56))
    drawing.save(tmp_path / "stroke.png")
    out = tmp_path / "map.png"
    code, stdout, err = run_cli(capsys, "controlnet", "detect", str(tmp_path / "stroke.png"), "-p", "invert",
                                "-o", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout) == {"output": str(out), "preprocessor": "invert", "width": 64, "height": 64}
    detected = np.asarray(Image.open(out).convert("L"))
    assert detected[32, 32] == 255 and detected[32, 8] == 0
    code, _, err = run_cli(capsys, "controlnet", "detect", str(tmp_path / "stroke.png"), "-p", "depth",
                           "-o", str(tmp_path / "nope.png"))
    assert code == 2 and "unknown preprocessor 'depth'" in err and "\n" not in err.strip()
    assert not (tmp_path / "nope.png").exists()
    import skimage.data as data  # a real face: the OpenPose modules add the keypoints as OpenPose JSON
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    code, stdout, err = run_cli(capsys, "controlnet", "detect", str(tmp_path / "astronaut.png"), "-p",
                                "openpose_faceonly", "-o", str(tmp_path / "face.png"), "--json")
    assert code == 0, err
    (person,) = json.loads(stdout)["poses"]["people"]
    assert len(person["face_keypoints_2d"]) == 210 and not any(person["pose_keypoints_2d"])
    assert (np.asarray(Image.open(tmp_path / "face.png").convert("RGB")) == 255).all(-1).sum() > 70


def test_generate_with_regions(env, capsys, tmp_path):
    out = tmp_path / "r.png"
    code, stdout, err = run_cli(capsys, "generate", "a green field", "--seed", "3", *TINY, "-o", str(out),
                                "--region", "0,0,0.5,1:a red car:2", "--json")
    assert code == 0, err
    assert "Regions: " in Image.open(out).info["parameters"] and "a red car (box 0 0 0.5 1, 2)" in \
        Image.open(out).info["parameters"]
    code, _, err = run_cli(capsys, "generate", "a field", *TINY, "-o", str(tmp_path / "bad.png"),
                           "--region", "0,0,2,1:x")
    assert code == 2 and "region box" in err and not (tmp_path / "bad.png").exists()


def test_a_malformed_prompt_edit_is_one_line_and_no_file(env, capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "a [cat:dog:x] photo", *TINY, "-o", str(tmp_path / "bad.png"))
    assert code == 2 and "[cat:dog:x] is not prompt editing" in err and "\n" not in err.strip()
    assert not (tmp_path / "bad.png").exists()
    code, _, err = run_cli(capsys, "generate", "a [cat:dog:x] photo", *TINY, "--malformed-prompt", "text", "-o",
                           str(tmp_path / "text.png"))
    assert code == 0 and (tmp_path / "text.png").is_file(), err  # read as text, as A1111 does
