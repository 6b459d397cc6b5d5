"""The ControlNet extension's API (sd-webui-controlnet), which most ControlNet-using A1111 clients go through:
`/controlnet/version`, `model_list`, `module_list`, `detect`, and its units in `alwayson_scripts` of txt2img and
img2img, mapped onto the engine's ControlNet (up to four units, residuals summed; the model-free preprocessors
imagesmith runs: canny, scribble_xdog, lineart_standard, invert, threshold, tile_resample, openpose,
openpose_hand, openpose_face, openpose_faceonly, openpose_full (with the keypoints as OpenPose JSON in `poses`), the depth modules with the user's depth model, the line-art and HED modules with the user's
annotator files, and none).
A module imagesmith cannot run is a 422 naming what it can, never a silent skip."""

from __future__ import annotations

import base64
import io
import re
from typing import Callable

from fastapi import APIRouter, Depends, Request

from ...core.errors import BadRequest
from ...core.imageio import decode_base64
from . import a1111_schema as S
from .context import Svc, caller, json_object

MODULES = {"none": "none", "canny": "canny", "scribble_xdog": "scribble_xdog",  # A1111 module -> imagesmith's
           "lineart_standard (from white bg & black line)": "lineart_standard",
           "invert (from white bg & black line)": "invert", "threshold": "threshold",
           "tile_resample": "tile_resample", "openpose": "openpose", "openpose_hand": "openpose_hand",
           "openpose_face": "openpose_face", "openpose_faceonly": "openpose_faceonly", "openpose_full": "openpose_full",
           "depth_anything": "depth_anything", "depth_anything_v2": "depth_anything", "depth_midas": "depth_midas",
           "depth_zoe": "depth_zoe", "lineart_realistic": "lineart_realistic",
           "lineart_coarse": "lineart_coarse", "lineart_anime": "lineart_anime", "softedge_hed": "softedge_hed",
           "softedge_hedsafe": "softedge_hedsafe", "scribble_hed": "scribble_hed", "inpaint_only": "inpaint_only",
           "inpaint_global_harmonious": "inpaint_global_harmonious"}
MODULE_ALIASES = {"lineart": "lineart_realistic", "hed": "softedge_hed"}
"""the extension's old module names, which clients still send"""
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,}\]$")  # A1111 lists models as "name [hash]"



router = APIRouter(prefix="/controlnet", tags=["a1111"], dependencies=[Depends(caller)])


@router.get("/version")
def version():
    return {"version": 2}


@router.get("/model_list")
def model_list(svc: Svc):
    from ...models.house import make_registry
    return {"model_list": [e.name for e in make_registry(svc.settings).list("controlnet")]}


@router.get("/module_list")
def module_list():
    from ...engine.controlnet import PREPROCESSORS
    detail = {}
    for module, name in MODULES.items():
        p = PREPROCESSORS[name]
        detail[module] = {"model_free": p.model_free, "sliders": [
            {"name": label, "value": default, "min": lo, "max": hi} for label, default, lo, hi in p.sliders]}
    return {"module_list": list(MODULES), "module_detail": detail}


@router.post("/detect", openapi_extra=S.body(S.DetectBody))
async def detect(request: Request, svc: Svc):
    """The preprocessor alone, as the extension's Preview: images in, detected maps out (base64 PNG)."""
    body = await json_object(request)
    module = _module(body.get("controlnet_module", "none"))
    images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not isinstance(images, list) or not images:
        raise BadRequest("controlnet_input_images: give one or more base64 images")
    from ...core.imageio import load_image
    from ...core.requests import ControlNetSpec
    from ...engine.controlnet import detect as run_detector
    a, b = body.get("controlnet_threshold_a"), body.get("controlnet_threshold_b")
    low, high = _thresholds(a, b)
    spec = ControlNetSpec(model="-", image="-", preprocessor=module, canny_low=low, canny_high=high,
                          threshold_a=_number(a), threshold_b=_number(b),
                          processor_res=_resolution(body.get("controlnet_processor_res")))
    out, poses = [], []
    for data in images:
        image = load_image(decode_base64(data), settings=svc.settings, mode="RGB", what="controlnet input image")
        buf = io.BytesIO()
        detected, pose = run_detector(image, spec, settings=svc.settings)
        detected.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
        if pose is not None:
            poses.append(pose)
    answer = {"images": out, "info": "Success"}
    if poses:  # the OpenPose modules also answer with the keypoints, as the extension does
        answer["poses"] = poses
    return answer


def always_on_args(body: dict, script: str):
    """The `args` of one extension's entry in A1111's `alwayson_scripts` (matched case-insensitively), or None when
    the request has none; a malformed `alwayson_scripts` is a BadRequest."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise BadRequest("alwayson_scripts must be an object")
    entry = next((v for k, v in scripts.items() if k.lower() == script), None)
    if entry is None:
        return None
    return entry.get("args") if isinstance(entry, dict) else False


def controlnet_unit(body: dict, upload: Callable[[bytes], str]) -> dict | list[dict] | None:
    """The engine's `controlnet` request field from A1111's `alwayson_scripts` (ControlNet units): one unit, a list
    of several enabled units (their residuals add up, as in the extension), or None."""
    args = always_on_args(body, "controlnet")
    if args is None:
        return None
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of units")
    units = [a for a in _enabled(args) if not _is_ip_adapter(a)]
    if not units:
        return None
    if len(units) > MAX_UNITS:
        raise BadRequest(f"at most {MAX_UNITS} ControlNet units a request; {len(units)} are enabled")
    specs = [_unit(u, upload) for u in units]
    return specs[0] if len(specs) == 1 else specs


def _enabled(args: list[dict]) -> list[dict]:
    return [a for a in args if a.get("enabled", True) and (a.get("model") not in (None, "", "None"))]


def _is_ip_adapter(unit: dict) -> bool:
    return str(unit.get("module", "")).strip().lower().startswith("ip-adapter") or \
        str(unit.get("model", "")).lower().startswith("ip-adapter")


def ip_adapter_units(body: dict, upload: Callable[[bytes], str]) -> dict | list[dict] | None:
    """The engine's `ip_adapter` field from the extension's IP-Adapter units (module ``ip-adapter_clip_*``, model
    ``ip-adapter_sd15 [hash]``): the reference image, its weight and step window; the CLIP vision encoder is the
    one in models/clip_vision that fits the adapter. FaceID (module ``ip-adapter_face_id``, model
    ``ip-adapter-faceid_sd15 [hash]``; ``ip-adapter_face_id_plus`` for FaceID Plus / PlusV2) takes the InsightFace
    model in models/insightface (and Plus, the CLIP vision encoder)."""
    args = always_on_args(body, "controlnet")
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        return None
    units = [a for a in _enabled(args) if _is_ip_adapter(a)]
    if not units:
        return None
    if len(units) > MAX_UNITS:
        raise BadRequest(f"at most {MAX_UNITS} IP-Adapter units a request; {len(units)} are enabled")
    specs = []
    for u in units:
        image, mask = _image_and_mask(u)
        if not isinstance(image, str) or not image:
            raise BadRequest("the IP-Adapter unit needs a reference image (base64)")
        specs.append({"model": _HASH_SUFFIX.sub("", str(u["model"])), "image": upload(decode_base64(image)),
                      "weight": u.get("weight", 1.0), "guidance_start": u.get("guidance_start", 0.0),
                      "guidance_end": u.get("guidance_end", 1.0),
                      **({"mask": upload(decode_base64(mask))} if isinstance(mask, str) and mask else {})})
    return specs[0] if len(specs) == 1 else specs


def _image_and_mask(unit: dict) -> tuple:
    """A unit's image and mask (base64 or None): ``image``/``input_image``, and ``effective_region_mask`` (the
    extension's region a unit acts in), ``mask``/``mask_image``, or the mask of the {"image", "mask"} form."""
    image = unit.get("image") or unit.get("input_image")
    mask = unit.get("effective_region_mask") or unit.get("mask") or unit.get("mask_image")
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        image, mask = image.get("image"), mask or image.get("mask")
    return image, mask


def _unit(unit: dict, upload: Callable[[bytes], str]) -> dict:
    image, mask = _image_and_mask(unit)
    if not isinstance(image, str) or not image:
        raise BadRequest("the ControlNet unit needs an image (base64)")
    low, high = _thresholds(unit.get("threshold_a"), unit.get("threshold_b"))
    union = str(unit.get("union_control_type") or "Unknown").strip().lower()
    if union not in UNION_CONTROL_TYPES:
        raise BadRequest(f"union_control_type {unit.get('union_control_type')!r} is not one of the extension's: "
                         "OpenPose, Depth, Soft Edge, Hard Edge, Normal Map, Segmentation, Tile, Inpaint, Unknown")
    extra = {"union_type": UNION_CONTROL_TYPES[union]} if UNION_CONTROL_TYPES[union] else {}
    return {**extra, "model": _HASH_SUFFIX.sub("", str(unit["model"])), "image": upload(decode_base64(image)),
            "preprocessor": _module(unit.get("module", "none")), "weight": unit.get("weight", 1.0),
            "guidance_start": unit.get("guidance_start", 0.0), "guidance_end": unit.get("guidance_end", 1.0),
            "canny_low": low, "canny_high": high, "threshold_a": _number(unit.get("threshold_a")),
            "threshold_b": _number(unit.get("threshold_b")), "processor_res": _resolution(unit.get("processor_res")),
            "control_mode": _control_mode(unit.get("control_mode", 0)),
            **({"mask": upload(decode_base64(mask))} if isinstance(mask, str) and mask else {})}


CONTROL_MODES = {"0": "balanced", "1": "prompt", "2": "controlnet", "balanced": "balanced",
                 "my prompt is more important": "prompt", "controlnet is more important": "controlnet"}
"""the extension's control_mode, by index (webuiapi sends 0, 1, 2) or by its UI name"""


def _control_mode(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 1.0 from a client that sends numbers as floats
    key = str(v).strip().lower()
    if key not in CONTROL_MODES:
        raise BadRequest(f"control_mode {v!r} is not one of the extension's: 0 Balanced, 1 My prompt is more "
                         "important, 2 ControlNet is more important")
    return CONTROL_MODES[key]


def _resolution(v) -> int | None:
    """A unit's processor_res: None (512) when unset (-1, missing); the extension's own bounds otherwise."""
    n = _number(v)
    if n is None:
        return None
    if not 64 <= n <= 4096:
        raise BadRequest(f"processor_res {v!r} is outside 64..4096")
    return int(n)


def _number(v) -> float | None:
    """A slider value a client sent, or None (the module's default): -1, missing or not a number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v == -1:
        return None
    return float(v)


UNION_CONTROL_TYPES = {"openpose": "openpose", "depth": "depth", "soft edge": "softedge", "hard edge": "hardedge",
                       "normal map": "normal", "segmentation": "segment", "tile": "tile", "inpaint": "inpaint",
                       "unknown": None}
"""the extension's ControlNetUnionControlType values (xinsir's union models) -> imagesmith's kinds; Unknown: the
kind the unit's module draws, as the extension infers it"""
MAX_UNITS = 4  # the extension's default "Multi-ControlNet: ControlNet unit number" is 3; some raise it to 4


def _module(name) -> str:
    key = str(name).strip().lower()
    key = MODULE_ALIASES.get(key, key)
    if key not in MODULES:
        raise BadRequest(f"ControlNet module {name!r} is not available in imagesmith; available: "
                         f"{', '.join(MODULES)}")
    return MODULES[key]


def _thresholds(a, b) -> tuple[int, int]:
    """The canny thresholds from the extension's threshold_a/b; its 'unset' value (-1 or 64 from clients that
    send a default) keeps A1111's canny defaults where it is out of range."""
    def clean(v, default):
        try:
            v = int(v)
        except (TypeError, ValueError):
            return default
        return v if 1 <= v <= 255 else default
    return clean(a, 100), clean(b, 200)
