"""ControlNet preprocessors: what the ControlNet extension calls canny, scribble_xdog, lineart standard, invert,
threshold and tile_resample (no model), openpose, openpose_hand, openpose_face, openpose_faceonly and
openpose_full (mediapipe's bundled models), depth_anything,
depth_midas and depth_zoe (the user's transformers depth model under models/annotators/), lineart_realistic,
lineart_coarse, lineart_anime, softedge_hed, softedge_hedsafe and scribble_hed (lllyasviel's annotator files
under models/annotators/, run by :mod:`imagesmith.engine.annotators`), plus 'none' (a ready-made control
image). Each takes the image and the extension's two slider values (``threshold_a``,
``threshold_b``; None for the module's default) and gives the control image the ControlNet sees (its 'detected
map')."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..core.requests import ControlNetSpec


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _rgb(a: np.ndarray) -> Image.Image:
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([a] * 3, axis=-1) if a.ndim == 2 else a)


def scribble_xdog(image: Image.Image, threshold: float = 32) -> Image.Image:
    """Scribble lines from a photo by extended difference of Gaussians: where the fine blur is darker than the
    coarse one by more than `threshold`, a white line."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(x, (0, 0), 5.0)
    darker = np.max(coarse - fine, axis=2)
    return _rgb(np.where(2 * darker > threshold, 255, 0))


def lineart_standard(image: Image.Image) -> Image.Image:
    """Line art from a drawing or photo without a model: how much darker each pixel is than its surroundings,
    normalised by the typical line strength (white lines on black, as lineart ControlNets expect)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    surround = cv2.GaussianBlur(x, (0, 0), 6.0)
    strength = np.min(surround - x, axis=2).clip(0, 255)
    lines = strength[strength > 8]
    scale = max(16.0, float(np.median(lines))) if lines.size else 16.0
    return _rgb(strength / scale * 127)


def invert(image: Image.Image) -> Image.Image:
    """A drawing in black on white -> white on black (what scribble and lineart ControlNets were trained on)."""
    return _rgb(255 - np.asarray(image.convert("RGB"), dtype=np.int16))


def threshold(image: Image.Image, level: float = 127) -> Image.Image:
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return _rgb(np.where(gray > level, 255, 0))


def tile_resample(image: Image.Image, rate: float = 1.0) -> Image.Image:
    """The tile ControlNet's input: the image itself, optionally made coarser by `rate` (the engine then scales
    it to the output size)."""
    if rate <= 1.0:
        return image.convert("RGB")
    w, h = image.size
    return image.convert("RGB").resize((max(1, round(w / rate)), max(1, round(h / rate))), Image.LANCZOS)


@dataclass(frozen=True)
class Preprocessor:
    run: Callable[..., Image.Image]
    sliders: tuple[tuple[str, float, float, float], ...] = ()
    """(name, default, min, max) of threshold_a then threshold_b, as the extension's module_detail lists them"""
    model_free: bool = False
    depth: tuple[str, ...] = ()
    """for a depth module: the transformers model types it runs (from the user's models/annotators/)"""
    network: bool = False
    """runs a network from the user's annotator file (engine.annotators: line art, soft edges)"""


DEPTH_HINT = {"depth_anything": "a Depth Anything folder (e.g. depth-anything/Depth-Anything-V2-Small-hf)",
              "depth_midas": "a DPT folder (e.g. Intel/dpt-hybrid-midas)",
              "depth_zoe": "a ZoeDepth folder (e.g. Intel/zoedepth-nyu-kitti)"}


def depth_folder(settings, module: str) -> Path:
    """The user's depth model for ``module``: a transformers folder under models/annotators/ whose model type
    the module runs (one named like the module first)."""
    from ..core.errors import MissingModelFile
    wanted = PREPROCESSORS[module].depth
    found = []
    for root in settings.model_dirs("annotators"):
        for cfg in sorted(root.glob("*/config.json")) if root.is_dir() else []:
            try:
                kind = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError):
                continue
            if kind in wanted:
                found.append(cfg.parent)
    if not found:
        raise MissingModelFile(f"{module} needs {DEPTH_HINT[module]} (config.json, model.safetensors, "
                               f"preprocessor_config.json) in {settings.models_dir / 'annotators'}/")
    return next((f for f in found if module.split("_")[1] in f.name.lower()), found[0])


def depth_map(image: Image.Image, folder: Path, cache=None) -> Image.Image:
    """Relative depth as the depth ControlNets take it: near bright, far dark, stretched to 0-255, grey RGB."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    def load():
        model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        return model.eval()
    model = cache.get(("annotator", str(folder)), load).value if cache is not None else load()
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    inputs = processor(images=image.convert("RGB"), return_tensors="pt")
    param = next(model.parameters())
    with torch.inference_mode():
        depth = model(pixel_values=inputs.pixel_values.to(param.device, param.dtype)).predicted_depth
    depth = torch.nn.functional.interpolate(depth[:, None].float(), size=image.size[::-1], mode="bicubic",
                                            align_corners=False)[0, 0].cpu().numpy()
    if getattr(model.config, "model_type", "") == "zoedepth":  # metric depth: far is large; make near bright
        depth = -depth
    lo, hi = float(depth.min()), float(depth.max())
    grey = ((depth - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(depth)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(lambda im, a, b: im.convert("RGB")),
    "canny": Preprocessor(lambda im, a, b: canny(im, int(a), int(b)),
                          (("Low Threshold", 100, 1, 255), ("High Threshold", 200, 1, 255))),
    "scribble_xdog": Preprocessor(lambda im, a, b: scribble_xdog(im, a), (("XDoG Threshold", 32, 1, 64),)),
    "lineart_standard": Preprocessor(lambda im, a, b: lineart_standard(im)),
    "invert": Preprocessor(lambda im, a, b: invert(im)),
    "threshold": Preprocessor(lambda im, a, b: threshold(im, a), (("Binary threshold", 127, 0, 255),)),
    # the inpaint ControlNets' (control_v11p_sd15_inpaint, xinsir's union 'repaint'): the picture itself; the engine
    # marks its hole (the unit's mask, else the request's) with -1, below the picture's 0..1
    "inpaint_only": Preprocessor(lambda im, a, b: im.convert("RGB")),
    "inpaint_global_harmonious": Preprocessor(lambda im, a, b: im.convert("RGB")),
    "tile_resample": Preprocessor(lambda im, a, b: tile_resample(im, a), (("Down Sampling Rate", 1.0, 1.0, 8.0),),
                                  model_free=False),
    # bodies, hands and faces by mediapipe's pose, hand and face-mesh models, drawn as OpenPose's keypoints
    # (engine.landmarks); the extension's five modules, each drawing its parts
    **{name: Preprocessor(lambda im, a, b, name=name: _openpose(im, name)) for name in (
        "openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full")},
    # depth by the user's transformers model (models/annotators/<folder>)
    "depth_anything": Preprocessor(lambda im, a, b: im, depth=("depth_anything",)),
    "depth_midas": Preprocessor(lambda im, a, b: im, depth=("dpt",)),
    "depth_zoe": Preprocessor(lambda im, a, b: im, depth=("zoedepth",)),
    # line art and soft edges by lllyasviel's annotator networks (the user's files in models/annotators/)
    **{name: Preprocessor(lambda im, a, b: im, network=True) for name in (
        "lineart_realistic", "lineart_coarse", "lineart_anime", "softedge_hed", "softedge_hedsafe", "scribble_hed")},
}


UNION_KINDS = ("openpose", "depth", "softedge", "hardedge", "normal", "segment", "tile", "inpaint", "blur", "gray")
"""control kinds by name, the vocabulary union ControlNets' types are given in (A1111's ControlNet extension:
OpenPose, Depth, Soft Edge, Hard Edge, Normal Map, Segmentation, Tile, Inpaint)"""
UNION_INDEX = {
    # xinsir's SDXL ControlNet Union / ProMax (ComfyUI's SetUnionControlNetType order)
    "sdxl": {"openpose": 0, "depth": 1, "softedge": 2, "hardedge": 3, "normal": 4, "segment": 5, "tile": 6,
             "inpaint": 7},
    # InstantX / Shakker-Labs FLUX.1 ControlNet Union (Pro): canny, tile, depth, blur, pose, gray, low quality
    "flux": {"hardedge": 0, "tile": 1, "depth": 2, "blur": 3, "openpose": 4, "gray": 5},
}
PREPROCESSOR_KIND = {"openpose": "openpose", "openpose_hand": "openpose", "openpose_face": "openpose",
                     "openpose_faceonly": "openpose", "openpose_full": "openpose", "depth_anything": "depth",
                     "depth_midas": "depth", "depth_zoe": "depth", "scribble_xdog": "softedge", "canny": "hardedge",
                     "lineart_standard": "hardedge", "invert": "hardedge", "tile_resample": "tile",
                     "inpaint_only": "inpaint", "inpaint_global_harmonious": "inpaint",
                     "lineart_realistic": "hardedge", "lineart_coarse": "hardedge", "lineart_anime": "hardedge",
                     "softedge_hed": "softedge", "softedge_hedsafe": "softedge", "scribble_hed": "softedge"}
"""what each preprocessor's map is, as the extension infers a union type from its module when none is given"""


def union_index(family: str, kind: str | None, preprocessor: str) -> int | None:
    """A union ControlNet's control type for a unit: its named kind, else its preprocessor's; None when neither
    is one the family's union model has."""
    return UNION_INDEX.get(family, {}).get(kind or PREPROCESSOR_KIND.get(preprocessor, ""))


def _openpose(image: Image.Image, module: str) -> Image.Image:
    from .landmarks import openpose
    return openpose(image.convert("RGB"), module)[0]


def slider_values(name: str, a: float | None, b: float | None) -> tuple[float, float]:
    """The module's slider values: given ones inside their range, else its defaults (clients send -1 or the
    extension's 64 when they mean 'unset')."""
    sliders = PREPROCESSORS[name].sliders
    out = []
    for i, value in enumerate((a, b)):
        if i >= len(sliders):
            out.append(0.0)
            continue
        _, default, lo, hi = sliders[i]
        out.append(float(value) if value is not None and lo <= float(value) <= hi else float(default))
    return out[0], out[1]


def preprocess(image: Image.Image, spec: ControlNetSpec, *, settings=None, cache=None) -> Image.Image:
    """The control image for ``spec``; ``settings`` locate the user's annotator models (default: from the
    environment), ``cache`` (a ModelCache) keeps them loaded."""
    if spec.preprocessor == "canny":
        return canny(image, spec.canny_low, spec.canny_high)
    if PREPROCESSORS[spec.preprocessor].depth:
        from ..core.settings import Settings
        return depth_map(image, depth_folder(settings or Settings.from_env(), spec.preprocessor), cache)
    if PREPROCESSORS[spec.preprocessor].network:
        from ..core.settings import Settings
        from .annotators import annotate
        return annotate(image, spec.preprocessor, settings=settings or Settings.from_env(), cache=cache,
                        resolution=spec.processor_res)
    a, b = slider_values(spec.preprocessor, spec.threshold_a, spec.threshold_b)
    return PREPROCESSORS[spec.preprocessor].run(image, a, b)


def detect(image: Image.Image, spec: ControlNetSpec, *, settings=None, cache=None) -> tuple[Image.Image, dict | None]:
    """:func:`preprocess` as the extension's /controlnet/detect answers: the map, and for the OpenPose modules
    the poses as OpenPose JSON (None for the others)."""
    from .landmarks import OPENPOSE_PARTS, openpose
    if spec.preprocessor in OPENPOSE_PARTS:
        return openpose(image.convert("RGB"), spec.preprocessor)
    return preprocess(image, spec, settings=settings, cache=cache), None


def preprocessor_status(settings) -> list[dict]:
    """Every preprocessor with whether it can run with what this install has: ``name``, ``kind`` (what its map
    is), ``available``, and for those that need a user's file, ``file`` (the one found) or ``needs`` (what to
    add, and where)."""
    from .annotators import annotator_file, missing_hint
    rows = []
    for name, p in PREPROCESSORS.items():
        row: dict = {"name": name, "kind": PREPROCESSOR_KIND.get(name, "-"), "available": True}
        if p.depth:
            try:
                row["file"] = str(depth_folder(settings, name))
            except Exception as exc:  # MissingModelFile: its message says what to add
                row.update(available=False, needs=str(exc))
        elif p.network:
            found = annotator_file(settings, name)
            if found is None:
                row.update(available=False, needs=missing_hint(settings, name))
            else:
                row["file"] = str(found)
        rows.append(row)
    return rows


INPAINT_PREPROCESSORS = ("inpaint_only", "inpaint_global_harmonious")


def inpaint_hint(image: Image.Image, mask: Image.Image, size: tuple[int, int]):
    """An inpaint ControlNet's control tensor ``[1, 3, H, W]``: the picture at ``size`` in 0..1, its hole (mask >
    0.5, white = repaint) set to -1 (lllyasviel's control_v11p_sd15_inpaint; diffusers' docs build it so)."""
    import torch
    pic = np.asarray(image.convert("RGB").resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
    hole = np.asarray(mask.convert("L").resize(size, Image.NEAREST), dtype=np.float32) / 255.0 > 0.5
    pic[hole] = -1.0
    return torch.from_numpy(pic).permute(2, 0, 1)[None]
