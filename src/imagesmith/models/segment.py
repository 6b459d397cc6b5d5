"""Salient-object segmentation (background removal): one interface, several models.

A :class:`Segmenter` turns an RGB image into an alpha matte (float32 ``HxW`` in [0, 1], the input's size);
:meth:`Segmenter.cutout` (shared by every implementation through :class:`SegmenterBase`) returns the RGBA
cut-out. Implementations:

- :class:`HouseCutout` - imagesmith's own small U-Net (``house-cutout``, trained offline by
  ``python -m imagesmith.train.house_cutout`` on the house dataset). The network sees the image resized to
  its native square size; its alpha is upsampled to the input size with a *fast guided filter* (He & Sun
  2015: the local linear model ``alpha = A . rgb + b`` is fitted at low resolution against the colour image,
  ``A`` and ``b`` are upsampled and applied to the full-resolution image), so edges follow the full-resolution
  image instead of the blocky low-resolution grid.
- :class:`OnnxSegmenter` - a user-supplied ISNet / BiRefNet / U2-Net style ``.onnx`` file run with
  onnxruntime (an optional dependency, imported lazily). Presets (:data:`ONNX_PRESETS`): ``isnet``
  (1024 px, mean 0.5, std 1.0: DIS/ISNet's own normalisation) and ``birefnet`` (1024 px, ImageNet mean/std).

:func:`load_segmenter` picks one by name or path. Pickle files (.pt/.pth/.ckpt/.bin) are refused without
being opened (:func:`imagesmith.models.probe.refuse_pickle`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..core.errors import BadRequest, MissingModelFile, ModelNotFound, UnsupportedModel
from .probe import refuse_pickle

HOUSE_CUTOUT_NAME = "house-cutout"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_PRESETS: dict[str, dict[str, Any]] = {
    "isnet": {"size": 1024, "mean": (0.5, 0.5, 0.5), "std": (1.0, 1.0, 1.0)},
    "birefnet": {"size": 1024, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}


def house_cutout_dir() -> Path:
    """The shipped house-cutout folder inside the installed package."""
    import imagesmith
    return Path(imagesmith.__file__).parent / "house" / HOUSE_CUTOUT_NAME


# -------------------------------------------------------------------------------------------- interface
@runtime_checkable
class Segmenter(Protocol):
    name: str

    def predict(self, image: Image.Image) -> np.ndarray:
        """Alpha matte of the salient object: float32 ``[H, W]`` in [0, 1], the size of ``image``."""
        ...

    def cutout(self, image: Image.Image) -> Image.Image:
        """``image`` as RGBA with the predicted alpha."""
        ...


def cutout_with(alpha: np.ndarray, image: Image.Image) -> Image.Image:
    """RGBA image: the RGB of ``image`` with ``alpha`` (float HxW in 0..1) as its alpha channel."""
    rgb = np.asarray(image.convert("RGB"))
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} does not match image {rgb.shape[:2]}")
    a = np.clip(np.round(alpha * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


class SegmenterBase:
    """Shared helpers; subclasses implement :meth:`predict`."""

    name: str = "segmenter"

    def predict(self, image: Image.Image) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def cutout(self, image: Image.Image) -> Image.Image:
        image = _as_rgb(image)
        return cutout_with(self.predict(image), image)


def _as_rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadRequest("a segmenter takes a PIL image")
    if image.width < 1 or image.height < 1:
        raise BadRequest("empty image")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # flatten onto white: the model judges what is visible
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


# ------------------------------------------------------------------------------------- guided filter
def _box(x: np.ndarray, r: int) -> np.ndarray:
    import cv2
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_coefficients(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour guided filter (He, Sun & Tang 2013) coefficients: per pixel ``A`` [H, W, 3] and ``b`` [H, W] with
    ``src ~ A . guide + b`` in every (2r+1)^2 window (box-averaged). ``guide`` float32 [H, W, 3] in 0..1."""
    guide = guide.astype(np.float32)
    src = src.astype(np.float32)
    mean_i = _box(guide, r)
    mean_p = _box(src, r)
    mean_ip = _box(guide * src[..., None], r)
    cov_ip = mean_ip - mean_i * mean_p[..., None]
    # 3x3 covariance of the guide in each window
    ii = np.einsum("hwi,hwj->hwij", guide, guide).reshape(*guide.shape[:2], 9)
    var_i = _box(np.ascontiguousarray(ii), r).reshape(*guide.shape[:2], 3, 3)
    var_i = var_i - np.einsum("hwi,hwj->hwij", mean_i, mean_i) + eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var_i, cov_ip[..., None])[..., 0]
    b = mean_p - np.einsum("hwi,hwi->hw", a, mean_i)
    return _box(a, r), _box(b, r)


def guided_upsample(alpha_lo: np.ndarray, image_hi: np.ndarray, r: int = 2, eps: float = 1e-3) -> np.ndarray:
    """Fast guided filter: fit ``alpha ~ A . rgb + b`` at ``alpha_lo``'s resolution against the image downsampled
    to it, upsample ``A``/``b`` bilinearly and apply them to the full-resolution ``image_hi`` (float32
    [H, W, 3] in 0..1). Edges land where the full-resolution image has them. Returns float32 [H, W] in 0..1."""
    import cv2
    h, w = image_hi.shape[:2]
    lh, lw = alpha_lo.shape
    guide_lo = cv2.resize(image_hi, (lw, lh), interpolation=cv2.INTER_AREA)
    a, b = guided_coefficients(guide_lo, alpha_lo, r, eps)
    a_hi = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    b_hi = cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR)
    out = np.einsum("hwi,hwi->hw", a_hi, image_hi) + b_hi
    # far from any edge the fit is a constant: keep the plain upsample there (no texture leaking into alpha)
    plain = cv2.resize(alpha_lo, (w, h), interpolation=cv2.INTER_LINEAR)
    near_edge = cv2.resize(((alpha_lo > 0.02) & (alpha_lo < 0.98)).astype(np.float32), (w, h),
                           interpolation=cv2.INTER_LINEAR)
    k = max(3, int(2 * round(max(h / lh, w / lw)) + 1))
    near_edge = cv2.dilate((near_edge > 0).astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return np.clip(np.where(near_edge, out, plain), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------- house network
ARCH_DEFAULTS: dict[str, Any] = {"arch": "house-cutout-unet", "version": 1, "widths": [16, 32, 64, 128],
                                 "image_size": 128, "refine_radius": 2, "refine_eps": 1e-3, "flip_tta": True}
"""``flip_tta``: the alpha is the mean of the network's on the picture and on its mirror image (test-time
augmentation). On the hard held-out set it took house-cutout v2 from IoU 0.915 to 0.920 and MAE 0.0161 to 0.0153,
every source kind as good or better, for a second network pass (`imagesmith eval cutout`, docs/ad-studio.md)."""


def arch_config(**kw: Any) -> dict[str, Any]:
    """The architecture facts ``config.json`` stores, defaults filled in."""
    return {**ARCH_DEFAULTS, **kw}


ARCH_UNET = "house-cutout-unet"
ARCH_EFFNET = "house-cutout-effnet"
ARCHS = (ARCH_UNET, ARCH_EFFNET)


def build_network(widths=(16, 32, 64, 128), arch: str = ARCH_UNET):
    """The house-cutout network of ``arch``: the compact U-Net (``widths``) or the U-Net on an EfficientNet-Lite0
    encoder (``widths`` are then its decoder's channels, coarse to fine); imports torch lazily."""
    if arch == ARCH_EFFNET:
        return _effnet_class()(tuple(int(w) for w in widths))
    if arch != ARCH_UNET:
        raise UnsupportedModel(f"unknown house-cutout architecture {arch!r}; known: {', '.join(ARCHS)}")
    return _net_class()(tuple(int(w) for w in widths))


def _effnet_class():
    import torch
    from torch import nn
    import torch.nn.functional as F
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingModelFile("this house-cutout needs the EfficientNet-Lite model code: "
                               "pip install efficientnet_lite_pytorch==0.1.0") from None

    def cbr(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class HouseCutoutEffNet(nn.Module):
        """U-Net on an ImageNet EfficientNet-Lite0 encoder (stem and MBConv blocks; its 1280-channel head and
        classifier are dropped). Skips at strides 2, 4, 8, 16 and 32 (16, 24, 40, 112, 320 channels); a
        global-context branch (image-level pooling, as in DeepLab's ASPP) at stride 32 tells the decoder what
        the whole picture is about, which is what salient-object cut-out needs on busy backgrounds. Decoder:
        bilinear x2, concatenation with the skip, two conv-BN-ReLU per level (``widths``, coarse to fine); a
        last level at full resolution sees the RGB input again for crisp edges. Input RGB in [-1, 1] (the
        Lite models' own normalisation), sides divisible by 32."""

        def __init__(self, widths: tuple[int, ...] = (96, 64, 48, 32, 24, 16)):
            super().__init__()
            if len(widths) != 6:
                raise UnsupportedModel(f"house-cutout-effnet needs 6 decoder widths, not {len(widths)}")
            self.widths = widths
            enc = EfficientNet.from_name("efficientnet-lite0")
            self.stem = nn.Sequential(enc._conv_stem, enc._bn0, nn.ReLU6())
            self.blocks = enc._blocks
            strides = [int(b._block_args.stride if isinstance(b._block_args.stride, int)
                           else b._block_args.stride[0]) for b in self.blocks]
            # a skip is taken after the last block before each stride-2 block, and after the last block
            self.taps = [i - 1 for i in range(1, len(self.blocks)) if strides[i] > 1 and i > 0] + [len(self.blocks) - 1]
            chans = [self.blocks[i]._block_args.output_filters for i in self.taps]
            if chans[0] != self.blocks[0]._block_args.output_filters:
                raise UnsupportedModel("unexpected EfficientNet-Lite0 layout")
            top = chans[-1]
            self.context = cbr(top, widths[0], k=1)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(top, widths[0], 1), nn.ReLU(inplace=True))
            self.dec = nn.ModuleList()
            cin = widths[0]
            for skip_c, w in zip(reversed(chans[:-1]), widths[1:5], strict=True):
                self.dec.append(nn.Sequential(cbr(cin + skip_c, w), cbr(w, w)))
                cin = w
            self.full = nn.Sequential(cbr(cin + 3, widths[5]), cbr(widths[5], widths[5]))
            self.head = nn.Conv2d(widths[5], 1, 3, padding=1)

        def encoder_parameters(self):
            return list(self.stem.parameters()) + list(self.blocks.parameters())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rgb = x
            h = self.stem(x)
            skips = []
            for i, block in enumerate(self.blocks):
                h = block(h)
                if i in self.taps:
                    skips.append(h)
            top = skips[-1]
            h = self.context(top) + self.pool(top)
            for block, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
                h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                h = block(torch.cat([h, skip], dim=1))
            h = F.interpolate(h, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
            return self.head(self.full(torch.cat([h, rgb], dim=1)))

    return HouseCutoutEffNet


_NET_CLASS = None


def _net_class():
    global _NET_CLASS
    if _NET_CLASS is not None:
        return _NET_CLASS
    import torch
    from torch import nn
    import torch.nn.functional as F

    def cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class HouseCutoutNet(nn.Module):
        """Compact U-Net. Encoder: a full-resolution level of ``widths[0]`` channels, then one level per
        further width, each entered by a stride-2 conv (two 3x3 conv-BN-ReLU per level), and a context block
        (dilated convs 2 and 4) at the lowest resolution. Decoder: bilinear x2 upsample, concatenation with the
        skip, one conv-BN-ReLU per level down to full resolution, a 3x3 head to one alpha logit. Input RGB
        in [-1, 1] of any size divisible by ``2 ** (len(widths) - 1)``."""

        def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
            super().__init__()
            self.widths = widths
            self.enc = nn.ModuleList()
            cin = 3
            for i, w in enumerate(widths):
                self.enc.append(nn.Sequential(cbr(cin, w, stride=1 if i == 0 else 2), cbr(w, w)))
                cin = w
            top = widths[-1]
            self.context = nn.Sequential(cbr(top, top, dilation=2), cbr(top, top, dilation=4))
            self.dec = nn.ModuleList()
            for i in range(len(widths) - 1, 0, -1):
                self.dec.append(cbr(widths[i] + widths[i - 1], widths[i - 1]))
            self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for block in self.enc:
                x = block(x)
                skips.append(x)
            x = x + self.context(x)
            for block, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                x = block(torch.cat([x, skip], dim=1))
            return self.head(x)

    _NET_CLASS = HouseCutoutNet
    return _NET_CLASS


class HouseCutout(SegmenterBase):
    """imagesmith's own cut-out model. ``HouseCutout()`` loads the shipped folder; ``HouseCutout(folder)`` any
    folder holding ``model.safetensors`` + ``config.json``; ``HouseCutout(network=..., config=...)`` wraps an
    in-memory network (training and tests). ``refine=False`` skips the guided upsampling."""

    name = HOUSE_CUTOUT_NAME

    def __init__(self, folder: str | Path | None = None, *, network=None, config: dict[str, Any] | None = None,
                 device: str = "cpu", refine: bool = True):
        import torch
        self.refine = refine
        self.device = torch.device(device)
        if network is not None:
            self.config = arch_config(**(config or {}))
            self.net = network
        else:
            folder = Path(folder) if folder is not None else house_cutout_dir()
            self.config, self.net = load_house_cutout(folder)
            self.folder = folder
        self.net = self.net.to(self.device).eval()
        self.size = int(self.config["image_size"])

    def logits(self, x):
        """Alpha logits of a batch ``x`` [B, 3, size, size] in [-1, 1] (no grad)."""
        import torch
        with torch.no_grad():
            return self.net(x.to(self.device)).float()

    def predict_lowres(self, image: Image.Image) -> np.ndarray:
        """The network's alpha at its native square size (float32 [size, size]); with the config's ``flip_tta``,
        the mean of its alpha of the picture and (mirrored back) of the picture mirrored left to right."""
        import torch
        # Pillow's bilinear resize is antialiased when it shrinks
        img = _as_rgb(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)[None]
        flip = bool(self.config.get("flip_tta"))
        p = torch.sigmoid(self.logits(torch.cat([x, x.flip(-1)]) if flip else x))
        alpha = 0.5 * (p[0] + p[1].flip(-1)) if flip else p[0]  # probabilities: their logits' mean catches fewer
        return alpha[0].cpu().numpy().astype(np.float32)           # bad cut-outs (26/41 against 31/42)

    def predict(self, image: Image.Image) -> np.ndarray:
        import cv2
        image = _as_rgb(image)
        lo = self.predict_lowres(image)
        w, h = image.size
        if (w, h) == (self.size, self.size):
            return lo
        if self.refine and (w > self.size or h > self.size):
            return guided_upsample(lo, np.asarray(image, np.float32) / 255.0, int(self.config["refine_radius"]),
                                   float(self.config["refine_eps"]))
        interp = cv2.INTER_AREA if (w <= self.size and h <= self.size) else cv2.INTER_LINEAR
        return np.clip(cv2.resize(lo, (w, h), interpolation=interp), 0.0, 1.0).astype(np.float32)


def load_house_cutout(folder: str | Path):
    """(config dict, eval network) from a house-cutout folder (safetensors + config.json only)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    weights, cfg_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not cfg_path.is_file():
        raise ModelNotFound(f"{folder} is not a house-cutout folder (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
                            f"train one with `python -m imagesmith.train.house_cutout --export {folder}`")
    config = arch_config(**json.loads(cfg_path.read_text()))
    if config.get("arch") not in ARCHS:
        raise UnsupportedModel(f"{cfg_path} describes {config.get('arch')!r}, not a house-cutout network")
    net = build_network(config["widths"], config["arch"])
    state = load_file(str(weights))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return config, net.eval()


# ------------------------------------------------------------------------------------------------ ONNX
class OnnxSegmenter(SegmenterBase):
    """An ISNet / BiRefNet style ONNX model: input ``[1, 3, size, size]`` float32, RGB scaled to 0..1 then
    ``(x - mean) / std``; first output ``[1, 1, h, w]`` (or ``[1, h, w]``) the matte. ``normalise``: 'auto'
    (default) takes outputs outside [0, 1] as logits (sigmoid, BiRefNet exports) and uses outputs in [0, 1] as
    they are (ISNet exports with a sigmoid inside); 'sigmoid' always applies it; 'minmax' rescales the output to
    0..1 as ISNet's and rembg's reference code does; 'none' only clips. Presets:
    ``OnnxSegmenter.preset(path, 'isnet' | 'birefnet')``."""

    def __init__(self, path: str | Path, size: int = 1024, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0),
                 *, normalise: str = "auto", providers: list[str] | None = None):
        path = Path(path)
        refuse_pickle(path)
        if not path.is_file():
            raise ModelNotFound(f"ONNX model {path} not found")
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingModelFile(
                f"running {path.name} needs onnxruntime, which is not installed: pip install onnxruntime "
                f"(or onnxruntime-gpu)") from None
        self.path = path
        self.name = path.stem
        self.size = int(size)
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.normalise = normalise
        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name  # ISNet also exports its side outputs: skip them

    @classmethod
    def preset(cls, path: str | Path, preset: str, **kw: Any) -> OnnxSegmenter:
        if preset not in ONNX_PRESETS:
            raise BadRequest(f"unknown ONNX segmenter preset {preset!r}; known: {', '.join(ONNX_PRESETS)}")
        return cls(path, **{**ONNX_PRESETS[preset], **kw})

    def predict(self, image: Image.Image) -> np.ndarray:
        import cv2
        image = _as_rgb(image)
        w, h = image.size
        x = np.asarray(image.resize((self.size, self.size), Image.Resampling.BILINEAR), np.float32) / 255.0
        x = (x.transpose(2, 0, 1)[None] - self.mean) / self.std
        out = self.session.run([self.output_name], {self.input_name: x.astype(np.float32)})[0]
        m = np.asarray(out, np.float32).reshape(out.shape[-2:])
        if self.normalise == "sigmoid" or (self.normalise == "auto" and (m.min() < -1e-3 or m.max() > 1 + 1e-3)):
            m = 1.0 / (1.0 + np.exp(-m))
        elif self.normalise == "minmax":
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(m, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- pick
def load_segmenter(name_or_path: str | Path = HOUSE_CUTOUT_NAME, *, preset: str | None = None,
                   **kw: Any) -> SegmenterBase:
    """``'house-cutout'`` (default): the shipped house model; a ``.onnx`` file: :class:`OnnxSegmenter` (``preset``
    'isnet' (default) or 'birefnet', or size/mean/std in ``kw``); a folder with house-cutout safetensors:
    :class:`HouseCutout`. Pickle files are refused unopened."""
    if str(name_or_path) == HOUSE_CUTOUT_NAME:
        return HouseCutout(**kw)
    path = Path(name_or_path).expanduser()
    refuse_pickle(path)
    if path.is_dir():
        return HouseCutout(path, **kw)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise ModelNotFound(f"ONNX model {path} not found")
        return OnnxSegmenter.preset(path, preset or "isnet", **kw)
    if not path.exists():
        raise ModelNotFound(f"no segmenter {str(name_or_path)!r}: give 'house-cutout', a .onnx file or a "
                            f"house-cutout folder")
    raise UnsupportedModel(f"{path.name}: a segmenter is 'house-cutout', a .onnx file or a house-cutout folder")


def resolve_segmenter(name: str | None = None, registry=None) -> SegmenterBase:
    """A segmenter by registry name (kind ``segmenter``) or by path; ``None`` is house-cutout. The one lookup
    the CLI and the ad studio share."""
    if name is None or str(name) == HOUSE_CUTOUT_NAME or Path(name).expanduser().exists():
        return load_segmenter(name or HOUSE_CUTOUT_NAME)
    if registry is None:
        from ..core.settings import Settings
        from .house import make_registry
        registry = make_registry(Settings.from_env())
    return load_segmenter(registry.get(name, "segmenter").path)
