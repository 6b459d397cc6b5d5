"""Hardened image input and atomic PNG output: every bad file is one clear BadImage line, bombs are refused
from the header, nothing half-written ever appears."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.errors import BadImage, BadRequest
from imagesmith.core.imageio import load_image, open_image_header, output_paths, save_png_atomic
from imagesmith.core.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home")


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def bomb_png(side: int, *, complete: bool) -> bytes:
    """A 1-bit grey PNG of side x side. complete=False: only 4 rows of pixel data (the header is all a
    safe loader needs to refuse it; a loader that decodes first reports truncation instead)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    rows = side if complete else 4
    idat = zlib.compress(row * rows, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def noise_png(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.strip()
    return text


# ------------------------------------------------------------------------------------------ bad input

def test_missing_file_names_it(settings, tmp_path):
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "nope.png", settings=settings, what="init image")
    msg = one_line(e)
    assert "init image" in msg and "nope.png" in msg and "not found" in msg


def test_folder_is_refused(settings, tmp_path):
    with pytest.raises(BadImage, match="folder"):
        load_image(tmp_path, settings=settings)


def test_text_file_renamed_png(settings, tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 20)
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings, what="mask")
    msg = one_line(e)
    assert "mask" in msg and "notes.png" in msg and "not an image" in msg


def test_empty_file(settings, tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(BadImage, match="empty"):
        load_image(p, settings=settings)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png_pixel_data(settings, tmp_path, keep):
    full = noise_png(tmp_path / "full.png").read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    msg = one_line(e)
    assert "truncated or corrupt" in msg and "cut.png" in msg


def test_truncated_png_header(settings, tmp_path):
    p = tmp_path / "head.png"
    p.write_bytes(noise_png(tmp_path / "full.png").read_bytes()[:20])  # signature + part of IHDR
    with pytest.raises(BadImage, match="truncated or corrupt PNG"):
        load_image(p, settings=settings)


def test_corrupt_jpeg_data(settings, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    with pytest.raises(BadImage, match="truncated or corrupt"):
        load_image(data[: len(data) // 2], settings=settings)


def test_too_many_bytes_path_checked_before_reading(tmp_path):
    settings = Settings(home=tmp_path, max_image_bytes=1000)
    p = noise_png(tmp_path / "big.png")  # ~12 KB of noise
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    msg = one_line(e)
    assert "big.png" in msg and "1000 bytes" in msg and "IMAGESMITH_MAX_IMAGE_BYTES" in msg
    with pytest.raises(BadImage, match="1000 bytes"):
        load_image(p.read_bytes(), settings=settings)


def test_huge_sparse_file_refused_from_stat(settings, tmp_path):
    # 3 GB that take no disk: a loader that reads before checking would hang or run out of memory
    p = tmp_path / "sparse.png"
    with open(p, "wb") as f:
        f.truncate(3 * 1024**3)
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    assert "3072.0 MB" in str(e.value) and "40.0 MB" in str(e.value)


def test_decompression_bomb_in_pillow_warning_zone(settings, tmp_path):
    """12000x12000 = 144 M pixels: Pillow only warns there (89-179 M) and would decode 144 MB."""
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(12000, complete=True))
    assert p.stat().st_size < 100_000
    before_limit = Image.MAX_IMAGE_PIXELS
    before_filters = list(warnings.filters)
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    msg = one_line(e)
    assert "12000x12000" in msg and "pixels" in msg and f"{8192 * 8192:,}" in msg
    # nothing global was changed to get there
    assert Image.MAX_IMAGE_PIXELS == before_limit
    assert list(warnings.filters) == before_filters


def test_pixel_cap_is_checked_before_decoding(settings, tmp_path):
    """The header claims 20000x20000 but holds 4 rows: a loader that decodes first reports truncation."""
    p = tmp_path / "claims.png"
    p.write_bytes(bomb_png(20000, complete=False))
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    assert "pixels" in str(e.value) and "truncated" not in str(e.value)


def test_own_pixel_cap_below_pillows(tmp_path):
    settings = Settings(home=tmp_path, max_input_pixels=100 * 100)
    Image.new("RGB", (200, 200), "red").save(tmp_path / "a.png")
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "a.png", settings=settings, what="control image")
    msg = one_line(e)
    assert "control image" in msg and "200x200" in msg and "10,000" in msg
    Image.new("RGB", (100, 100), "red").save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png", settings=settings).size == (100, 100)


@pytest.mark.parametrize("fmt,suffix,word", [("ICO", ".ico", "ICO"), ("PPM", ".ppm", "PNM"),
                                             ("TGA", ".tga", "not an image")])
def test_disallowed_formats(settings, tmp_path, fmt, suffix, word):
    p = tmp_path / f"pic{suffix}"
    Image.new("RGB", (32, 32), "green").save(p, fmt)
    # Pillow itself opens these; we must not
    with Image.open(p) as im:
        assert im.size == (32, 32)
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    msg = one_line(e)
    assert word in msg and "PNG, JPEG, WebP" in msg


def test_eps_never_reaches_ghostscript(settings, tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(BadImage, match="EPS"):
        load_image(p, settings=settings)


# ------------------------------------------------------------------------------------------ good input

def test_exif_orientation_applied(settings, tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(p, settings=settings)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10].astype(int), np.asarray(out)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_modes(settings, tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 40))
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", settings=settings).mode == "RGB"
    assert load_image(tmp_path / "a.png", settings=settings, mode=None).getpixel((0, 0)) == (10, 20, 30, 40)
    grey = load_image(tmp_path / "a.png", settings=settings, mode="L")
    assert grey.mode == "L"

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    got = load_image(tmp_path / "p.png", settings=settings, mode=None)
    assert got.mode == "RGBA" and got.getpixel((0, 0)) == (255, 0, 0, 255)


def test_16_bit_grey_is_scaled_not_clipped(settings, tmp_path):
    arr = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")
    got = load_image(tmp_path / "g16.png", settings=settings, mode=None)
    assert got.mode == "L" and list(np.asarray(got)[0]) == [0, 128, 255, 255]
    # a dark 16-bit image stays dark (its values are 16-bit even when all are below 256)
    Image.fromarray(np.array([[0, 257, 514]], dtype=np.uint16)).save(tmp_path / "dark.png")
    assert list(np.asarray(load_image(tmp_path / "dark.png", settings=settings, mode="L"))[0]) == [0, 1, 2]


def test_bytes_source_and_first_gif_frame_without_leaking_files(settings, tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    got = load_image(tmp_path / "anim.gif", settings=settings)
    assert got.mode == "RGB" and got.getpixel((3, 3)) == (255, 0, 0)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds  # the file is closed, the image detached
    same = load_image((tmp_path / "anim.gif").read_bytes(), settings=settings)
    assert np.array_equal(np.asarray(same), np.asarray(got))


def test_open_image_header_does_not_decode(settings, tmp_path):
    p = tmp_path / "claims.png"
    p.write_bytes(bomb_png(12000, complete=False))
    with open_image_header(p, settings=settings) as im:
        assert im.size == (12000, 12000) and im.format == "PNG"
    with pytest.raises(BadImage, match="pixels"):
        with open_image_header(p, settings=settings, check_pixels=True):
            pass


# ------------------------------------------------------------------------------------------ output

def test_save_png_atomic_text_chunks(tmp_path):
    im = Image.new("RGB", (8, 8), (1, 2, 3))
    out = save_png_atomic(im, tmp_path / "sub" / "o.png",
                          text_chunks={"parameters": "café, Steps: 20", "imagesmith": '{"prompt": "夕焼け 🌅"}'})
    assert out == tmp_path / "sub" / "o.png"
    assert os.listdir(tmp_path / "sub") == ["o.png"]
    raw = out.read_bytes()
    assert b"tEXtparameters\x00caf\xe9" in raw  # latin-1 text: plain tEXt, as A1111 writes it
    assert b"iTXtimagesmith" in raw  # beyond latin-1: UTF-8 iTXt
    with Image.open(out) as back:
        assert back.text == {"parameters": "café, Steps: 20", "imagesmith": '{"prompt": "夕焼け 🌅"}'}
        assert back.getpixel((0, 0)) == (1, 2, 3)


def test_save_png_atomic_permissions_follow_umask(tmp_path):
    out = save_png_atomic(Image.new("L", (4, 4)), tmp_path / "p.png", text_chunks={})
    ref = tmp_path / "ref"
    ref.write_bytes(b"x")
    assert out.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777


def _failing_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG\r\n\x1a\n half a picture")
    raise OSError(28, "No space left on device")


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    save_png_atomic(Image.new("RGB", (4, 4), "red"), target, text_chunks={})
    before = target.read_bytes()
    monkeypatch.setattr(Image.Image, "save", _failing_save)
    with pytest.raises(BadRequest) as e:
        save_png_atomic(Image.new("RGB", (4, 4), "blue"), target, text_chunks={"parameters": "x"})
    assert "No space left" in str(e.value) and "keep.png" in str(e.value)
    assert target.read_bytes() == before
    with pytest.raises(BadRequest):
        save_png_atomic(Image.new("RGB", (4, 4), "blue"), tmp_path / "new.png", text_chunks={})
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_bad_text_key_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        save_png_atomic(Image.new("RGB", (4, 4)), tmp_path / "k.png", text_chunks={"ключ": "v"})
    assert os.listdir(tmp_path) == []


def test_output_paths(tmp_path):
    default = tmp_path / "outputs"
    assert output_paths(tmp_path / "one.png", 1, default, "image") == [tmp_path / "one.png"]
    assert output_paths(tmp_path / "set.PNG", 3, default, "image") == [
        tmp_path / "set-00000.png", tmp_path / "set-00001.png", tmp_path / "set-00002.png"]
    # a folder: WebUI numbering after the highest existing number, seed in the name
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "00007-123.png").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    assert output_paths(folder, 2, default, "image", seeds=[5, 6]) == [folder / "00008-5.png", folder / "00009-6.png"]
    assert output_paths(None, 1, default, "image") == [default / "00000-image.png"]
    assert output_paths(tmp_path / "new_folder", 1, default, "x", seeds=[9]) == [tmp_path / "new_folder" / "00000-9.png"]
    assert output_paths(tmp_path / "x.png", 0, default) == []
    with pytest.raises(BadRequest, match="PNG"):
        output_paths(tmp_path / "photo.jpg", 1, default)


def test_pillow_warning_is_an_error_even_under_a_raised_cap(tmp_path):
    """A cap raised above Pillow's 89 M-pixel warning does not silence the warning: still refused."""
    settings = Settings(home=tmp_path, max_input_pixels=150_000_000)
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(12000, complete=False))
    with pytest.raises(BadImage) as e:
        load_image(p, settings=settings)
    assert "12000x12000" in str(e.value) and "Pillow" in str(e.value)
