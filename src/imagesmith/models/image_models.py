"""Image-to-image networks of any common architecture (upscalers, face restorers), loaded through spandrel.

Users have ``4x-UltraSharp.pth``, ``4x_NMKD-Siax_200k.pth``, DAT, HAT, SwinIR, SPAN and Real-ESRGAN files, and
GFPGAN or RestoreFormer for faces. spandrel (MIT) knows those architectures: given a state dict it finds the
architecture, builds the network and reports its scale and purpose.

Files: ``.safetensors`` are read directly. ``.pth``/``.pt`` files are torch pickles: imagesmith never unpickles
them; :mod:`imagesmith.models.legacy_pth` reads their tensors as data, refusing any other global, and the result
is written once to ``$IMAGESMITH_HOME/cache/models/<stem>-<sha256 prefix>.safetensors``, which is what loads from
then on. Training checkpoints that wrap the weights (``params_ema``, ``params``, ``state_dict``, ...) are
unwrapped as spandrel does.

spandrel_extra_arches (CodeFormer and others under non-commercial terms) is never imported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import ModelNotFound, UnsupportedModel

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

IMAGE_MODEL_SUFFIXES = (".safetensors", ".pth", ".pt")
_WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
_PREFIXES = ("module.", "netG.")
PURPOSE_NAMES = {"SR": "upscaler", "FaceSR": "face restorer", "Restoration": "restorer", "Inpainting": "inpainter"}


@dataclass(frozen=True)
class ImageModelInfo:
    """What a file is, without building the network (for listings)."""
    architecture: str  # spandrel's name, e.g. "ESRGAN", "SPAN", "GFPGAN"
    purpose: str  # "upscaler", "face restorer", ...


def unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """The prefixes that wrappers of a network leave on every key (``module.``, ``netG.``), removed as spandrel
    does. (A .pth training checkpoint's ``params_ema`` and the like are unwrapped when it is read.)"""
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


EXTRA_LICENCES = {"CodeFormer": "CodeFormer's released weights are under the S-Lab License 1.0: non-commercial "
                                 "use only"}
"""what the weights of spandrel_extra_arches' architectures may be used for, stated wherever such a file is listed
or loaded (the package's code is MIT; the weights its architectures read come under their authors' terms)"""
EXTRA_HINT = ("pip install spandrel_extra_arches==0.2.0 (MIT) reads CodeFormer, Restormer, SRFormer and more; "
              "their weights come under their authors' terms (CodeFormer's: S-Lab License 1.0, non-commercial)")


def _spandrel() -> Any:
    try:
        import spandrel
    except ImportError as e:  # pragma: no cover - a dependency of imagesmith; only a broken install lacks it
        raise UnsupportedModel(f"upscaler and restorer files need the spandrel package ({e})") from None
    try:  # the user's opt-in: spandrel_extra_arches installed (never a dependency of imagesmith)
        import spandrel_extra_arches
    except ImportError:
        return spandrel
    if "CodeFormer" not in spandrel.MAIN_REGISTRY:  # spandrel's own registry, extended once per process
        try:
            spandrel_extra_arches.install()
        except ValueError:  # another thread installed them meanwhile
            pass
    return spandrel


def looks_like_codeformer(shapes: dict[str, Any]) -> bool:
    return "position_emb" in shapes and "quantize.embedding.weight" in shapes and "idx_pred_layer.1.weight" in shapes


def licence_notes(architecture: str) -> list[str]:
    return [EXTRA_LICENCES[architecture]] if architecture in EXTRA_LICENCES else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_path(path: str | Path, cache_dir: Path) -> Path:
    """The safetensors file to load for ``path``: itself, or its conversion in ``cache_dir`` (made once,
    atomically; a changed .pth gets a new conversion because the name carries the content's hash)."""
    from .legacy_pth import UnsafePickle, convert_pth
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return path
    if path.suffix.lower() not in (".pth", ".pt"):
        raise UnsupportedModel(f"{path.name}: upscalers and restorers are read from .safetensors, .pth or .pt files")
    dst = cache_dir / f"{path.stem}-{_sha256(path)[:16]}.safetensors"
    if not dst.is_file():
        try:
            convert_pth(path, dst, unwrap=_WRAPPERS)
        except UnsafePickle as e:
            raise UnsupportedModel(f"{path.name}: not read ({e}); imagesmith never unpickles a model file") from None
        except (OSError, RuntimeError) as e:
            raise UnsupportedModel(f"{path.name}: not a readable torch file ({e})") from None
    return dst


def load_state(path: str | Path, cache_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    src = safetensors_path(path, cache_dir)
    try:
        state = load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise UnsupportedModel(f"{Path(path).name}: not a readable safetensors file ({e})") from None
    return unwrap(state)


def load_image_model(path: str | Path, cache_dir: Path, *, device: str | torch.device = "cpu") -> ImageModelDescriptor:
    """The network in ``path``, in eval mode on ``device``. A file whose architecture spandrel does not know,
    or that is not an image-to-image network, is an UnsupportedModel naming the file."""
    spandrel = _spandrel()
    path = Path(path)
    state = load_state(path, cache_dir)
    try:
        desc = spandrel.ModelLoader(device=device).load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        if looks_like_codeformer(state):
            raise UnsupportedModel(f"{path.name} is a CodeFormer: {EXTRA_HINT}") from None
        raise UnsupportedModel(f"{path.name}: spandrel does not know this network's architecture "
                               f"(first key {next(iter(state), '(none)')!r})") from None
    except (RuntimeError, KeyError, ValueError, AssertionError, IndexError) as e:
        raise UnsupportedModel(f"{path.name}: looks like a known architecture but does not load ({e})") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise UnsupportedModel(f"{path.name}: a {desc.architecture.name} {PURPOSE_NAMES.get(desc.purpose, desc.purpose)}"
                               ", not an image-to-image network imagesmith can run here")
    return desc.eval()


def cached_image_model(path: str | Path, cache_dir: Path, *, device: str = "cpu", cache=None,
                       prepare=None) -> ImageModelDescriptor:
    """:func:`load_image_model` under a ModelCache's RAM/VRAM budget (``cache``): one entry per file version and
    device, counted with the pipelines, evicted (or moved to RAM) like them when room is needed and loaded again on
    the next use. ``prepare(desc)`` checks or adapts the network before it is kept (a raise keeps nothing). Without
    a cache, a plain load."""
    path = Path(path)

    def load():
        desc = load_image_model(path, cache_dir, device=device)
        if prepare is not None:
            prepare(desc)
        return desc
    if cache is None:
        return load()
    key = ("image-model", str(path), path.stat().st_mtime_ns, str(device))
    return cache.get(key, load, device=device).value


def identify(shapes: dict[str, list[int]]) -> ImageModelInfo | None:
    """The architecture spandrel would pick for tensors of these names and shapes (no weights read)."""
    spandrel = _spandrel()
    state = unwrap({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    for arch in spandrel.MAIN_REGISTRY.architectures("detection"):
        try:
            if arch.architecture.detect(state):
                return ImageModelInfo(arch.architecture.name, _purpose_of(arch.architecture.id))
        except (KeyError, IndexError, ValueError, RuntimeError):
            continue
    return None


_FACE_ARCHS = {"GFPGAN", "RestoreFormer", "CodeFormer"}
_INPAINT_ARCHS = {"LaMa", "MAT"}


def _purpose_of(arch_id: str) -> str:
    if arch_id in _FACE_ARCHS:
        return "face restorer"
    if arch_id in _INPAINT_ARCHS:
        return "inpainter"
    return "upscaler"


def torch_file_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a .pth/.pt file, from its pickle only (no storages read, nothing unpickled)."""
    from .legacy_pth import tensor_shapes
    return tensor_shapes(path, unwrap=_WRAPPERS)
