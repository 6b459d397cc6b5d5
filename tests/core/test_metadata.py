"""A1111-compatible infotext and the PNG chunks that carry it."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imagesmith.core.errors import BadImage
from imagesmith.core.imageio import save_png_atomic
from imagesmith.core.metadata import build_infotext, make_png_chunks, parse_infotext, read_png_metadata
from imagesmith.core.requests import GenerateRequest, GenerationResult, ImageRecord
from imagesmith.core.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home")


PARAMS = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1,
          "Size": "512x512", "Model hash": "abcdef1234", "Model": "name",
          "Lora hashes": "a: 1234, b: 5678", "Version": "imagesmith 0.1.0"}


def test_build_exact_a1111_layout():
    text = build_infotext("a cat, best quality", "blurry", PARAMS)
    assert text == (
        "a cat, best quality\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        'Model hash: abcdef1234, Model: name, Lora hashes: "a: 1234, b: 5678", Version: imagesmith 0.1.0')


def test_build_without_negative_drops_none_and_keeps_fractions():
    text = build_infotext("x", "", {"Steps": 4, "CFG scale": 6.5, "VAE": None, "Seed": 3,
                                    "Denoising strength": 0.75})
    assert text == "x\nSteps: 4, CFG scale: 6.5, Seed: 3, Denoising strength: 0.75"


def test_build_rejects_keys_a1111_cannot_parse():
    with pytest.raises(ValueError):
        build_infotext("x", "", {"Bad: key": 1, "Steps": 2, "Seed": 3})


def expected(prompt: str, negative: str, params: dict) -> dict:
    out = {"Prompt": prompt, "Negative prompt": negative}
    for k, v in params.items():
        v = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        if k == "Size":
            out["Size-1"], out["Size-2"] = v.split("x")
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("prompt,negative,params", [
    ("a cat, best quality", "blurry", PARAMS),
    ("line one\nline two, (red:1.2) <lora:style:0.7>", "bad hands\nlowres",
     {"Steps": 30, "Sampler": "DPM++ 2M", "Seed": 4294967295, "Size": "768x512"}),
    ("夕焼けの猫 🌅", "", {"Steps": 8, "Sampler": "Euler", "Seed": 7, "Model": "my: model, v2",
                         "ControlNet": 'depth ("x", 0.5)', "Note": "multi\nline"}),
    ("", "", {"Steps": 1, "Seed": 2, "CFG scale": 0.0}),
])
def test_round_trip(prompt, negative, params):
    assert parse_infotext(build_infotext(prompt, negative, params)) == expected(prompt, negative, params)


A1111_SAMPLE = """masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.6>
standing in a field
Negative prompt: (worst quality:1.4), lowres, bad anatomy
extra fingers
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3735928559, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, \
Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03, bad: 0123", Version: v1.10.1"""


def test_parse_a1111_sample():
    p = parse_infotext(A1111_SAMPLE)
    assert p["Prompt"] == "masterpiece, best quality, 1girl, (smile:1.2), <lora:add_detail:0.6>\nstanding in a field"
    assert p["Negative prompt"] == "(worst quality:1.4), lowres, bad anatomy\nextra fingers"
    assert p["Steps"] == "28" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["CFG scale"] == "6.5" and p["Seed"] == "3735928559"
    assert (p["Size-1"], p["Size-2"]) == ("512", "768") and "Size" not in p
    assert p["Model hash"] == "6ce0161689" and p["Model"] == "v1-5-pruned-emaonly"
    assert p["Hires upscaler"] == "R-ESRGAN 4x+" and p["Clip skip"] == "2"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["TI hashes"] == "easynegative: c74b4e810b03, bad: 0123"
    assert p["Version"] == "v1.10.1"


def test_parse_short_last_line_is_prompt():
    # fewer than 3 pairs on the last line: A1111 treats it as prompt text
    p = parse_infotext("a photo\nstyle: noir, mood: dark")
    assert p["Prompt"] == "a photo\nstyle: noir, mood: dark" and set(p) == {"Prompt", "Negative prompt"}


def _result() -> tuple[GenerationResult, ImageRecord]:
    req = GenerateRequest(prompt="a red apple, 夕焼け", negative_prompt="blurry", steps=12, seed=99, width=64, height=64)
    infotext = build_infotext(req.prompt, req.negative_prompt,
                              {"Steps": 12, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 99, "Size": "64x64",
                               "Model hash": "0123456789", "Model": "tiny-sd15",
                               "Lora hashes": "a: 1111, b: 2222"})
    rec = ImageRecord(seed=99, variation_seed=None, infotext=infotext, index=0)
    res = GenerationResult(images=[], records=[rec], request=req, model_name="tiny-sd15", model_hash="0123456789",
                           lora_hashes={"a": "1111", "b": "2222"}, vae_name=None, version="0.1.0")
    return res, rec


def test_chunks_survive_save_and_read(settings, tmp_path):
    from imagesmith.core.metadata import write_metadata_chunks
    res, rec = _result()
    chunks = write_metadata_chunks(res, rec)
    assert set(chunks) == {"parameters", "imagesmith"}
    path = save_png_atomic(Image.new("RGB", (16, 16), "red"), tmp_path / "m.png", text_chunks=chunks)
    meta = read_png_metadata(path, settings=settings)
    assert meta["parameters"] == rec.infotext
    payload = meta["imagesmith"]
    assert payload["request"] == res.request.model_dump(mode="json")
    assert GenerateRequest(**payload["request"]) == res.request
    assert payload["seed"] == 99 and payload["model"] == "tiny-sd15" and payload["model_hash"] == "0123456789"
    assert payload["lora_hashes"] == {"a": "1111", "b": "2222"} and payload["mode"] == "txt2img"
    assert payload["version"] == "0.1.0"
    assert meta["parsed"]["Prompt"] == "a red apple, 夕焼け" and meta["parsed"]["Lora hashes"] == "a: 1111, b: 2222"
    # what A1111's PNG Info reads: the plain 'parameters' text chunk
    with Image.open(path) as im:
        assert im.text["parameters"] == rec.infotext
    # the same from bytes and from an open image
    assert read_png_metadata(path.read_bytes(), settings=settings)["imagesmith"] == payload
    with Image.open(path) as im:
        assert read_png_metadata(im)["parameters"] == rec.infotext


def test_make_png_chunks_json(settings):
    chunks = make_png_chunks("x\nSteps: 1, Seed: 2, Size: 8x8", {"seed": 2, "path": Path("/a")})
    assert chunks["parameters"].startswith("x\n") and json.loads(chunks["imagesmith"]) == {"seed": 2, "path": "/a"}


def test_plain_png_has_no_metadata(settings, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png", settings=settings) == {
        "parameters": None, "imagesmith": None, "parsed": {}}


def test_broken_imagesmith_json_is_none(settings, tmp_path):
    path = save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "b.png",
                           text_chunks={"parameters": "p\nSteps: 1, Seed: 2, CFG scale: 3", "imagesmith": "{oops"})
    meta = read_png_metadata(path, settings=settings)
    assert meta["imagesmith"] is None and meta["parsed"]["Seed"] == "2"


def test_non_image_is_bad_image(settings, tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(BadImage, match="not an image"):
        read_png_metadata(tmp_path / "t.png", settings=settings)
    with pytest.raises(BadImage, match="not found"):
        read_png_metadata(tmp_path / "missing.png", settings=settings)


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def test_huge_image_metadata_read_without_decoding(settings, tmp_path):
    """12000x12000 header with 4 rows of data and the chunks *after* the pixel data: found by walking the
    chunks; decoding would fail (truncated) or cost 144 MB."""
    side = 12000
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress((b"\x00" * (1 + side // 8)) * 4)
    infotext = "big\nSteps: 5, Seed: 6, Size: 12000x12000"
    itxt = b"imagesmith\x00\x01\x00\x00\x00" + zlib.compress(json.dumps({"seed": 6, "p": "夕焼け"}).encode())
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"tEXt", b"parameters\x00" + infotext.encode("latin-1")) + _chunk(b"iTXt", itxt)
            + _chunk(b"IEND", b""))
    (tmp_path / "big.png").write_bytes(data)
    meta = read_png_metadata(tmp_path / "big.png", settings=settings)
    assert meta["parameters"] == infotext and meta["imagesmith"] == {"seed": 6, "p": "夕焼け"}
    assert meta["parsed"]["Size-1"] == "12000"


def test_a1111_jpeg_exif_user_comment(settings, tmp_path):
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 8x8"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")  # what piexif writes for A1111
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", exif=exif.tobytes())
    meta = read_png_metadata(buf.getvalue(), settings=settings)
    assert meta["parameters"] == text and meta["parsed"]["Negative prompt"] == "dog"
