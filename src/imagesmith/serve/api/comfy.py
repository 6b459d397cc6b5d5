"""ComfyUI's server API on imagesmith's queue: ``/prompt``, ``/queue``, ``/history``, ``/view``, uploads,
``/object_info`` and the ``/ws`` WebSocket, at the root (what clients call) and again under ``/api`` (what the
frontend calls).

Every prompt is a durable ``comfy`` job: it survives restarts and a killed worker, auth applies as on every route
(clients that cannot send a header may put ``?token=`` on ``/ws`` and ``/view``), and a user sees only their own
prompts, history and files. The WebSocket's messages are made from the job's durable state (progress notes, the
result's executed and cached nodes and outputs), so they work whichever worker or machine ran the prompt."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response

from ... import __version__
from ...core.errors import BadRequest, NotFound
from ..store import FINISHED
from ..worker import comfy_dirs
from .context import Caller, Services, Svc

router = APIRouter(tags=["comfyui"])
COMFY_VERSION = "0.3.64"
"""the ComfyUI release whose API this follows (its /system_stats says so to clients that check)"""
MAX_PROMPT_BYTES = 8 * 1024 * 1024


def _routes(path: str, methods: list[str], *, on: APIRouter | None = None, schema: bool = True):
    """The same handler at ``path`` and ``/api`` + ``path`` (of `on`, default this module's router)."""
    def wrap(fn):
        target = on or router
        target.add_api_route(path, fn, methods=methods, include_in_schema=schema)
        target.add_api_route("/api" + path, fn, methods=methods, include_in_schema=False)
        return fn
    return wrap


def _lists(svc: Services, user: str) -> dict:
    from ...engine.graph.nodes import input_files, output_choices
    dirs = comfy_dirs(svc.settings, user)
    return {**svc.model_lists(), "input": input_files(dirs["input"]), "output": output_choices(dirs["output"])}


def _executor(svc: Services, user: str):
    from ...engine.graph.executor import GraphExecutor
    from ...engine.graph.nodes import NODES
    return GraphExecutor(NODES, lambda: _lists(svc, user))


async def _raw_json(request: Request, *, form: tuple[str, ...] | None = None) -> dict:
    """The body as JSON whatever its Content-Type (ComfyUI's own example scripts post urllib's form encoding).

    ``form`` (the list-valued fields, maybe none): a command that may also come as a real form (comfy-catapult posts
    ``/queue`` and ``/free`` as ``delete=ID&clear=False``, which ComfyUI itself answers with a 500)."""
    body = await request.body()
    if len(body) > MAX_PROMPT_BYTES:
        raise BadRequest(f"the body is {len(body)} bytes; the limit is {MAX_PROMPT_BYTES}")
    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")
    try:
        data = json.loads(body or b"{}", parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        kind = request.headers.get("content-type", "")
        if form is not None and kind.startswith("application/x-www-form-urlencoded"):
            return _form_fields(body, form)
        raise BadRequest("the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _form_fields(body: bytes, lists: tuple[str, ...]) -> dict:
    import urllib.parse
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                                       max_num_fields=1000)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is neither JSON nor a form") from None
    def value(v: str):
        return {"true": True, "false": False}.get(v.lower(), v)
    return {k: [value(x) for x in v] if k in lists else value(v[-1]) for k, v in fields.items()}


def _comfy_jobs(svc: Services, user: str | None, status: str | None = None, limit: int = 500) -> list[dict]:
    return svc.store.list(user=user, status=status, limit=limit, job_type="comfy")[0]


def _entry(job: dict) -> list:
    """ComfyUI's 5-element queue entry: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
    r = job["request"]
    return [r.get("number", 0), job["id"], r.get("prompt", {}), r.get("extra_data", {}), r.get("outputs", [])]


def _ids(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 1000:
        raise BadRequest(f"{key} must be a list of prompt ids")
    return value


def _scope(who: dict) -> str:
    return who["name"]  # ComfyUI shows a user their own prompts, even an admin (the native API shows everyone's)


# ------------------------------------------------------------------------------------------------ prompts

@_routes("/prompt", ["POST"])
async def post_prompt(request: Request, svc: Svc, who: Caller):
    from ...engine.graph.executor import GraphError
    body = await _raw_json(request)
    prompt = body.get("prompt")
    try:
        checked = _executor(svc, who["name"]).validate(prompt)
    except GraphError as exc:
        return JSONResponse(exc.payload, status_code=400)
    client_id = body.get("client_id")
    number = body.get("number")
    total = svc.store.list(user=who["name"], limit=1)[1]
    request_body = {"prompt": prompt, "client_id": str(client_id)[:200] if client_id else None,
                    "extra_data": body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {},
                    "outputs": checked.outputs,
                    "number": int(number) if isinstance(number, (int, float)) and not isinstance(number, bool)
                    else total}
    priority = 10 if body.get("front") else 0  # "front": ahead of the caller's other queued prompts
    job = svc.submit("comfy", request_body, who, priority=priority)
    return {"prompt_id": job["id"], "number": request_body["number"], "node_errors": checked.node_errors}


@_routes("/prompt", ["GET"])
def get_prompt(svc: Svc, who: Caller):
    return {"exec_info": {"queue_remaining": _remaining(svc, who["name"])}}


def _remaining(svc: Services, user: str) -> int:
    return len(_comfy_jobs(svc, user, "queued")) + len(_comfy_jobs(svc, user, "running"))


@_routes("/queue", ["GET"])
def get_queue(svc: Svc, who: Caller):
    user = _scope(who)
    return {"queue_running": [_entry(j) for j in _comfy_jobs(svc, user, "running")],
            "queue_pending": [_entry(j) for j in sorted(_comfy_jobs(svc, user, "queued"),
                                                       key=lambda j: (-j["priority"], j["created_at"]))]}


@_routes("/queue", ["POST"])
async def post_queue(request: Request, svc: Svc, who: Caller):
    body = await _raw_json(request, form=("delete",))
    user = _scope(who)
    if body.get("clear"):
        for job in _comfy_jobs(svc, user, "queued"):
            svc.store.cancel(job["id"], user=user)
    for prompt_id in _ids(body, "delete"):
        try:
            job = svc.store.get(prompt_id, user=user)
            if job["status"] == "queued" and job["type"] == "comfy":
                svc.store.cancel(job["id"], user=user)
        except NotFound:
            continue
    return {}


@_routes("/interrupt", ["POST"])
async def interrupt(request: Request, svc: Svc, who: Caller):
    body = await _raw_json(request, form=())
    user = _scope(who)
    wanted = body.get("prompt_id")
    for job in _comfy_jobs(svc, user, "running"):
        if wanted in (None, job["id"]):
            svc.store.cancel(job["id"], user=user)
    return {}


@_routes("/free", ["POST"])
async def free(request: Request, svc: Svc, who: Caller):
    """``unload_models``: every worker drops its models between jobs (admins, as A1111's unload-checkpoint)."""
    body = await _raw_json(request, form=())
    if body.get("unload_models") and who["role"] == "admin":
        svc.store.set_checkpoint_state("unloaded", by=who["name"])
    return {}


# ------------------------------------------------------------------------------------------------ history

def _history_entry(job: dict) -> dict:
    result = job.get("result") or {}
    ok = job["status"] == "succeeded"
    created = int(job["created_at"] * 1000)
    messages = [["execution_start", {"prompt_id": job["id"], "timestamp": created}]]
    if ok:
        messages += [["execution_cached", {"nodes": result.get("cached", []), "prompt_id": job["id"],
                                           "timestamp": created}],
                     ["execution_success", {"prompt_id": job["id"],
                                            "timestamp": int((job["finished_at"] or time.time()) * 1000)}]]
    elif job["status"] == "failed":
        messages.append(["execution_error", _execution_error(job)])
    else:
        messages.append(["execution_interrupted", {"prompt_id": job["id"], "node_id": "", "node_type": "",
                                                   "executed": []}])
    return {"prompt": _entry(job), "outputs": result.get("outputs", {}),
            "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": messages},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                     for node in result.get("outputs", {})}}


@_routes("/history", ["GET"])
def get_history(svc: Svc, who: Caller, max_items: str | None = None):
    if max_items is not None:
        try:
            max_items = int(max_items)
        except ValueError:
            raise BadRequest("max_items must be a whole number") from None
    done = [j for j in _comfy_jobs(svc, _scope(who)) if j["status"] in FINISHED]
    done.sort(key=lambda j: j["created_at"])
    if max_items is not None and max_items >= 0:
        done = done[-max_items:] if max_items else []
    return {j["id"]: _history_entry(j) for j in done}


@_routes("/history/{prompt_id}", ["GET"])
def get_history_one(prompt_id: str, svc: Svc, who: Caller):
    """A finished prompt's entry; ``{}`` while it is queued or running (what clients poll for); 404 for an id
    the caller never submitted (ComfyUI answers ``{}`` to anything)."""
    job = svc.store.get(prompt_id, user=_scope(who))
    if job["type"] != "comfy":
        raise NotFound(f"no prompt {prompt_id}")
    return {job["id"]: _history_entry(job)} if job["status"] in FINISHED else {}


@_routes("/history", ["POST"])
async def post_history(request: Request, svc: Svc, who: Caller):
    body = await _raw_json(request, form=("delete",))
    user = _scope(who)
    doomed = []
    if body.get("clear"):
        doomed = [j["id"] for j in _comfy_jobs(svc, user) if j["status"] in FINISHED]
    for prompt_id in _ids(body, "delete"):
        try:
            job = svc.store.get(prompt_id, user=user)
            if job["type"] == "comfy" and job["status"] in FINISHED:
                doomed.append(job["id"])
        except NotFound:
            continue
    svc.store.delete_finished(doomed)  # the history entries; the images stay in the output folder, as ComfyUI
    return {}


# ------------------------------------------------------------------------------------------------ jobs

JOB_STATUS = {"queued": "pending", "running": "in_progress", "succeeded": "completed", "failed": "failed",
              "canceled": "cancelled"}
"""imagesmith's job states as ComfyUI's ``/api/jobs`` names them (newer frontends read their queue and history
from there)"""
_STATUS_OF = {v: k for k, v in JOB_STATUS.items()}


def _failed_node(job: dict) -> str:
    note = job.get("progress_note") or ""
    return note.split()[1] if note.startswith("comfy ") and len(note.split()) > 1 else ""


def _execution_error(job: dict) -> dict:
    node = _failed_node(job)
    return {"prompt_id": job["id"], "timestamp": int((job["finished_at"] or job["created_at"]) * 1000),
            "node_id": node, "node_type": (job["request"].get("prompt", {}).get(node) or {}).get("class_type", ""),
            "executed": (job.get("result") or {}).get("executed", []), "exception_message": job.get("error") or "",
            "exception_type": "Exception", "traceback": [], "current_inputs": {}, "current_outputs": {}}


def _job_view(job: dict, *, full: bool = False) -> dict:
    """One prompt as ComfyUI's ``/api/jobs`` shows it; ``full`` adds outputs, status messages and the workflow."""
    r = job["request"]
    extra = r.get("extra_data") or {}
    outputs = (job.get("result") or {}).get("outputs", {})
    view = {"id": job["id"], "status": JOB_STATUS[job["status"]], "priority": r.get("number", 0),
            "create_time": int(job["created_at"] * 1000), "outputs_count": 0}
    if job.get("started_at"):
        view["execution_start_time"] = int(job["started_at"] * 1000)
    if job["status"] in FINISHED and job.get("finished_at"):
        view["execution_end_time"] = int(job["finished_at"] * 1000)
    if job["status"] == "failed":
        view["execution_error"] = _execution_error(job)
    preview = None
    for node, ui in outputs.items():
        for media, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                view["outputs_count"] += 1
                if preview is None and media in ("images", "video", "audio") and isinstance(item, dict):
                    preview = {**item, "nodeId": node, "mediaType": media}
    if preview is not None:
        view["preview_output"] = preview
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow")
    if isinstance(workflow, dict) and isinstance(workflow.get("id"), str):
        view["workflow_id"] = workflow["id"]
    if full:
        view["update_time"] = int((job.get("finished_at") or job.get("started_at") or job["created_at"]) * 1000)
        view["workflow"] = {"prompt": r.get("prompt", {}), "extra_data": extra}
        if job["status"] in FINISHED:
            view["outputs"] = outputs
            view["execution_status"] = _history_entry(job)["status"]
    return view


def _whole(name: str, value: str | None, default: int | None, low: int, high: int) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be from {low} to {high}")
    return number


@_routes("/jobs", ["GET"])
def get_jobs(svc: Svc, who: Caller, status: str | None = None, workflow_id: str | None = None,
             sort_by: str = "created_at", sort_order: str = "desc", limit: str | None = None,
             offset: str | None = None):
    """The caller's prompts in every state, one shape for queue and history: ``status`` (comma-separated
    ``pending,in_progress,completed,failed,cancelled``), ``workflow_id``, ``sort_by`` (``created_at`` or
    ``execution_duration``), ``sort_order``, ``limit``, ``offset`` -> ``{jobs, pagination}``."""
    wanted = [s.strip() for s in (status or "").split(",") if s.strip()] or list(_STATUS_OF)
    unknown = [s for s in wanted if s not in _STATUS_OF]
    if unknown:
        raise BadRequest(f"unknown status {unknown[0]!r}; known: {', '.join(_STATUS_OF)}")
    if sort_by not in ("created_at", "execution_duration"):
        raise BadRequest("sort_by must be created_at or execution_duration")
    if sort_order not in ("asc", "desc"):
        raise BadRequest("sort_order must be asc or desc")
    limit_n = _whole("limit", limit, None, 1, 100_000)
    offset_n = _whole("offset", offset, 0, 0, 10 ** 9)
    user = _scope(who)
    jobs, total = [], 0
    # newest first straight from the store when that is the order asked for; otherwise every match, then sorted
    window = offset_n + limit_n if limit_n and sort_by == "created_at" and sort_order == "desc" \
        and not workflow_id else 10 ** 6
    for state in dict.fromkeys(_STATUS_OF[s] for s in wanted):
        rows, count = svc.store.list(user=user, status=state, limit=window, job_type="comfy")
        jobs += [_job_view(j) for j in rows]
        total += count
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
        total = len(jobs)
    if sort_by == "execution_duration":
        def key(j):
            return (j.get("execution_end_time", 0) - j.get("execution_start_time", 0)
                    if j.get("execution_end_time") and j.get("execution_start_time") else 0)
    else:
        def key(j):
            return j["create_time"]
    jobs.sort(key=key, reverse=sort_order == "desc")
    page = jobs[offset_n:offset_n + limit_n if limit_n else None]
    return {"jobs": page, "pagination": {"offset": offset_n, "limit": limit_n if limit_n else len(page),
                                         "total": total, "has_more": offset_n + len(page) < total}}


@_routes("/jobs/{job_id}", ["GET"])
def get_job(job_id: str, svc: Svc, who: Caller):
    """One prompt with its outputs, status messages and workflow; 404 for one the caller does not have."""
    job = svc.store.get(job_id, user=_scope(who))
    if job["type"] != "comfy":
        raise NotFound(f"no prompt {job_id}")
    return _job_view(job, full=True)


# ------------------------------------------------------------------------------------------------ files

@_routes("/view", ["GET"])
def view(svc: Svc, who: Caller, filename: str | None = None, type: str = "output", subfolder: str = "",
         preview: str | None = None, channel: str | None = None):
    from ...engine.graph.nodes import safe_name, safe_subfolder
    if not filename:
        raise BadRequest("give ?filename=")
    if type not in ("output", "input", "temp"):
        raise BadRequest("type must be output, input or temp")
    folder = comfy_dirs(svc.settings, who["name"])[type]
    path = folder.joinpath(*safe_subfolder(subfolder), safe_name(filename, "filename"))
    if not path.is_file():
        raise NotFound(f"no {type} file {filename!r}")
    headers = {"Content-Disposition": f'filename="{path.name}"'}
    if preview or channel in ("rgb", "a"):
        return Response(content=_view_variant(svc, path, preview, channel or ""), headers=headers,
                        media_type=_variant_type(preview, channel or ""))
    media = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
    return FileResponse(path, media_type=media.get(path.suffix.lower(), "application/octet-stream"), headers=headers)


def _variant_type(preview: str | None, channel: str) -> str:
    if preview:
        fmt = preview.split(";")[0]
        return f"image/{fmt if fmt in ('webp', 'jpeg') and 'a' not in channel else 'webp'}"
    return "image/png"


def _view_variant(svc: Services, path: Path, preview: str | None, channel: str) -> bytes:
    """ComfyUI's /view options: ``preview=webp;90`` (or jpeg) re-encodes for a light preview (webp whenever the
    alpha channel is asked for); ``channel=rgb`` drops the alpha, ``channel=a`` keeps only it."""
    import io

    from ...core.imageio import load_image
    image = load_image(path, settings=svc.settings, mode=None, what="image")
    out = io.BytesIO()
    if preview:
        parts = preview.split(";")
        fmt = _variant_type(preview, channel).split("/")[1]
        quality = int(parts[-1]) if parts[-1].isdigit() and 1 <= int(parts[-1]) <= 100 else 90
        if fmt == "jpeg" or channel == "rgb" or image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGB")
        image.save(out, format=fmt.upper(), quality=quality)
        return out.getvalue()
    if channel == "rgb":
        image.convert("RGB").save(out, format="PNG")
    else:
        from PIL import Image
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        only = Image.new("RGBA", image.size)
        only.putalpha(alpha)
        only.save(out, format="PNG")
    return out.getvalue()


async def _upload(request: Request, svc: Services, who: dict, *, mask: bool) -> dict:
    from ...core.imageio import load_image, save_png_atomic
    from ...engine.graph.nodes import input_path, safe_name, safe_subfolder
    from .context import MAX_UPLOAD_BYTES
    try:
        form = await request.form()
    except Exception:  # noqa: BLE001 - starlette's parser errors: the client's malformed body
        raise BadRequest("the body is not multipart form data with an 'image' file") from None
    upload = form.get("image")
    if upload is None or not hasattr(upload, "read"):
        raise BadRequest("give the image as the multipart field 'image'")
    data = await upload.read()
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    kind = str(form.get("type") or "input")
    if kind not in ("input", "temp", "output"):
        raise BadRequest("type must be input, temp or output")
    sub = safe_subfolder(str(form.get("subfolder") or ""))
    name = safe_name(Path(upload.filename or "image.png").name, "filename")
    image = load_image(data, settings=svc.settings, mode=None, what="upload")
    dirs = comfy_dirs(svc.settings, who["name"])
    folder = dirs[kind].joinpath(*sub)
    if mask:  # the mask's alpha goes into the original image (ComfyUI's mask editor)
        try:
            ref = json.loads(str(form.get("original_ref") or "{}"))
        except ValueError:
            raise BadRequest("original_ref must be JSON") from None
        original = input_path(dirs[ref.get("type", "input") if ref.get("type") in dirs else "input"],
                              "/".join([*safe_subfolder(str(ref.get("subfolder") or "")),
                                        safe_name(str(ref.get("filename", "")), "original_ref.filename")]))
        base = load_image(original, settings=svc.settings, mode="RGBA", what="original image")
        alpha = image.convert("RGBA").getchannel("A").resize(base.size)
        base.putalpha(alpha)
        image = base
    stem, suffix = Path(name).stem, ".png"
    name = stem + suffix
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    n = 1
    while (folder / name).exists() and not overwrite:
        name = f"{stem} ({n}){suffix}"
        n += 1
    save_png_atomic(image, folder / name)
    return {"name": name, "subfolder": "/".join(sub), "type": kind}


@_routes("/upload/image", ["POST"])
async def upload_image(request: Request, svc: Svc, who: Caller):
    return await _upload(request, svc, who, mask=False)


@_routes("/upload/mask", ["POST"])
async def upload_mask(request: Request, svc: Svc, who: Caller):
    return await _upload(request, svc, who, mask=True)


# ------------------------------------------------------------------------------------------------ listings

@_routes("/object_info", ["GET"])
def get_object_info(svc: Svc, who: Caller):
    from ...engine.graph.nodes import object_info
    return object_info(_lists(svc, who["name"]))


@_routes("/object_info/{node_class}", ["GET"])
def get_object_info_one(node_class: str, svc: Svc, who: Caller):
    """One node's schema; an unknown class is a 404 (ComfyUI answers ``{}``)."""
    from ...engine.graph.nodes import NODES, object_info
    if node_class not in NODES:
        raise NotFound(f"no node class {node_class!r}")
    return object_info(_lists(svc, who["name"]), node_class)


@_routes("/embeddings", ["GET"])
def embeddings(svc: Svc, who: Caller):
    return [Path(n).stem for n in _lists(svc, who["name"])["embeddings"]]


FOLDERS = {"checkpoints": "checkpoints", "loras": "loras", "vae": "vae", "controlnet": "controlnet",
           "embeddings": "embeddings", "upscale_models": "upscale_models"}


@_routes("/models", ["GET"])
def models(who: Caller):
    return list(FOLDERS)


@_routes("/models/{folder}", ["GET"])
def models_in(folder: str, svc: Svc, who: Caller):
    if folder not in FOLDERS:
        raise NotFound(f"no model folder {folder!r}; folders: {', '.join(FOLDERS)}")
    return _lists(svc, who["name"])[FOLDERS[folder]]


@_routes("/extensions", ["GET"])
def extensions(who: Caller):
    return []


@_routes("/features", ["GET"])
def features(who: Caller):
    from .context import MAX_UPLOAD_BYTES
    return {"supports_preview_metadata": False, "max_upload_size": MAX_UPLOAD_BYTES}


@_routes("/system_stats", ["GET"])
def system_stats(who: Caller):
    import torch
    ram_total = ram_free = 0
    try:
        size = os.sysconf("SC_PAGE_SIZE")
        ram_total = os.sysconf("SC_PHYS_PAGES") * size
        ram_free = os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError, AttributeError):
        pass
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free_b, total_b = torch.cuda.mem_get_info(i)
            devices.append({"name": torch.cuda.get_device_name(i), "type": "cuda", "index": i, "vram_total": total_b,
                            "vram_free": free_b, "torch_vram_total": total_b, "torch_vram_free": free_b})
    else:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                        "torch_vram_total": 0, "torch_vram_free": 0})
    return {"system": {"os": platform.system().lower(), "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": COMFY_VERSION, "imagesmith_version": __version__,
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": ["imagesmith", "serve"]}, "devices": devices}


# ------------------------------------------------------------------------------------------------ WebSocket

async def _socket(websocket: WebSocket, svc: Services, who: dict) -> None:
    # no clientId: a new session id, which the frontend keeps (window.name) and sends with its prompts
    client_id = websocket.query_params.get("clientId") or websocket.query_params.get("clientid") or uuid.uuid4().hex
    await websocket.accept()
    user = who["name"]

    async def status() -> int:
        remaining = _remaining(svc, user)
        await websocket.send_json({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": remaining}}, "sid": client_id}})
        return remaining
    last_remaining = await status()
    await websocket.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": False}})
    seen: dict[str, dict] = {}  # prompt_id -> what was sent: started, node, step
    since = time.time() - 1.0
    tick = 0
    try:
        while True:
            for job in reversed(_comfy_jobs(svc, user, limit=100)):
                if (job["request"].get("client_id") or "") != client_id or job["created_at"] < since - 3600:
                    continue
                mine = seen.setdefault(job["id"], {"done": job["status"] in FINISHED and
                                                   (job["finished_at"] or 0) < since})
                if mine.get("done"):
                    continue
                await _job_messages(websocket, job, mine)
            tick += 1
            if tick % 5 == 0:  # the queue count twice a second; the prompts' own messages every tick
                remaining = _remaining(svc, user)
                if remaining != last_remaining:
                    last_remaining = await status()
            await asyncio.sleep(0.1)
    except (WebSocketDisconnect, RuntimeError):
        return


async def _job_messages(ws: WebSocket, job: dict, mine: dict) -> None:
    pid = job["id"]
    now = int(time.time() * 1000)
    if job["status"] == "queued":
        return
    if not mine.get("started"):
        mine["started"] = True
        await ws.send_json({"type": "execution_start", "data": {"prompt_id": pid, "timestamp": now}})
    note = job.get("progress_note") or ""
    if job["status"] == "running" and note.startswith("comfy "):
        parts = note.split()
        node = parts[1]
        if mine.get("node") != node:
            if mine.get("node"):
                mine.setdefault("finished", []).append(mine["node"])
            mine["node"], mine["step"] = node, None
            await ws.send_json({"type": "executing", "data": {"node": node, "display_node": node, "prompt_id": pid}})
            await _progress_state(ws, pid, mine, node, 0, 1)
        if len(parts) > 2 and mine.get("step") != parts[2]:
            mine["step"] = parts[2]
            value, total = (int(x) for x in parts[2].split("/"))
            await ws.send_json({"type": "progress", "data": {"value": value, "max": total, "prompt_id": pid,
                                                             "node": node}})
            await _progress_state(ws, pid, mine, node, value, total)
        return
    if job["status"] not in FINISHED:
        return
    mine["done"] = True
    result = job.get("result") or {}
    if job["status"] == "succeeded":
        await ws.send_json({"type": "execution_cached", "data": {"nodes": result.get("cached", []),
                                                                 "prompt_id": pid, "timestamp": now}})
        for node in result.get("executed", []):
            if node != mine.get("node"):
                await ws.send_json({"type": "executing", "data": {"node": node, "display_node": node,
                                                                  "prompt_id": pid}})
            if node in result.get("outputs", {}):
                await ws.send_json({"type": "executed", "data": {"node": node, "display_node": node,
                                                                 "output": result["outputs"][node],
                                                                 "prompt_id": pid}})
        for node, ui in result.get("outputs", {}).items():
            if node not in result.get("executed", []):  # cached output nodes: their result again
                await ws.send_json({"type": "executed", "data": {"node": node, "display_node": node, "output": ui,
                                                                 "prompt_id": pid}})
        await ws.send_json({"type": "execution_success", "data": {"prompt_id": pid, "timestamp": now}})
    elif job["status"] == "failed":
        await ws.send_json({"type": "execution_error", "data": {
            "prompt_id": pid, "node_id": mine.get("node", ""), "node_type": job["request"].get("prompt", {}).get(
                mine.get("node", ""), {}).get("class_type", ""), "executed": [], "exception_message": job["error"],
            "exception_type": "Exception", "traceback": [], "current_inputs": {}, "current_outputs": {},
            "timestamp": now}})
    else:
        await ws.send_json({"type": "execution_interrupted", "data": {
            "prompt_id": pid, "node_id": mine.get("node", ""), "node_type": "", "executed": [], "timestamp": now}})
    await ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": pid}})


async def _progress_state(ws: WebSocket, pid: str, mine: dict, node: str, value: int, total: int) -> None:
    """Newer frontends' per-node view of a prompt: the running node and the ones finished before it."""
    def entry(n: str, state: str, v: int, m: int) -> dict:
        return {"value": v, "max": m, "state": state, "node_id": n, "prompt_id": pid, "display_node_id": n,
                "parent_node_id": None, "real_node_id": n}
    nodes = {n: entry(n, "finished", 1, 1) for n in mine.get("finished", [])}
    nodes[node] = entry(node, "running", value, total)
    await ws.send_json({"type": "progress_state", "data": {"prompt_id": pid, "nodes": nodes}})


@router.websocket("/ws")
async def ws(websocket: WebSocket, svc: Svc, who: Caller):
    await _socket(websocket, svc, who)


@router.websocket("/api/ws")
async def api_ws(websocket: WebSocket, svc: Svc, who: Caller):
    await _socket(websocket, svc, who)
