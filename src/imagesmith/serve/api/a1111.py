"""The A1111-compatible API (``/sdapi/v1``) that real clients call unchanged (webuiapi, Open WebUI, SillyTavern):
txt2img and img2img through the same queue as every job (waiting for the result, as A1111 does), the lists,
PNG Info, Extras upscaling, progress and interrupt, and each user's durable options. The list routes and the
ControlNet extension's routes are their own routers (:mod:`.a1111_lists`, :mod:`.a1111_controlnet`)."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ... import __version__
from ...core.errors import BadRequest, NotFound
from ...core.imageio import decode_base64
from ...core.settings import Settings
from . import a1111_schema as S
from .a1111_controlnet import always_on_args, controlnet_unit, ip_adapter_units
from .context import Admin, Caller, Services, Svc, json_object

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

A1111_OPTIONS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "randn_source",
                 "hires_fix_refiner_pass")
"""The A1111 options that decide a picture: a user's saved values are their defaults (override_settings wins)."""


@router.post("/txt2img", openapi_extra=S.body(S.Txt2ImgBody))
async def txt2img(request: Request, svc: Svc, who: Caller):
    body = await json_object(request)
    return await answer(svc, "generate", a1111_request(svc, body, who), who, body)


@router.get("/prompt-styles")
def prompt_styles(svc: Svc, _: Caller):
    """The styles of ``styles.csv`` under the home (A1111's file and format)."""
    from ...core.styles import load_styles, styles_path
    return [s.as_dict() for s in load_styles(styles_path(svc.settings.home)).values()]


@router.post("/prompt-styles", openapi_extra=S.body(S.StyleBody))
async def put_prompt_style(request: Request, svc: Svc, _: Admin):
    """Admin: add or replace one style (``{"name", "prompt", "negative_prompt"}``; ``{prompt}`` in a style's text
    places the request's prompt there). A1111 edits styles in its UI; this is that, for a server."""
    from ...core.styles import check_style, put_style, styles_path
    body = await json_object(request)
    style = check_style(body.get("name"), body.get("prompt", ""), body.get("negative_prompt", ""))
    return [s.as_dict() for s in put_style(styles_path(svc.settings.home), style).values()]


@router.delete("/prompt-styles/{name}")
def delete_prompt_style(name: str, svc: Svc, _: Admin):
    from ...core.styles import delete_style, styles_path
    delete_style(styles_path(svc.settings.home), name)
    return {"deleted": name}


@router.post("/img2img", openapi_extra=S.body(S.Img2ImgBody))
async def img2img(request: Request, svc: Svc, who: Caller):
    body = await json_object(request)
    inits = body.get("init_images") or []
    if not inits:
        raise BadRequest("init_images: give one base64 image")
    req = a1111_request(svc, body, who)
    if len(inits) > 1:  # A1111 gives each image of the batch its own init; imagesmith's extra pictures are edits'
        if not _multi_picture_model(svc, req.get("model")):
            raise BadRequest(f"init_images: {len(inits)} images; imagesmith takes one init image a request (A1111 "
                             "spreads several over the batch: send one request per picture), or several pictures "
                             "for a multi-picture edit model (Qwen-Image-Edit-Plus)")
        req["edit_images"] = [svc.store_upload(decode_base64(extra), who)["id"] for extra in inits[1:]]
    init = svc.store_upload(decode_base64(inits[0]), who)
    req["init_image"] = init["id"]
    if str(body.get("script_name") or "").strip().lower() == "ultimate sd upscale":
        return await answer(svc, "upscale", ultimate_upscale(svc, body, req, init), who, body)
    job_type = "img2img"
    if body.get("mask"):
        req["mask"] = svc.store_upload(decode_base64(body["mask"]), who)["id"]
        job_type = "inpaint"
        if "mask_blur" in body:
            req["mask_blur"] = body["mask_blur"]
        req.update(a1111_inpaint_fields(body))
    return await answer(svc, job_type, req, who, body)


def _multi_picture_model(svc: Services, model: str | None) -> bool:
    """Whether the request's checkpoint (the default when none is named) edits with several pictures."""
    from ...engine.qwen_image import is_qwen_edit_plus
    from ...models.house import make_registry
    registry = make_registry(svc.settings)
    try:
        entry = registry.get(model, "checkpoint") if model else registry.default_checkpoint()
    except Exception:  # an unknown model fails later with its own message
        return False
    return is_qwen_edit_plus(entry)


@router.get("/sd-models")
def sd_models(svc: Svc, _: Caller):
    from ...models.house import make_registry
    return [{"title": e.name, "model_name": e.name, "filename": str(e.path), "hash": None}
            for e in make_registry(svc.settings).list("checkpoint")]


@router.get("/loras")
def loras(svc: Svc, _: Caller):
    from ...models.house import make_registry
    return [{"name": e.name, "alias": e.name, "path": str(e.path)} for e in make_registry(svc.settings).list("lora")]


def upscaler_names(svc: Services) -> list[str]:
    """A1111's upscaler list: None, then every upscaler imagesmith has (built in, then the user's files)."""
    from ...engine.upscale import UpscalerSet
    return ["None"] + UpscalerSet(svc.settings).names()


@router.get("/upscalers")
def upscalers(svc: Svc, _: Caller):
    import re
    out = []
    for n in upscaler_names(svc):
        found = re.search(r"(?:^|[^0-9])([1-8])x|x([1-8])(?:[^0-9]|$)", n, re.IGNORECASE)
        scale = 1 if n == "None" else 4 if "ESRGAN" in n else int(found.group(1) or found.group(2)) if found else (
            2 if n == "Lanczos" else 4)
        out.append({"name": n, "model_name": None if n == "None" else n, "model_path": None, "model_url": None,
                    "scale": scale})
    return out


@router.post("/png-info", openapi_extra=S.body(S.PngInfoBody))
async def png_info(request: Request, svc: Svc, _: Caller):
    """A1111's PNG Info: the infotext and its fields, read from the file's chunks (pixels not decoded)."""
    from ...core.metadata import read_png_metadata
    body = await json_object(request)
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise BadRequest("image: give a base64 image")
    meta = read_png_metadata(decode_base64(body["image"]), settings=svc.settings)
    return {"info": meta.get("parameters") or "", "items": {k: v for k, v in (meta.get("parsed") or {}).items()},
            "parameters": meta.get("parsed") or {}, "imagesmith": meta.get("imagesmith")}


@router.post("/extra-single-image", openapi_extra=S.body(S.ExtrasSingleBody))
async def extra_single_image(request: Request, svc: Svc, who: Caller):
    """A1111's Extras upscaling: through the queue as an ``upscale`` job."""
    body = await json_object(request)
    if not isinstance(body.get("image"), str) or not body["image"]:
        raise BadRequest("image: give a base64 image")
    upscaler = _extras_upscaler(body)
    restore = _extras_restore(svc, body)
    req = {"image": svc.store_upload(decode_base64(body["image"]), who)["id"],
           "scale": body.get("upscaling_resize", 2), "upscaler": upscaler, **restore}
    job = await svc.run_sync("upscale", req, who)
    try:
        if isinstance(job, JSONResponse):
            return job
        return {"html_info": "", "image": base64.b64encode(svc.output_bytes(job["result"]["files"][0])).decode()}
    finally:  # A1111's Extras API never saves its output
        svc.discard(None if isinstance(job, JSONResponse) else job, [req["image"]])


@router.get("/samplers")
def samplers(_: Caller):
    from ...core.sampling_names import SAMPLER_NAMES
    # A1111's shape; ComfyUI's name is an alias, so a client may send either
    return [{"name": s.label, "aliases": [s.name, *s.aliases],
             "options": {"scheduler": s.automatic} if s.automatic != "normal" else {}} for s in SAMPLER_NAMES]


@router.get("/schedulers")
def schedulers(_: Caller):
    from ...core.sampling_names import SCHEDULE_NAMES
    return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": 7.0 if s.name == "karras" else -1,
             "need_inner_model": s.name in ("normal", "uniform", "simple", "sgm_uniform", "ddim_uniform", "beta")}
            for s in SCHEDULE_NAMES]


@router.get("/options")
def get_options(svc: Svc, who: Caller):
    """The caller's A1111 options: the server's defaults under what they have set (kept per user, durable)."""
    return {**svc.a1111_defaults, **svc.store.a1111_options(who["name"])}


@router.post("/options", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}}}})
async def set_options(request: Request, svc: Svc, who: Caller):
    """Set the caller's options. The ones that decide a picture (A1111_OPTIONS) are checked and become that
    user's defaults for later txt2img/img2img requests; other A1111 options are kept and echoed back."""
    body = await json_object(request)
    check_a1111_options(body, svc.settings)
    return {**svc.a1111_defaults, **svc.store.set_a1111_options(who["name"], body)}


@router.get("/progress")
def progress(svc: Svc, who: Caller):
    running, _ = svc.store.list(user=who["name"], status="running", limit=1)
    queued = svc.store.depth().get("queued", 0)
    p = running[0]["progress"] if running else 0.0
    current = svc.preview_path(running[0]) if running else None
    return {"progress": p, "eta_relative": 0.0, "state": {"job_count": len(running) + queued,
                                                          "job": running[0]["id"] if running else ""},
            "current_image": base64.b64encode(current.read_bytes()).decode() if current else None}


@router.post("/interrupt")
def interrupt(svc: Svc, who: Caller):
    running, _ = svc.store.list(user=who["name"], status="running", limit=100)
    for job in running:
        svc.store.cancel(job["id"])
    return {"interrupted": len(running)}


@router.post("/skip")
def skip(svc: Svc, who: Caller):
    """A1111 skips the image being drawn and goes on with the batch; an imagesmith job is one unit, so skip ends
    the caller's running job at its next step (as interrupt does) and the queue goes on with the next."""
    return interrupt(svc, who)


@router.post("/extra-batch-images", openapi_extra=S.body(S.ExtrasBatchBody))
async def extra_batch_images(request: Request, svc: Svc, who: Caller):
    """A1111's Extras on several images (``imageList``: ``[{"data": base64, "name": ...}]``): one upscale job each,
    in order; the answer lists the upscaled images in the same order."""
    body = await json_object(request)
    items = body.get("imageList")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise BadRequest("imageList: give a list of {\"data\": base64 image, \"name\": ...}")
    if len(items) > 64:
        raise BadRequest("imageList: at most 64 images a call")
    upscaler = _extras_upscaler(body)
    restore = _extras_restore(svc, body)
    ids = [svc.store_upload(decode_base64(i.get("data") or ""), who)["id"] for i in items]  # all checked first
    images = []
    for n, upload_id in enumerate(ids):
        job = await svc.run_sync("upscale", {"image": upload_id, "scale": body.get("upscaling_resize", 2),
                                             "upscaler": upscaler, **restore}, who)
        try:
            if isinstance(job, JSONResponse):
                svc.discard(None, ids[n:])  # the rest will not run
                return job
            images.append(base64.b64encode(svc.output_bytes(job["result"]["files"][0])).decode())
        finally:  # A1111's Extras API never saves its output
            svc.discard(None if isinstance(job, JSONResponse) else job, [upload_id])
    return {"html_info": "", "images": images}


def _restorers(svc: Services) -> list:
    from ...models.house import make_registry
    return sorted(make_registry(svc.settings).list("restorer"), key=lambda e: e.name.lower())


def restorer_names(svc: Services) -> list[str]:
    return [e.name for e in _restorers(svc)]


def _restorer_for(svc: Services, asked: Any) -> str | None:
    """The restorer A1111's ``face_restoration_model`` option names, when one of that name (or architecture,
    'GFPGAN') is installed; else the first installed; None when there is none."""
    entries = _restorers(svc)
    if not entries:
        return None
    if isinstance(asked, str) and asked:
        for e in entries:
            if asked.lower() in (e.name.lower(), str(e.arch).lower()):
                return e.name
    return entries[0].name


def _extras_restore(svc: Services, body: dict) -> dict:
    """Extras' GFPGAN visibility -> the upscale job's face restoration (after the upscale, as A1111's order)."""
    gfpgan, codeformer = body.get("gfpgan_visibility") or 0, body.get("codeformer_visibility") or 0
    for name, v in (("gfpgan_visibility", gfpgan), ("codeformer_visibility", codeformer)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise BadRequest(f"{name} must be a number within 0..1")
    if codeformer > 0 and gfpgan > 0:
        raise BadRequest("gfpgan_visibility and codeformer_visibility: imagesmith restores faces with one network "
                         "per request; give one of them")
    if codeformer > 0:
        found = next((e.name for e in _restorers(svc) if e.arch == "CodeFormer"), None)
        if found is None:
            from ...models.image_models import EXTRA_HINT
            raise BadRequest("codeformer_visibility: no CodeFormer installed: put its .pth in models/restorers; "
                             + EXTRA_HINT)
        weight = body.get("codeformer_weight", 0.5)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1:
            raise BadRequest("codeformer_weight must be a number within 0..1")
        return {"restore_faces": {"model": found, "visibility": codeformer, "codeformer_weight": weight}}
    if gfpgan <= 0:
        return {}
    name = _restorer_for(svc, "GFPGAN")
    if name is None:
        raise BadRequest("gfpgan_visibility: no face restorer installed (put a GFPGAN or RestoreFormer .safetensors "
                         "or .pth in models/restorers)")
    return {"restore_faces": {"model": name, "visibility": gfpgan}}


def _extras_upscaler(body: dict) -> str:
    upscaler = body.get("upscaler_1") or "R-ESRGAN 4x+"
    if upscaler in ("None", None):
        raise BadRequest("upscaler_1: choose an upscaler (GET /sdapi/v1/upscalers)")
    return upscaler


# ---------------------------------------------------------------------------------------------- mapping
def a1111_request(svc: Services, body: dict, who: dict) -> dict:
    """An A1111 txt2img/img2img body as imagesmith's generate request (uploads made for its images). A null field
    means A1111's default, as in A1111's own request model; `sampler_index` (its older name) names the sampler when
    `sampler_name` does not."""
    body = {k: v for k, v in body.items() if v is not None}
    req = {k: v for k, v in body.items() if k in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name",
                                                 "scheduler", "seed", "batch_size", "width", "height",
                                                 "denoising_strength", "clip_skip", "refiner_switch_at")}
    req["malformed_prompt"] = "text"  # A1111 reads a prompt it cannot parse as plain text, never an error
    if isinstance(body.get("refiner_checkpoint"), str) and body["refiner_checkpoint"] not in ("", "None"):
        req["refiner_checkpoint"] = body["refiner_checkpoint"]  # A1111 1.6's refiner fields
    else:
        req.pop("refiner_switch_at", None)
    if "sampler_name" not in req and isinstance(body.get("sampler_index"), str) and body["sampler_index"]:
        req["sampler_name"] = body["sampler_index"]
    if "n_iter" in body:
        req["batch_count"] = body["n_iter"]
    if "subseed" in body and body.get("subseed_strength"):
        req["variation_seed"], req["variation_strength"] = body["subseed"], body["subseed_strength"]
    for key in ("seed_resize_from_w", "seed_resize_from_h"):
        if body.get(key) not in (None, 0, -1):
            req[key] = body[key]
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise BadRequest("override_settings must be an object")
    # the caller's saved options (POST /sdapi/v1/options) under this request's own settings, as in A1111
    saved = {k: v for k, v in {**svc.a1111_defaults, **svc.store.a1111_options(who["name"])}.items()
             if k in A1111_OPTIONS and not (k == "CLIP_stop_at_last_layers" and "clip_skip" in body)}
    overrides = {**saved, **overrides}
    fmt = overrides.get("samples_format")
    if fmt is not None and str(fmt).lower() not in SAMPLES_FORMATS:  # before any work is queued
        raise BadRequest(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, not {fmt!r}")
    model = overrides.get("sd_model_checkpoint")
    if model:
        req["model"] = model
    # per-request A1111 settings that decide the picture (A1111 applies them to this request only)
    if "eta_noise_seed_delta" in overrides:
        req["eta_noise_seed_delta"] = overrides["eta_noise_seed_delta"]
    if "randn_source" in overrides:
        source = str(overrides["randn_source"]).upper()
        if source not in ("CPU", "GPU"):
            raise BadRequest(f"randn_source {overrides['randn_source']!r}: imagesmith draws A1111's CPU or GPU "
                             f"noise (NV is not emulated)")
        req["noise"] = "a1111-cpu" if source == "CPU" else "a1111-gpu"
    if "CLIP_stop_at_last_layers" in overrides:
        req["clip_skip"] = overrides["CLIP_stop_at_last_layers"]
    if "hires_fix_refiner_pass" in overrides:
        value = str(overrides["hires_fix_refiner_pass"]).strip().lower()
        if value not in ("first pass", "second pass", "both passes"):
            raise BadRequest(f"hires_fix_refiner_pass must be 'first pass', 'second pass' or 'both passes', not "
                             f"{overrides['hires_fix_refiner_pass']!r}")
        req["refiner_pass"] = value
    if overrides.get("sd_vae") not in (None, "Automatic", "None"):
        req["vae"] = overrides["sd_vae"]
    styles = body.get("styles")
    if isinstance(styles, list):  # "None" and "" are A1111's UI for no style (Discord bots send ["None"])
        styles = [s for s in styles if s not in ("None", "")]
    if styles:
        from ...core.styles import apply_styles, load_styles, styles_path
        req["prompt"], req["negative_prompt"] = apply_styles(
            req.get("prompt", ""), req.get("negative_prompt", ""), styles, load_styles(styles_path(svc.settings.home)))
    unit = controlnet_unit(body, lambda data: svc.store_upload(data, who)["id"])
    if unit is not None:
        req["controlnet"] = unit
    references = ip_adapter_units(body, lambda data: svc.store_upload(data, who)["id"])
    if references is not None:
        req["ip_adapter"] = references
    if body.get("restore_faces"):  # A1111's face restoration: a restorer when one is installed, else the detailer
        options = body.get("override_settings") if isinstance(body.get("override_settings"), dict) else {}
        name = _restorer_for(svc, options.get("face_restoration_model"))
        if name is not None:
            req["restore_faces"] = {"model": name}
            weight = options.get("code_former_weight")  # A1111's setting for CodeFormer's fidelity
            if isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight <= 1:
                req["restore_faces"]["codeformer_weight"] = weight
        else:
            req["detailer"] = {"kind": "face"}
    detailer = adetailer_unit(body)
    if detailer is not None:
        req["detailer"] = detailer
    if body.get("enable_hr"):
        req["hires"] = {k: body[k] for k in ("hr_scale", "hr_upscaler", "hr_second_pass_steps") if k in body}
        req["hires"]["hr_denoising_strength"] = body.get("denoising_strength", 0.7)
    return req


INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")
"""A1111's 'Masked content' choices, by the index its API sends"""


def a1111_inpaint_fields(body: dict) -> dict:
    """A1111's inpainting options, with A1111's API defaults where a client leaves them out (masked content
    'fill', inpaint area 'only masked' with no padding)."""
    fill = body.get("inpainting_fill", 0)
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < len(INPAINTING_FILL):
        raise BadRequest(f"inpainting_fill must be 0-3 ({', '.join(f'{i} {n}' for i, n in enumerate(INPAINTING_FILL))})")
    return {"inpainting_fill": INPAINTING_FILL[fill],
            "inpaint_full_res": bool(body.get("inpaint_full_res", True)),
            "inpaint_full_res_padding": body.get("inpaint_full_res_padding", 0),
            "inpainting_mask_invert": bool(body.get("inpainting_mask_invert", 0))}


ADETAILER_FACE_MODELS = ("face_yolov8n.pt", "face_yolov8s.pt", "face_yolov8m.pt", "face_yolov9c.pt",
                         "mediapipe_face_full", "mediapipe_face_short", "mediapipe_face_mesh",
                         "mediapipe_face_mesh_eyes_only")


ADETAILER_HAND_MODELS = ("hand_yolov8n.pt", "hand_yolov8s.pt", "hand_yolov9c.pt")
ADETAILER_PERSON_MODELS = ("person_yolov8n-seg.pt", "person_yolov8s-seg.pt", "person_yolov8m-seg.pt",
                           "person_yolo11n-seg.pt")


def _ad_model(model: str) -> dict:
    """ADetailer's model name -> imagesmith's detector: its own mediapipe names as they are, YOLO face/hand/person
    models onto mediapipe's face, hand and person models (written so in the infotext)."""
    if model in ("mediapipe_face_full", "mediapipe_face_short"):
        return {"kind": "face", "model": model}
    if model in ADETAILER_FACE_MODELS or "face" in model.lower():
        return {"kind": "face", "model": "mediapipe_face"}
    if model in ADETAILER_HAND_MODELS or "hand" in model.lower():
        return {"kind": "hand", "model": "mediapipe_hands"}
    if model in ADETAILER_PERSON_MODELS or "person" in model.lower():
        return {"kind": "person", "model": "mediapipe_person"}
    raise BadRequest(f"ADetailer model {model!r} is not available: imagesmith's detailer finds faces, hands and "
                     f"persons ({', '.join(ADETAILER_FACE_MODELS + ADETAILER_HAND_MODELS + ADETAILER_PERSON_MODELS)})")


def adetailer_unit(body: dict) -> dict | list[dict] | None:
    """The engine's `detailer` field from ADetailer's `alwayson_scripts` args (``[enabled, {ad_model, ...}, ...]``,
    webuiapi's shape), or None: one unit per enabled tab (up to 4), each with its detector, confidence, prompt,
    strength, mask blur, dilation, padding and steps."""
    args = always_on_args(body, "adetailer")
    if not isinstance(args, list) or not args:
        return None
    if isinstance(args[0], bool):  # ADetailer's first arg: enabled; then (skip img2img) flag in newer versions
        if not args[0]:
            return None
        args = args[1:]
        if args and isinstance(args[0], bool):
            args = args[1:]
    units = [a for a in args if isinstance(a, dict) and a.get("ad_model") not in (None, "", "None")
             and a.get("ad_tab_enable", True)]
    if not units:
        return None
    if len(units) > 4:
        raise BadRequest(f"imagesmith runs up to 4 ADetailer units per request; {len(units)} are enabled")
    out = []
    for u in units:
        unit = {**_ad_model(str(u["ad_model"])), "strength": u.get("ad_denoising_strength", 0.4),
                "prompt": u.get("ad_prompt", ""), "negative_prompt": u.get("ad_negative_prompt", ""),
                "mask_blur": u.get("ad_mask_blur", 4), "dilate": int(u.get("ad_dilate_erode", 4) or 0),
                "confidence": u.get("ad_confidence", 0.3), "prompt_mode": "replace",  # ADetailer's: [PROMPT], [SEP]
                "padding_pixels": int(u.get("ad_inpaint_only_masked_padding", 32) or 0)}
        if u.get("ad_use_steps"):
            unit["steps"] = u.get("ad_steps")
        if u.get("ad_use_inpaint_width_height"):
            unit["size"] = max(int(u.get("ad_inpaint_width", 512)), int(u.get("ad_inpaint_height", 512)))
        out.append(unit)
    return out[0] if len(out) == 1 else out


async def answer(svc: Services, job_type: str, req: dict, who: dict, body: dict) -> dict | JSONResponse:
    """Run a txt2img/img2img job and answer it A1111's way. Unless the call says ``save_images: true``, nothing
    of it is kept once answered (A1111's default: its API saves no image unless asked): not the output files,
    not the uploads made from its base64 images. A call past the sync timeout (504) leaves its job running,
    with everything it needs."""
    overrides = body.get("override_settings")
    if body.get("override_settings_restore_afterwards") is False and isinstance(overrides, dict) and overrides:
        # A1111 keeps a request's overrides as the settings afterwards when asked not to restore them
        check_a1111_options(overrides, svc.settings)
        svc.store.set_a1111_options(who["name"], overrides)
    job = await svc.run_sync(job_type, req, who)
    failed = isinstance(job, JSONResponse)
    keep = body.get("save_images") is True and not failed
    try:
        return job if failed else a1111_response(svc, job, body)
    finally:
        if not keep:
            svc.discard(None if failed else job, request_uploads(req))


def ultimate_upscale(svc: Services, body: dict, req: dict, init: dict) -> dict:
    """The "Ultimate SD upscale" img2img script (its ``script_args`` in its own order: info, tile_width,
    tile_height, mask_blur, padding, seams_fix_width, seams_fix_denoise, seams_fix_padding, upscaler_index,
    save_upscaled_image, redraw_mode, save_seams_fix_image, seams_fix_mask_blur, seams_fix_type, target_size_type,
    custom_width, custom_height, custom_scale) as imagesmith's upscale job with a tiled refine. The tiles are
    square (the larger side asked for); redraw modes Linear and Chess as the script's; its seams-fix passes are
    not run (the feathered tiles leave no seam to fix); redraw mode None upscales only."""
    args = body.get("script_args") or []
    if not isinstance(args, list):
        raise BadRequest("script_args must be a list (Ultimate SD upscale's arguments, in its order)")

    def arg(i: int, default, kind=int):
        try:
            return kind(args[i]) if len(args) > i and args[i] not in (None, "") else default
        except (TypeError, ValueError):
            raise BadRequest(f"script_args[{i}] must be a number, got {args[i]!r}") from None
    tile = max(arg(1, 512), arg(2, 0))
    mask_blur, padding = arg(3, 8), arg(4, 32)
    names = upscaler_names(svc)  # as /sdapi/v1/upscalers lists them
    index = arg(8, 0)
    if not 0 <= index < len(names):
        raise BadRequest(f"script_args[8] (upscaler_index) must be 0-{len(names) - 1}: {', '.join(names)}")
    kind = arg(14, 0)
    if kind == 1:
        target = arg(15, 2048)
    elif kind == 2:
        target = round(init["width"] * arg(17, 2.0, float))
    else:
        target = int(body.get("width") or 512)
    scale = target / init["width"]
    if not 1 < scale <= 8:
        raise BadRequest(f"Ultimate SD upscale: the target width {target} must be above the image's "
                         f"{init['width']} and at most 8 times it")
    out = {"image": req["init_image"], "scale": scale,
           "upscaler": "Lanczos" if names[index] == "None" else names[index]}
    if arg(10, 0) != 2:  # redraw mode None: upscale only
        out["refine"] = {"model": req.get("model"), "prompt": req.get("prompt", ""),
                         "negative_prompt": req.get("negative_prompt", ""),
                         "strength": req.get("denoising_strength", 0.75), "steps": req.get("steps", 20),
                         "sampler_name": req.get("sampler_name", "Euler a"),
                         "scheduler": req.get("scheduler", "automatic"), "cfg_scale": req.get("cfg_scale", 7.0),
                         "seed": req.get("seed", -1), "tile": min(max(tile, 64), 2048), "padding": padding,
                         "mask_blur": min(mask_blur, 2 * padding), "order": "chess" if arg(10, 0) == 1 else "linear"}
    return out


def request_uploads(req: dict) -> list[str]:
    """The upload ids in a request an A1111 route built (every one made by the route from a base64 image)."""
    ids = [req[k] for k in ("init_image", "mask", "image") if isinstance(req.get(k), str)]
    for key in ("controlnet", "ip_adapter"):
        units = req.get(key)
        for unit in units if isinstance(units, list) else [units] if isinstance(units, dict) else []:
            if isinstance(unit.get("image"), str):
                ids.append(unit["image"])
    return ids


def a1111_response(svc: Services, job: dict, body: dict) -> dict:
    files = (job.get("result") or {}).get("files", [])
    send = body.get("send_images", True) is not False  # A1111: send_images false answers without the images
    fmt = samples_format(svc, body, job.get("user"))
    images = [base64.b64encode(encode_sample(svc.output_bytes(f), fmt, f.get("infotext"))).decode()
              for f in files] if send else []
    overrides = body.get("override_settings") if isinstance(body.get("override_settings"), dict) else {}
    if send and not overrides.get("control_net_no_detectmap"):  # the extension appends its detected maps
        for m in (job.get("result") or {}).get("control_maps", []):
            try:
                images.append(base64.b64encode(svc.output_bytes(m)).decode())
            except NotFound:  # a map only another node kept: the pictures are the answer, the map an extra
                continue
    seeds = [f.get("seed") for f in files]
    req = job.get("request") or {}
    n = len(files)
    subseed = req.get("variation_seed") if req.get("variation_strength") else -1
    width, height = req.get("width"), req.get("height")
    if files and (width is None or height is None):  # the model's native size, from the job's own record
        width, height = files[0].get("width"), files[0].get("height")
    # A1111's info JSON (processing.Processed.js()): what clients read the seeds and infotexts from
    info = {"prompt": body.get("prompt", ""), "all_prompts": [req.get("prompt", "")] * n,  # styles applied
            "negative_prompt": body.get("negative_prompt", ""),
            "all_negative_prompts": [req.get("negative_prompt", "")] * n,
            "seed": seeds[0] if seeds else None, "all_seeds": seeds,
            "subseed": subseed, "all_subseeds": [subseed] * n,
            "subseed_strength": req.get("variation_strength", 0.0),
            "seed_resize_from_w": req.get("seed_resize_from_w", -1),
            "seed_resize_from_h": req.get("seed_resize_from_h", -1),
            "width": width, "height": height, "sampler_name": req.get("sampler_name"),
            "scheduler": req.get("scheduler"), "cfg_scale": req.get("cfg_scale"), "steps": req.get("steps"),
            "batch_size": req.get("batch_size", 1), "clip_skip": req.get("clip_skip", 1),
            "denoising_strength": req.get("denoising_strength") if req.get("init_image") else None,
            "restore_faces": bool(req.get("detailer")), "styles": body.get("styles") or [],
            "index_of_first_image": 0, "infotexts": [f.get("infotext") for f in files], "job_id": job["id"],
            "version": f"imagesmith {__version__}"}
    return {"images": images, "parameters": body, "info": json.dumps(info)}


SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")


def samples_format(svc: Services, body: dict, user: str | None) -> str:
    """A1111's ``samples_format`` (the format of the images it answers with): this request's override_settings,
    else the caller's saved option, else png."""
    overrides = body.get("override_settings") if isinstance(body.get("override_settings"), dict) else {}
    fmt = overrides.get("samples_format")
    if fmt is None and user:
        fmt = svc.store.a1111_options(user).get("samples_format")
    fmt = str(fmt or "png").lower()
    if fmt not in SAMPLES_FORMATS:
        raise BadRequest(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, not {fmt!r}")
    return fmt


def encode_sample(png: bytes, fmt: str, infotext: str | None) -> bytes:
    """The saved PNG as A1111 answers it in ``fmt``: PNG unchanged (its text chunks hold the infotext); JPEG and
    WebP carry the infotext in EXIF UserComment ('UNICODE' + UTF-16BE, as A1111 writes it)."""
    if fmt == "png":
        return png
    import io

    from PIL import Image
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    exif = Image.Exif()
    if infotext:
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + infotext.encode("utf-16-be")
    out = io.BytesIO()
    rgb.save(out, "JPEG" if fmt in ("jpg", "jpeg") else "WEBP", quality=95, exif=exif.tobytes())
    return out.getvalue()


def check_a1111_options(options: dict, settings: Settings) -> None:
    """BadRequest for a picture-deciding option with a value imagesmith cannot use (before anything is saved)."""
    from ...models.house import make_registry
    if "sd_model_checkpoint" in options:
        make_registry(settings).get(str(options["sd_model_checkpoint"]), "checkpoint")  # must exist
    vae = options.get("sd_vae")
    if vae not in (None, "Automatic", "None"):
        make_registry(settings).get(str(vae), "vae")
    clip = options.get("CLIP_stop_at_last_layers")
    if clip is not None and (not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12):
        raise BadRequest("CLIP_stop_at_last_layers must be a whole number from 1 to 12")
    if options.get("samples_format") is not None and str(options["samples_format"]).lower() not in SAMPLES_FORMATS:
        raise BadRequest(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, not {options['samples_format']!r}")
    ensd = options.get("eta_noise_seed_delta")
    if ensd is not None and (not isinstance(ensd, int) or isinstance(ensd, bool) or ensd < 0):
        raise BadRequest("eta_noise_seed_delta must be a whole number >= 0")
    source = options.get("randn_source")
    if source is not None and str(source).upper() not in ("CPU", "GPU"):
        raise BadRequest(f"randn_source {source!r}: imagesmith draws A1111's CPU or GPU noise (NV is not emulated)")
    if len(json.dumps(options, default=str)) > 65536:
        raise BadRequest("options: at most 64 KB of JSON")


def default_checkpoint_name(settings: Settings) -> str | None:
    """The checkpoint a job without a model runs on, as A1111's options name it from the start."""
    try:
        from ...models.house import make_registry
        return make_registry(settings).default_checkpoint().name
    except Exception:  # no checkpoint yet: the engine builds the house placeholder on first need
        return None
