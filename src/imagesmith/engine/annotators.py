"""ControlNet preprocessors that run a small network from the user's annotator files: line art and soft edges.

These are the models of lllyasviel's ``Annotators`` release, which A1111's ControlNet extension and ComfyUI's
controlnet_aux nodes both run, under the same module names:

- ``lineart_realistic`` / ``lineart_coarse``: the "informative drawings" generator (Chan, Durand & Isola, CVPR
  2022: a ResNet image-to-image network, instance norm, reflection padding), ``sk_model.pth`` /
  ``sk_model2.pth``;
- ``lineart_anime``: a pix2pix U-Net (eight down-samplings, instance norm), ``netG.pth``;
- ``softedge_hed`` / ``softedge_hedsafe`` / ``scribble_hed``: lllyasviel's Apache-2.0 re-training of HED (five
  VGG-style stages, each with a one-channel side output; the edge map is the sigmoid of their mean),
  ``ControlNetHED.pth``.

The files are found by name anywhere under ``models/annotators/`` (the extension's ``downloads/lineart/`` or
controlnet_aux's ``lllyasviel/Annotators/`` folder can be copied or linked in whole), as ``.safetensors`` or as
the released ``.pth``. A ``.pth`` is read as data by :mod:`imagesmith.models.legacy_pth`, never unpickled, and
converted once to safetensors in the cache. The networks are built here from the tensors' shapes; each network's
map is the one those tools make from the same file (tests check against controlnet_aux's own classes).

Every map is computed at the unit's processor resolution (the image's short side scaled to it, both sides
rounded to multiples of 64, as the extension does; 512 by default) and returned at the input's size, white
lines on black."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.errors import MissingModelFile, UnsupportedModel


@dataclass(frozen=True)
class Annotator:
    stem: str
    """the released file's name without its suffix"""
    network: str
    """``lineart``, ``unet`` or ``hed``"""
    source: str
    """where users get the file"""


ANNOTATORS: dict[str, Annotator] = {
    "lineart_realistic": Annotator("sk_model", "lineart", "lllyasviel/Annotators: sk_model.pth"),
    "lineart_coarse": Annotator("sk_model2", "lineart", "lllyasviel/Annotators: sk_model2.pth"),
    "lineart_anime": Annotator("netG", "unet", "lllyasviel/Annotators: netG.pth"),
    "softedge_hed": Annotator("ControlNetHED", "hed", "lllyasviel/Annotators: ControlNetHED.pth"),
    "softedge_hedsafe": Annotator("ControlNetHED", "hed", "lllyasviel/Annotators: ControlNetHED.pth"),
    "scribble_hed": Annotator("ControlNetHED", "hed", "lllyasviel/Annotators: ControlNetHED.pth"),
}
SUFFIXES = (".safetensors", ".pth", ".pt")
DEFAULT_RESOLUTION = 512


# ------------------------------------------------------------------------------------------------ networks
class _Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch),
                                        nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3),
                                        nn.InstanceNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartNet(nn.Module):
    """The informative-drawings generator: a 7x7 stem, two stride-2 convolutions, residual blocks, two
    transposed convolutions back up, a 7x7 head and a sigmoid (1: paper, 0: ink)."""

    def __init__(self, width: int = 64, blocks: int = 3, in_ch: int = 3, out_ch: int = 1):
        super().__init__()
        w2, w4 = 2 * width, 4 * width
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_ch, width, 7), nn.InstanceNorm2d(width),
                                    nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(width, w2, 3, 2, 1), nn.InstanceNorm2d(w2), nn.ReLU(),
                                    nn.Conv2d(w2, w4, 3, 2, 1), nn.InstanceNorm2d(w4), nn.ReLU())
        self.model2 = nn.Sequential(*[_Residual(w4) for _ in range(blocks)])
        self.model3 = nn.Sequential(nn.ConvTranspose2d(w4, w2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(w2),
                                    nn.ReLU(), nn.ConvTranspose2d(w2, width, 3, 2, 1, output_padding=1),
                                    nn.InstanceNorm2d(width), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, out_ch, 7), nn.Sigmoid())

    @classmethod
    def for_state(cls, state: dict[str, torch.Tensor]) -> "LineartNet":
        width, in_ch = state["model0.1.weight"].shape[:2]
        blocks = len({k.split(".")[1] for k in state if k.startswith("model2.")})
        return cls(int(width), blocks, int(in_ch), int(state["model4.1.weight"].shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class _UNetLevel(nn.Module):
    """One level of a pix2pix U-Net: down (conv 4x4 stride 2), the inner levels, up (transposed conv), and the
    level's input concatenated to its output (the outermost level returns its output alone, through tanh)."""

    def __init__(self, outer: int, inner: int, inside: "_UNetLevel | None", in_ch: int | None = None):
        super().__init__()
        self.outermost = in_ch is not None
        down = nn.Conv2d(in_ch or outer, inner, 4, 2, 1)
        if self.outermost:
            layers = [down, inside, nn.ReLU(), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Tanh()]
        elif inside is None:  # the bottleneck: nothing concatenated inside it
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, 2, 1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), inside, nn.ReLU(),
                      nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class SketchUNet(nn.Module):
    """pix2pix's U-Net generator with instance norm (the anime line-art model): widths ``w, 2w, 4w, 8w, 8w...``
    down ``depth`` (at least 5) levels; the input's sides must be multiples of ``2 ** depth``."""

    def __init__(self, width: int = 64, depth: int = 8, in_ch: int = 3, out_ch: int = 1):
        super().__init__()
        level = _UNetLevel(8 * width, 8 * width, None)
        for outer, inner in [(8 * width, 8 * width)] * (depth - 5) + [(4 * width, 8 * width), (2 * width, 4 * width),
                                                                      (width, 2 * width)]:
            level = _UNetLevel(outer, inner, level)
        self.model = _UNetLevel(out_ch, width, level, in_ch=in_ch)
        self.depth = depth

    @classmethod
    def for_state(cls, state: dict[str, torch.Tensor]) -> "SketchUNet":
        width, in_ch = state["model.model.0.weight"].shape[:2]
        depth = max(k.count("model.") for k in state) - 1
        return cls(int(width), depth, int(in_ch), int(state["model.model.3.weight"].shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _HEDStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1)
                                     for i in range(layers)])
        self.projection = nn.Conv2d(out_ch, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = nn.functional.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = nn.functional.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    """Five VGG-style stages (2, 2, 3, 3, 3 convolutions; widths 64..512), max-pooled between them, each with a
    one-channel side output; the input (RGB 0-255) minus a learned mean."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512, 512), layers: tuple[int, ...] = (2, 2, 3, 3, 3)):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        chans = (3, *widths)
        for i, (w, n) in enumerate(zip(widths, layers)):
            setattr(self, f"block{i + 1}", _HEDStage(chans[i], w, n))
        self.stages = len(widths)

    @classmethod
    def for_state(cls, state: dict[str, torch.Tensor]) -> "HEDNet":
        stages = sorted({int(k.split(".")[0][5:]) for k in state if k.startswith("block")})
        widths = tuple(int(state[f"block{i}.projection.weight"].shape[1]) for i in stages)
        layers = tuple(len({k.split(".")[2] for k in state if k.startswith(f"block{i}.convs.")}) for i in stages)
        return cls(widths, layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i in range(self.stages):
            h, side = getattr(self, f"block{i + 1}")(h, pool=i > 0)
            sides.append(side)
        return sides


NETWORKS = {"lineart": LineartNet, "unet": SketchUNet, "hed": HEDNet}


# ------------------------------------------------------------------------------------------------ files
def annotator_file(settings, module: str) -> Path | None:
    """The user's file for ``module`` under models/annotators/ (any depth; safetensors first), or None."""
    stem = ANNOTATORS[module].stem
    found = [p for root in settings.model_dirs("annotators") if root.is_dir()  # one walk of each folder
             for p in root.rglob(stem + ".*") if p.suffix.lower() in SUFFIXES and p.stem == stem and p.is_file()]
    return min(found, key=lambda p: (SUFFIXES.index(p.suffix.lower()), str(p)), default=None)


def missing_hint(settings, module: str) -> str:
    a = ANNOTATORS[module]
    return (f"{module} needs {a.stem}.pth or {a.stem}.safetensors ({a.source}) anywhere under "
            f"{settings.models_dir / 'annotators'}/")


def load_network(path: Path, module: str, settings) -> nn.Module:
    """The network in ``path`` (read as data, never unpickled), in eval mode; a file that is not this module's
    network is an UnsupportedModel naming it."""
    from ..models.image_models import load_state
    state = load_state(path, settings.home / "cache" / "models")
    kind = ANNOTATORS[module].network
    try:
        net = NETWORKS[kind].for_state(state)
        net.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:160]
        raise UnsupportedModel(f"{path.name}: not the {module} network ({first})") from None
    return net.eval()


# ------------------------------------------------------------------------------------------------ maps
def detect_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The extension's working size: the short side scaled to ``resolution``, both sides rounded to 64."""
    w, h = size
    k = resolution / min(w, h)
    return max(64, int(round(w * k / 64.0)) * 64), max(64, int(round(h * k / 64.0)) * 64)


def _resized(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    up = size[0] * size[1] > rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4 if up else cv2.INTER_AREA)


def _tensor(rgb: np.ndarray, net: nn.Module, scale: float, offset: float) -> torch.Tensor:
    p = next(net.parameters())
    x = torch.from_numpy(np.array(rgb, copy=True)).to(p.device, torch.float32) * scale + offset
    return x.permute(2, 0, 1)[None].to(p.dtype)


def line_map(net: nn.Module, module: str, rgb: np.ndarray) -> np.ndarray:
    """The module's map (uint8 ``[H, W]``, white lines on black) of ``rgb`` (uint8 ``[H, W, 3]``, already at the
    working size)."""
    h, w = rgb.shape[:2]
    with torch.inference_mode():
        if isinstance(net, LineartNet):
            paper = net(_tensor(rgb, net, 1 / 255.0, 0.0))[0, 0].float().cpu().numpy()
            return 255 - (paper * 255.0).clip(0, 255).astype(np.uint8)
        if isinstance(net, SketchUNet):  # sides padded up to the U-Net's multiple by resampling, then back
            m = 2 ** net.depth
            hn, wn = m * int(np.ceil(h / m)), m * int(np.ceil(w / m))
            fed = cv2.resize(rgb, (wn, hn), interpolation=cv2.INTER_CUBIC)
            paper = net(_tensor(fed, net, 1 / 127.5, -1.0))[0, 0].float().cpu().numpy() * 127.5 + 127.5
            paper = cv2.resize(paper, (w, h), interpolation=cv2.INTER_CUBIC)
            return 255 - paper.clip(0, 255).astype(np.uint8)
        sides = net(_tensor(rgb, net, 1.0, 0.0))
        sides = [cv2.resize(s[0, 0].float().cpu().numpy(), (w, h), interpolation=cv2.INTER_LINEAR) for s in sides]
        edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(sides, axis=2), axis=2).astype(np.float64)))
        if module == "softedge_hedsafe":  # quantised to a few levels: fewer faint, textural edges
            edge = np.floor(edge * 3.0) / 2.0
        edge = (edge * 255.0).clip(0, 255).astype(np.uint8)
        if module == "scribble_hed":
            edge = scribble_lines(edge)
        return edge


def scribble_lines(edge: np.ndarray, low: int = 127, sigma: float = 3.0) -> np.ndarray:
    """Thin strokes from a soft edge map, as a person's scribble: non-maximum suppression across the edge (in
    four directions), a blur, and every touched pixel white."""
    e = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), sigma)
    thin = np.zeros(edge.shape, np.uint8)
    lines = [np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]],
             np.uint8), np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy()]
    for k in lines:  # a pixel on the ridge of the edge along the line it lies on
        ridge = (cv2.dilate(e, k) == e) & (e > low)
        thin[ridge] = 255
    out = cv2.GaussianBlur(thin, (0, 0), sigma)
    return np.where(out > 4, 255, 0).astype(np.uint8)


def annotate(image: Image.Image, module: str, *, settings, cache=None, resolution: int | None = None) -> Image.Image:
    """The detected map of ``module`` for ``image``, at the image's size (grey RGB). A missing file is a
    MissingModelFile naming the file to add and where."""
    path = annotator_file(settings, module)
    if path is None:
        raise MissingModelFile(missing_hint(settings, module))
    key = ("annotator", str(path), ANNOTATORS[module].network)
    net = cache.get(key, lambda: load_network(path, module, settings)).value if cache is not None \
        else load_network(path, module, settings)
    rgb = np.asarray(image.convert("RGB"))
    work = _resized(rgb, detect_size(image.size, resolution or DEFAULT_RESOLUTION))
    lines = line_map(net, module, work)
    lines = cv2.resize(lines, image.size, interpolation=cv2.INTER_LINEAR) if lines.shape[::-1] != image.size else lines
    return Image.fromarray(np.stack([lines] * 3, axis=-1))
