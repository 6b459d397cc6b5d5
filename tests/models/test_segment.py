"""Segmenters: the interface, the house-cutout network wrapper, guided upsampling, ONNX models, pickle refusal."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.core.errors import MissingModelFile, ModelNotFound, UnsafeModelFile
from imagesmith.models import segment as S


def disc_image(w: int, h: int, *, fg=(200, 40, 40), bg=(235, 235, 225), r_frac: float = 0.3):
    """A disc (anti-aliased, radius ``r_frac`` of the shorter side) on a plain backdrop, and its alpha."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    r = r_frac * min(w, h)
    alpha = np.clip(r - np.hypot(x - w / 2, y - h / 2) + 0.5, 0, 1).astype(np.float32)
    img = np.asarray(fg, np.float32) * alpha[..., None] + np.asarray(bg, np.float32) * (1 - alpha[..., None])
    return Image.fromarray(img.round().astype(np.uint8)), alpha


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return S.HouseCutout(network=S.build_network((8, 16)), config={"widths": [8, 16], "image_size": 32})


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("size", [(97, 61), (32, 32), (20, 45), (301, 157)])
def test_predict_shape_dtype_range(random_model, size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    alpha = random_model.predict(img)
    assert alpha.shape == (size[1], size[0]) and alpha.dtype == np.float32
    assert np.isfinite(alpha).all() and alpha.min() >= 0 and alpha.max() <= 1


def test_predict_accepts_other_modes(random_model):
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 128))
    assert random_model.predict(rgba).shape == (30, 40)
    assert random_model.predict(Image.new("L", (40, 30), 7)).shape == (30, 40)


def test_cutout_is_rgba_with_the_predicted_alpha(random_model):
    img, _ = disc_image(97, 61)
    out = random_model.cutout(img)
    assert out.mode == "RGBA" and out.size == img.size
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[..., :3], np.asarray(img))
    expected = np.clip(np.round(random_model.predict(img) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(arr[..., 3], expected)


def test_protocol(random_model):
    assert isinstance(random_model, S.Segmenter)
    assert random_model.name == "house-cutout"


def test_flip_tta_averages_the_mirror_and_makes_the_matte_mirror_equivariant():
    """house-cutout's test-time augmentation (config ``flip_tta``, on by default): the alpha is the mean of the
    network's on the picture and, mirrored back, on its mirror image; so a mirrored photo gets exactly the mirrored
    matte, which the bare network does not give."""
    torch.manual_seed(1)
    net = S.build_network((8, 16))
    on = S.HouseCutout(network=net, config={"widths": [8, 16], "image_size": 32})
    off = S.HouseCutout(network=net, config={"widths": [8, 16], "image_size": 32, "flip_tta": False})
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert on.config["flip_tta"] is True
    by_hand = 0.5 * (off.predict_lowres(image) + off.predict_lowres(mirror)[:, ::-1])
    assert np.abs(on.predict_lowres(image) - by_hand).max() < 1e-5
    assert np.abs(on.predict_lowres(mirror)[:, ::-1] - on.predict_lowres(image)).max() < 1e-5
    assert np.abs(off.predict_lowres(mirror)[:, ::-1] - off.predict_lowres(image)).max() > 1e-3


def test_guided_upsampling_gives_sharper_edges_than_bilinear():
    import cv2
    img, alpha = disc_image(256, 256, fg=(40, 90, 200), bg=(230, 200, 80))
    lo = cv2.resize(alpha, (64, 64), interpolation=cv2.INTER_AREA)
    hi = np.asarray(img, np.float32) / 255.0
    guided = S.guided_upsample(lo, hi, r=2, eps=1e-3)
    plain = np.clip(cv2.resize(lo, (256, 256), interpolation=cv2.INTER_LINEAR), 0, 1)
    assert guided.shape == (256, 256) and guided.dtype == np.float32
    assert guided.min() >= 0 and guided.max() <= 1
    err_g, err_p = np.abs(guided - alpha).mean(), np.abs(plain - alpha).mean()
    assert err_g < 0.6 * err_p, (err_g, err_p)
    # no halo: far from the edge the matte stays flat 0 / 1
    assert guided[alpha == 0].max() < 0.05 and guided[alpha == 1].min() > 0.95


def _evil_pickle(path, sentinel):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))
    path.write_bytes(pickle.dumps(Evil(), protocol=4))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin"])
def test_pickles_are_refused_unopened(tmp_path, suffix):
    sentinel = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    _evil_pickle(path, sentinel)
    with pytest.raises(UnsafeModelFile):
        S.load_segmenter(path)
    with pytest.raises(UnsafeModelFile):
        S.OnnxSegmenter(path)
    assert not sentinel.exists()


def test_pickle_disguised_as_onnx_is_refused(tmp_path):
    sentinel = tmp_path / "unpickled"
    path = tmp_path / "model.onnx"
    _evil_pickle(path, sentinel)
    with pytest.raises(UnsafeModelFile):
        S.load_segmenter(path)
    assert not sentinel.exists()


def test_unknown_names(tmp_path):
    with pytest.raises(ModelNotFound):
        S.load_segmenter(tmp_path / "nothing.onnx")
    with pytest.raises(ModelNotFound):
        S.load_segmenter("no-such-segmenter")
    with pytest.raises(ModelNotFound):  # a folder without house-cutout files
        S.load_segmenter(tmp_path)


def test_missing_onnxruntime_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "isnet.onnx"
    path.write_bytes(b"\x08\x07not really onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(MissingModelFile, match="pip install onnxruntime"):
        S.load_segmenter(path)


def test_presets():
    assert S.ONNX_PRESETS["birefnet"]["mean"] == S.IMAGENET_MEAN and S.ONNX_PRESETS["birefnet"]["size"] == 1024
    assert S.ONNX_PRESETS["isnet"] == {"size": 1024, "mean": (0.5, 0.5, 0.5), "std": (1.0, 1.0, 1.0)}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnxruntime and onnx are optional")
@pytest.mark.parametrize("logits", [False, True])
def test_onnx_segmenter_runs_a_tiny_model(tmp_path, logits):
    class Tiny(torch.nn.Module):
        """'Red-ness' of the input, at half resolution (an ISNet-style [1, 1, h, w] output)."""

        def forward(self, x):
            m = torch.nn.functional.avg_pool2d(x[:, :1] - x[:, 1:2], 2)
            return m * 20 if logits else torch.sigmoid(m * 20)

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(Tiny(), torch.zeros(1, 3, 64, 64), str(path), input_names=["input"], output_names=["mask"],
                      dynamo=False)
    seg = S.load_segmenter(path, size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert isinstance(seg, S.OnnxSegmenter) and isinstance(seg, S.Segmenter) and seg.name == "tiny"
    img, alpha = disc_image(97, 61, fg=(230, 20, 20), bg=(20, 200, 20))
    pred = seg.predict(img)
    assert pred.shape == (61, 97) and pred.dtype == np.float32 and pred.min() >= 0 and pred.max() <= 1
    assert iou(pred, alpha) > 0.85
    assert seg.cutout(img).mode == "RGBA"
    preset = S.OnnxSegmenter.preset(path, "birefnet", size=64)
    assert preset.size == 64 and np.allclose(preset.mean.ravel(), S.IMAGENET_MEAN)


@pytest.mark.skipif(not (S.house_cutout_dir() / "model.safetensors").is_file(), reason="house-cutout not exported")
@pytest.mark.parametrize("size", [(128, 128), (300, 220)])
def test_shipped_house_cutout_finds_a_disc(size):
    seg = S.load_segmenter("house-cutout")
    assert isinstance(seg, S.HouseCutout)
    img, alpha = disc_image(*size)
    pred = seg.predict(img)
    assert pred.shape == alpha.shape
    assert iou(pred, alpha) > 0.9, iou(pred, alpha)
    assert np.abs(pred - alpha).mean() < 0.05
