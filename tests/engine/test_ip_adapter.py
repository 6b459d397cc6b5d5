"""IP-Adapter on tiny SD1.5 and SDXL models: a reference with weight 0 gives the base pixels, with weight 1 it
changes them (another reference, another picture), its step window matters, the plain UNet comes back after, and
files that do not fit are one clear line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures.tiny import build_clip_vision, build_ip_adapter, build_sd15, build_sdxl
from imagesmith.core.errors import BadRequest, ImagesmithError
from imagesmith.core.requests import GenerateRequest, IPAdapterSpec
from imagesmith.core.settings import Settings


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("ip-home")
    settings = Settings(home=root)
    settings.ensure_home()
    for name in ("tiny-sd15", "tiny-sdxl"):
        (settings.models_dir / "checkpoints" / name).symlink_to(tiny_home.models_dir / "checkpoints" / name,
                                                                target_is_directory=True)
    build_clip_vision(settings.models_dir / "clip_vision" / "tiny-vision")
    build_ip_adapter(build_sd15(0).unet, settings.models_dir / "ipadapter" / "tiny-ip.safetensors")
    build_ip_adapter(build_sdxl(0).unet, settings.models_dir / "ipadapter" / "tiny-ip-xl.safetensors", seed=1)
    build_ip_adapter(build_sd15(0).unet, settings.models_dir / "ipadapter" / "tiny-ip-plus.safetensors", seed=2,
                     image_dim=32, plus=True)  # reads the tiny encoder's hidden states (width 32)
    (settings.models_dir / "ipadapter" / "old-ip.bin").write_bytes(b"\x80\x02}q\x00.")
    return settings


@pytest.fixture(scope="module")
def engine(home):
    from imagesmith.engine.generate import Engine
    return Engine(home, device="cpu")


def _reference(path, colour, stripes=False):
    arr = np.zeros((48, 48, 3), np.uint8) + np.array(colour, np.uint8)
    if stripes:
        arr[::6] = 255 - arr[::6]
    Image.fromarray(arr).save(path)
    return str(path)


def _pixels(result):
    return np.asarray(result.images[0], np.int16)


def test_reference_weight_and_window_decide_the_picture(engine, tmp_path):
    base = dict(model="tiny-sd15", prompt="a red apple", width=64, height=64, steps=4, seed=7, sampler_name="Euler")
    red, blue = _reference(tmp_path / "red.png", (220, 30, 30)), _reference(tmp_path / "blue.png", (20, 40, 230),
                                                                            stripes=True)
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    zero = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=red, weight=0)))
    assert np.abs(_pixels(zero) - plain).max() <= 1  # weight 0: the base picture
    full = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=red)))
    assert np.abs(_pixels(full) - plain).max() > 8
    assert 'IP-Adapter: "tiny-ip (1, 0-1)"' in full.records[0].infotext
    again = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=red)))
    assert np.array_equal(_pixels(again), _pixels(full))  # deterministic
    other = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=blue)))
    assert np.abs(_pixels(other) - _pixels(full)).max() > 4  # another reference, another picture
    late = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=red,
                                                                            guidance_start=0.5)))
    assert not np.array_equal(_pixels(late), _pixels(full)) and not np.array_equal(_pixels(late), plain)
    two = engine.generate(GenerateRequest(**base, ip_adapter=[IPAdapterSpec(model="tiny-ip", image=red, weight=0.5),
                                                             IPAdapterSpec(model="tiny-ip", image=blue, weight=0.5)]))
    assert np.abs(_pixels(two) - _pixels(full)).max() > 2
    # the UNet is plain again for a job without a reference
    assert np.array_equal(_pixels(engine.generate(GenerateRequest(**base))), plain)


def test_sdxl_takes_its_own_adapter_and_refuses_an_sd1_one(engine, tmp_path):
    base = dict(model="tiny-sdxl", prompt="a red apple", width=64, height=64, steps=3, seed=3, sampler_name="Euler")
    red = _reference(tmp_path / "red.png", (220, 30, 30))
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    with_ref = engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip-xl", image=red)))
    assert np.abs(_pixels(with_ref) - plain).max() > 4
    with pytest.raises(BadRequest, match="cross-attention width 32 .*this model's is 96"):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip", image=red)))
    assert np.array_equal(_pixels(engine.generate(GenerateRequest(**base))), plain)


def test_bad_files_and_models_are_one_clear_error(engine, home, tmp_path):
    red = _reference(tmp_path / "red.png", (220, 30, 30))
    base = dict(model="tiny-sd15", prompt="x", width=64, height=64, steps=2)
    with pytest.raises(ImagesmithError, match="pickle"):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="old-ip", image=red)))
    with pytest.raises(ImagesmithError, match="nope"):
        engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="nope", image=red)))
    with pytest.raises(ImagesmithError, match="cross-attention width 32 .*this model's is 384"):  # house-ldm
        engine.generate(GenerateRequest(**{**base, "model": "house-ldm"}, ip_adapter=IPAdapterSpec(
            model="tiny-ip", image=red)))
    kinds = {e.name: e.kind for e in engine.registry.list() if e.name.startswith(("tiny-ip", "tiny-vision"))}
    assert kinds == {"tiny-ip": "ipadapter", "tiny-ip-xl": "ipadapter", "tiny-ip-plus": "ipadapter",
                     "tiny-vision": "clip_vision"}


def test_cli_reference_images(home, tmp_path, monkeypatch, capsys):
    import json

    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    red = _reference(tmp_path / "red.png", (220, 30, 30))
    out = tmp_path / "out.png"
    tiny = ["-m", "tiny-sd15", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]
    code, stdout, err = run_cli(capsys, "generate", "an apple", *tiny, "--ip-adapter", "tiny-ip", "--ref",
                                f"{red}:0.8", "-o", str(out), "--json")
    assert code == 0, err
    assert 'IP-Adapter: "tiny-ip (0.8, 0-1)"' in json.loads(stdout)["images"][0]["infotext"] and out.is_file()
    from PIL import Image
    left = tmp_path / "left.png"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(left)
    masked = tmp_path / "masked.png"
    code, stdout, err = run_cli(capsys, "generate", "an apple", *tiny, "--ip-adapter", "tiny-ip", "--ref",
                                f"{red}:0.8", "--ref-mask", str(left), "-o", str(masked))
    assert code == 0, err
    a, b = (np.asarray(Image.open(p), np.int16) for p in (out, masked))
    assert not np.array_equal(a, b)  # the mask reached the reference
    code, stdout, err = run_cli(capsys, "generate", "an apple", *tiny, "--ip-adapter", "tiny-ip", "--ref",
                                f"{red}:0.8", "--ref", str(red), "--ref-start", "0.25", "--ref-end", "0.75", "--ref-end",
                                "1", "-o", str(tmp_path / "window.png"), "--json")
    assert code == 0, err  # the step window of each reference, as A1111's units have it, in the infotext
    assert '"tiny-ip (0.8, 0.25-0.75); tiny-ip (1, 0.25-1)"' in json.loads(stdout)["images"][0]["infotext"]
    for args, needle in ((["--ip-adapter", "tiny-ip"], "--ip-adapter and --ref go together"),
                         (["--ip-adapter", "tiny-ip", "--ref", str(red), "--ref-end", "0.5", "--ref-end", "0.6"],
                          "--ref-end is given 2 times for 1 references"),
                         (["--ip-adapter", "tiny-ip", "--ref", str(red), "--ref-mask", "-", "--ref-mask", "-"],
                          "--ref-mask: give one per --ref"),
                         (["--ip-adapter", "tiny-ip", "--ref", str(tmp_path / "missing.png")], "missing.png")):
        bad = tmp_path / "never.png"
        code, _, err = run_cli(capsys, "generate", "x", *tiny, *args, "-o", str(bad))
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not bad.exists()


def test_a_mask_keeps_the_reference_to_its_part_of_the_picture(engine, tmp_path):
    base = dict(model="tiny-sd15", prompt="a red apple", width=64, height=64, steps=4, seed=7, sampler_name="Euler")
    red = _reference(tmp_path / "red.png", (220, 30, 30))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    masked = _pixels(engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(
        model="tiny-ip", image=red, mask=str(tmp_path / "left.png")))))
    everywhere = _pixels(engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip",
                                                                                          image=red))))

    def left_over_right(pixels):
        change = np.abs(pixels - plain).mean(axis=(0, 2))
        return change[:24].mean() / change[40:].mean()
    # the left half is where the reference acts (the UNet's convolutions carry some of it across)
    assert left_over_right(masked) > 1.5 and left_over_right(masked) > 1.4 * left_over_right(everywhere), (
        left_over_right(masked), left_over_right(everywhere))


def test_a_plus_adapter_reads_the_encoders_hidden_states(engine, tmp_path):
    """IP-Adapter Plus (a resampler over the penultimate hidden states; the unconditional side is a black
    image's): listed as Plus, weight 0 gives the base pixels, weight 1 changes them."""
    entry = engine.registry.get("tiny-ip-plus", "ipadapter")
    assert any("Plus" in n for n in entry.notes)
    base = dict(model="tiny-sd15", prompt="a red apple", width=64, height=64, steps=4, seed=7, sampler_name="Euler")
    red = _reference(tmp_path / "red.png", (220, 30, 30))
    plain = _pixels(engine.generate(GenerateRequest(**base)))
    zero = _pixels(engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip-plus", image=red,
                                                                                    weight=0))))
    full = _pixels(engine.generate(GenerateRequest(**base, ip_adapter=IPAdapterSpec(model="tiny-ip-plus",
                                                                                    image=red))))
    assert np.abs(zero - plain).max() <= 1 and np.abs(full - plain).max() > 8
