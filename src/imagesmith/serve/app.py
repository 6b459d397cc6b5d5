"""The HTTP API: the native ``/v1`` job API (OpenAPI at ``/docs``) and the A1111-compatible ``/sdapi/v1`` routes,
both on the durable queue (:mod:`.store`), served by worker(s) (:mod:`.worker`).

Clients never name paths: images come in through ``POST /v1/uploads`` (or base64 in A1111 requests), are
checked (format, bytes, pixels) and stored under the home as their uploader's; requests refer to them by upload id,
and only their owner (or an admin) may use or read them (``GET /v1/files/{id}``, which also serves job outputs by
their ``file_id``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, File, Header, HTTPException, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from .. import __version__
from ..core.errors import BadRequest, Forbidden, ImagesmithError, NotFound, TooManyRequests, Unauthorized
from ..core.imageio import decode_base64
from ..core.settings import Settings
from .store import JobStore
from .jobs import JOB_TYPES, JOBS, openapi_body, validate_request
from .worker import PREVIEW_NAME, batch_key, job_folder

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUT_ID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(\d{1,5})$")  # job id-index
MEDIA_TYPES = {".png": "image/png", ".html": "text/html", ".zip": "application/zip", ".jpg": "image/jpeg",
               ".json": "application/json", ".pdf": "application/pdf"}
A1111_TXT2IMG = {"prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "scheduler", "seed", "subseed",
                 "subseed_strength", "batch_size", "n_iter", "width", "height", "enable_hr", "hr_scale",
                 "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "override_settings", "clip_skip",
                 "send_images", "save_images", "restore_faces", "tiling", "styles", "sampler_index"}


class JobIn(BaseModel):
    type: str = Field(..., description=", ".join(JOB_TYPES))
    request: dict[str, Any]
    priority: int = Field(0, ge=-100, le=100)
    callback_url: str | None = None


def map_inputs(request: dict, fn: Callable[[Any], Any]) -> dict:
    """``request`` with ``fn`` applied to each of its input images (upload ids, or the files they became)."""
    request = dict(request)
    for key in ("init_image", "mask", "image", "photo"):
        if request.get(key) is not None:
            request[key] = fn(request[key])
    for key in ("products", "images"):
        if isinstance(request.get(key), list):
            request[key] = [fn(x) for x in request[key]]
    if isinstance(request.get("controlnet"), dict) and request["controlnet"].get("image") is not None:
        request["controlnet"] = {**request["controlnet"], "image": fn(request["controlnet"]["image"])}
    if isinstance(request.get("base"), dict):  # a grid's base request
        request["base"] = map_inputs(request["base"], fn)
    return request


def export_queue_doc(store: JobStore, settings: Settings, *, user: str | None = None) -> dict:
    """``store.export_queue`` with each upload file the workers would read turned back into its upload id
    (what a client sends, and what ``POST /v1/queue/import`` resolves again)."""
    uploads = settings.home / "uploads"

    def upload_id_of(value):
        path = Path(value) if isinstance(value, str) else None
        if path is not None and path.parent == uploads and UPLOAD_ID.match(path.stem):
            return path.stem
        return value
    doc = store.export_queue(user=user)
    doc["jobs"] = [{**j, "request": map_inputs(j["request"], upload_id_of)} for j in doc["jobs"]]
    return doc


def default_store(settings: Settings) -> JobStore:
    settings.ensure_home()
    url = os.environ.get("IMAGESMITH_DATABASE_URL") or f"sqlite:///{settings.home / 'jobs.db'}"
    return JobStore(url)


class _RateLimiter:
    """Per-user token bucket: ``rate`` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, user: str) -> None:
        now = time.monotonic()
        level, last = self.buckets.get(user, (self.capacity, now))
        level = min(self.capacity, level + (now - last) * self.rate)
        if level < 1.0:
            raise TooManyRequests(f"rate limit: {int(self.capacity)} requests a minute for {user!r}")
        self.buckets[user] = (level - 1.0, now)


def create_app(settings: Settings | None = None, store: JobStore | None = None, *, sync_timeout: float = 600.0,
               require_auth: bool | None = None, rate_per_minute: int = 600, safety=None) -> FastAPI:
    """``require_auth``: every route but the health checks needs ``Authorization: Bearer <token>`` (default:
    ``IMAGESMITH_AUTH=1``; ``imagesmith serve`` turns it on for any non-loopback address)."""
    settings = settings or Settings.from_env()
    if require_auth is None:
        require_auth = os.environ.get("IMAGESMITH_AUTH", "") in ("1", "true", "yes")
    limiter = _RateLimiter(rate_per_minute)
    if safety is None and os.environ.get("IMAGESMITH_SAFETY", "1") not in ("0", "false", "no"):
        from ..vision.safety import SafetyGate
        safety = SafetyGate()  # prompts are checked at submit; the workers check the images
    settings.ensure_home()
    store = store or default_store(settings)
    app = FastAPI(title="imagesmith", version=__version__,
                  description="Native job API (/v1) and A1111-compatible API (/sdapi/v1) on one durable queue.")
    app.state.settings, app.state.store = settings, store
    default_options: dict[str, Any] = {"sd_model_checkpoint": _default_checkpoint_name(settings)}

    def caller(request: Request) -> dict:
        header = request.headers.get("authorization", "")
        who = None
        if header.lower().startswith("bearer "):
            who = store.user_for_token(header[7:].strip())
            if who is None:
                raise Unauthorized("invalid or revoked token")
        elif header.lower().startswith("basic "):  # A1111's --api-auth: the user's name, a token as the password
            who = _basic_auth_user(store, header[6:].strip())
        elif require_auth:
            raise Unauthorized("this server needs 'Authorization: Bearer <token>' or HTTP Basic with a token as the "
                               "password (imagesmith tokens create USER)")
        who = who or {"name": "local", "role": "admin"}
        limiter.take(who["name"])
        return who

    def user_of(request: Request) -> str:
        return caller(request)["name"]

    from .a1111_controlnet import controlnet_router, controlnet_unit
    from .a1111_lists import a1111_lists_router
    app.include_router(a1111_lists_router(settings, lambda request: caller(request)))
    app.include_router(controlnet_router(settings, lambda request: caller(request), lambda r: json_object(r)))

    def scope_of(request: Request) -> str | None:
        """Whose jobs a request may see: its user's, or everyone's for an admin."""
        who = caller(request)
        return None if who["role"] == "admin" else who["name"]

    @app.exception_handler(ImagesmithError)
    async def _user_error(_: Request, exc: ImagesmithError):
        return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        import logging
        logging.getLogger(__name__).exception("internal error")
        return JSONResponse({"error": {"code": "internal", "message": f"{type(exc).__name__}"}}, status_code=500)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return JSONResponse({"error": {"code": "bad_request", "message": f"{where}: {err['msg']}"}}, status_code=422)

    # ---------------------------------------------------------------- web studio
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    static = Path(__file__).resolve().parent / "static"
    app.mount("/studio", StaticFiles(directory=static), name="studio")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def studio_page():
        return (static / "index.html").read_text(encoding="utf-8")

    # ---------------------------------------------------------------- operations
    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        store.depth()
        return {"ok": True, "database": store.url.split(":", 1)[0]}

    @app.get("/metrics")
    def metrics(request: Request):
        caller(request)
        lines = ["# TYPE imagesmith_jobs gauge"]
        for status, n in sorted(store.depth().items()):
            lines.append(f'imagesmith_jobs{{status="{status}"}} {n}')
        from fastapi.responses import PlainTextResponse
        return PlainTextResponse("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- uploads and files
    def upload_path(upload_id: str, who: dict) -> Path:
        """The file of an upload ``who`` may use: their own, or any for an admin. Someone else's upload is
        "not found", as a missing one is (its existence is not told). An upload stored before uploads had owners
        (a file with no record) belongs to no one: only an admin may use it."""
        if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
            raise BadRequest(f"not an upload id: {upload_id!r}")
        admin = who["role"] == "admin"
        path = settings.home / "uploads" / f"{upload_id}.png"
        try:
            store.get_upload(upload_id, user=None if admin else who["name"])
        except NotFound:
            if not (admin and path.is_file()):
                raise
        if not path.is_file():
            raise NotFound(f"no upload {upload_id}")
        return path

    def store_upload(data: bytes, who: dict) -> dict:
        from ..core.imageio import load_image, save_png_atomic
        if len(data) > MAX_UPLOAD_BYTES:
            raise BadRequest(f"upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
        image = load_image(data, settings=settings, mode=None, what="upload")
        upload_id = uuid.uuid4().hex
        path = settings.home / "uploads" / f"{upload_id}.png"
        save_png_atomic(image, path)
        try:
            return store.add_upload(upload_id, user=who["name"], size=path.stat().st_size, width=image.width,
                                    height=image.height)
        except Exception:
            path.unlink(missing_ok=True)  # no owner recorded: no file either
            raise

    @app.post("/v1/uploads", status_code=201)
    async def upload(request: Request, file: UploadFile = File(...)):
        who = caller(request)
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        row = store_upload(data, who)
        return {"id": row["id"], "url": f"/v1/files/{row['id']}",
                **{k: row[k] for k in ("size", "width", "height", "created_at")}}

    def output_file(job: dict, index: int) -> FileResponse:
        files = (job.get("result") or {}).get("files", [])
        if not 0 <= index < len(files):
            raise NotFound(f"job {job['id']} has no file {index}")
        path = Path(files[index]["path"])  # a path the worker wrote, never the client's
        if not path.is_file():
            raise NotFound(f"job {job['id']} file {index} is gone")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=path.name if path.suffix == ".zip" else None)

    @app.get("/v1/files/{file_id:path}")  # any text, slashes too, reaches the id check (a 422, not a 404)
    def get_file(file_id: str, request: Request):
        """An upload's PNG, or a job's output by its ``file_id`` (``<job id>-<n>``): for its owner or an admin;
        anyone else gets 404, as for a file that does not exist."""
        who = caller(request)
        if UPLOAD_ID.match(file_id):
            return FileResponse(upload_path(file_id, who), media_type="image/png")
        found = OUTPUT_ID.match(file_id)
        if found:
            job = store.get(found[1], user=None if who["role"] == "admin" else who["name"])
            return output_file(job, int(found[2]))
        raise BadRequest(f"not a file id: {file_id!r} (an upload id or a job output's file_id)")

    def resolve_inputs(job_type: str, request: dict, who: dict) -> dict:
        """Upload ids in a request -> their files, each the caller's own (or any, for an admin)."""
        request = map_inputs(request, lambda x: str(upload_path(x, who)))
        if isinstance(request.get("captioner"), str) and not re.fullmatch(r"[\w.-]+", request["captioner"]):
            raise BadRequest("captioner: give the name of a folder under models/captioners, not a path")
        if isinstance(request.get("clip"), str) and not re.fullmatch(r"[\w.-]+", request["clip"]):
            raise BadRequest("clip: give the name of a registered CLIP (models list --kind clip), not a path")
        return request

    # ---------------------------------------------------------------- jobs
    def job_view(job: dict) -> dict:
        files = (job.get("result") or {}).get("files", [])
        out = {k: job[k] for k in ("id", "type", "status", "priority", "progress", "progress_note", "error",
                                   "attempts", "created_at", "started_at", "finished_at", "request")}
        out["files"] = [{"url": f"/v1/jobs/{job['id']}/files/{k}", "file_id": f"{job['id']}-{k}",
                         **{x: f[x] for x in ("seed", "width", "height", "infotext", "kind", "format", "product")
                            if x in f}}
                        for k, f in enumerate(files)]
        if (job.get("result") or {}).get("batch"):  # ran in one pipeline call with other jobs
            out["batch"] = job["result"]["batch"]
        if job["status"] == "running" and preview_path(job) is not None:
            out["preview_url"] = f"/v1/jobs/{job['id']}/preview"
        if getattr(JOBS.get(job["type"]), "answers", False) and job.get("result"):  # the answer, not only its files
            out["result"] = {k: v for k, v in job["result"].items() if k != "files"}
        return out

    def checked(job_type: str, request: dict, who: dict, callback_url: str | None) -> tuple[dict, str | None]:
        """(normalised request, model) of a job ``who`` may submit: valid, its uploads theirs, its prompt allowed."""
        if callback_url is not None:
            if not re.match(r"^https?://[^\s]+$", callback_url):
                raise BadRequest("callback_url must be an http(s) URL")
            from .webhooks import resolve_target
            resolve_target(callback_url)  # a loopback/private/link-local target is refused here, at submit
        normalised, model = validate_request(job_type, resolve_inputs(job_type, request, who), settings)
        if safety:
            text = " ".join(str(x) for x in (normalised.get("prompt"), (normalised.get("base") or {}).get("prompt"),
                                             normalised.get("concept"), normalised.get("headline")) if x)
            verdict = safety.check_prompt(text)
            if verdict.flagged:
                raise BadRequest(f"prompt blocked by the safety policy: {verdict.reason}")
        return normalised, model

    def submit(job_type: str, request: dict, who: dict, priority: int = 0, key: str | None = None,
               callback_url: str | None = None) -> dict:
        normalised, model = checked(job_type, request, who, callback_url)
        job, _ = store.submit(job_type, normalised, user=who["name"], priority=priority, idempotency_key=key,
                              model=model, callback_url=callback_url, batch_key=batch_key(job_type, normalised))
        return job

    # ---------------------------------------------------------------- the queue as a whole
    def admin(request: Request) -> dict:
        who = caller(request)
        if who["role"] != "admin":
            raise Forbidden("only an admin may pause, resume, requeue or import into the whole queue")
        return who

    @app.get("/v1/queue")
    def queue_state(request: Request):
        """Whether the queue is paused (who paused it, when, why) and how many jobs are in each state."""
        caller(request)
        return store.queue_state()

    @app.post("/v1/queue/pause")
    async def pause_queue(request: Request):
        """Admin: workers claim nothing until resumed; new jobs are still accepted and wait; running ones finish.
        Body (optional): ``{"reason": "..."}``."""
        who = admin(request)
        body = await json_object(request) if await request.body() else {}
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
            raise BadRequest("reason must be a string of at most 500 characters")
        return store.set_paused(True, by=who["name"], reason=reason)

    @app.post("/v1/queue/resume")
    def resume_queue(request: Request):
        return store.set_paused(False, by=admin(request)["name"])

    @app.post("/v1/queue/jobs/{job_id}/requeue")
    def requeue_job(job_id: str, request: Request):
        """Admin: a failed or canceled job (a poison job that lost its worker IMAGESMITH_MAX_ATTEMPTS times, say)
        back to the queue with its attempts reset. 404 for an unknown id, 409 for a job in another state."""
        admin(request)
        return store.requeue(job_id)

    @app.get("/v1/queue/export")
    def export_queue(request: Request):
        """The caller's unfinished jobs (an admin's: everyone's) as a document ``POST /v1/queue/import`` takes."""
        return export_queue_doc(store, settings, user=scope_of(request))

    @app.post("/v1/queue/import")
    async def import_queue(request: Request):
        """Submit an export's jobs again, each keeping its id, priority and place. A user's import makes every job
        theirs; an admin's keeps each job's owner. Every request is validated again (uploads must be here and
        the caller's; prompts pass the safety policy) before any job is submitted."""
        who = caller(request)
        body = await json_object(request)

        def prepare(job: dict) -> dict:
            callback = job.get("callback_url")
            normalised, model = checked(job["type"], job["request"], who, callback if callback else None)
            return {**job, "request": normalised, "model": model, "batch_key": batch_key(job["type"], normalised)}
        out = store.import_queue(body, user=None if who["role"] == "admin" else who["name"], prepare=prepare)
        return {"imported": len(out["imported"]), "existing": len(out["existing"]),
                "imported_ids": out["imported"], "existing_ids": out["existing"]}

    @app.post("/v1/jobs", status_code=202)
    def create_job(body: JobIn, request: Request, idempotency_key: str | None = Header(None)):
        job = submit(body.type, body.request, caller(request), body.priority, idempotency_key, body.callback_url)
        return {"job_id": job["id"], "status": job["status"]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, request: Request):
        return job_view(store.get(job_id, user=scope_of(request)))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        """Server-sent events: one ``progress`` event per change, then ``done`` with the final job."""
        from fastapi.responses import StreamingResponse
        scope = scope_of(request)
        store.get(job_id, user=scope)  # 404 before the stream starts

        async def stream():
            last = None
            while True:
                job = job_view(store.get(job_id, user=scope))
                state = (job["status"], job["progress"], job["progress_note"])
                if state != last:
                    last = state
                    kind = "done" if job["status"] in ("succeeded", "failed", "canceled") else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(job)}\n\n"
                    if kind == "done":
                        return
                await asyncio.sleep(0.1)
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.websocket("/v1/jobs/{job_id}/ws")
    async def job_socket(websocket: WebSocket, job_id: str):
        """The same progress as the SSE route, as JSON messages; the token may come as ?token= (browsers cannot
        set headers on a WebSocket)."""
        header = websocket.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else websocket.query_params.get("token")
        who = store.user_for_token(token) if token else None
        if (token and who is None) or (require_auth and who is None):
            await websocket.close(code=4401)
            return
        scope = None if who is None or who["role"] == "admin" else who["name"]
        try:
            store.get(job_id, user=scope)
        except NotFound:
            await websocket.close(code=4404)
            return
        await websocket.accept()
        last = None
        try:
            while True:
                job = job_view(store.get(job_id, user=scope))
                state = (job["status"], job["progress"], job["progress_note"])
                if state != last:
                    last = state
                    await websocket.send_json(job)
                    if job["status"] in ("succeeded", "failed", "canceled"):
                        break
                await asyncio.sleep(0.1)
            await websocket.close()
        except WebSocketDisconnect:
            pass

    def check_page(limit: int, offset: int) -> None:
        if not 1 <= limit <= 500 or offset < 0:
            raise BadRequest("limit must be 1..500 and offset >= 0")

    @app.get("/v1/jobs")
    def list_jobs(request: Request, status: str | None = None, limit: int = 50, offset: int = 0):
        check_page(limit, offset)
        jobs, total = store.list(user=scope_of(request), status=status, limit=limit, offset=offset)
        return {"jobs": [job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/uploads")
    def list_uploads(request: Request, limit: int = 50, offset: int = 0):
        """The caller's uploads, newest first (an admin sees everyone's, with their owners)."""
        check_page(limit, offset)
        rows, total = store.list_uploads(user=scope_of(request), limit=limit, offset=offset)
        return {"uploads": [{**r, "url": f"/v1/files/{r['id']}"} for r in rows], "total": total, "limit": limit,
                "offset": offset}

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, request: Request):
        return job_view(store.cancel(job_id, user=scope_of(request)))

    @app.get("/v1/jobs/{job_id}/files/{index}")
    def job_file(job_id: str, index: int, request: Request):
        return output_file(store.get(job_id, user=scope_of(request)), index)

    def preview_path(job: dict) -> Path | None:
        if job["status"] != "running":
            return None
        path = job_folder(settings, job) / PREVIEW_NAME
        return path if path.is_file() else None

    @app.get("/v1/jobs/{job_id}/preview")
    def job_preview(job_id: str, request: Request):
        """The running job's live preview (JPEG, approximate colours from the latents); 404 when there is none."""
        job = store.get(job_id, user=scope_of(request))
        path = preview_path(job)
        if path is None:
            raise NotFound(f"job {job_id} has no preview now ({job['status']})")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/v1/models")
    def models(request: Request):
        caller(request)
        from ..models.house import make_registry
        return {"models": [{"name": e.name, "kind": e.kind, "arch": e.arch} for e in make_registry(settings).list()]}

    # ---------------------------------------------------------------- A1111-compatible
    async def run_sync(job_type: str, request: dict, who: dict) -> dict:
        job = submit(job_type, request, who)
        end = time.monotonic() + sync_timeout
        while True:
            job = store.get(job["id"])
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            if time.monotonic() > end:
                raise HTTPException(504, "the job did not finish in time")
            await asyncio.sleep(0.05)
        if job["status"] != "succeeded":
            return JSONResponse({"error": "job " + job["status"], "detail": job["error"]}, status_code=422)
        return job

    def a1111_request(body: dict, who: dict) -> dict:
        req = {k: v for k, v in body.items() if k in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name",
                                                     "scheduler", "seed", "batch_size", "width", "height",
                                                     "denoising_strength", "clip_skip")}
        if "n_iter" in body:
            req["batch_count"] = body["n_iter"]
        if "subseed" in body and body.get("subseed_strength"):
            req["variation_seed"], req["variation_strength"] = body["subseed"], body["subseed_strength"]
        overrides = body.get("override_settings") or {}
        if not isinstance(overrides, dict):
            raise BadRequest("override_settings must be an object")
        # the caller's saved options (POST /sdapi/v1/options) under this request's own settings, as in A1111
        saved = {k: v for k, v in {**default_options, **store.a1111_options(who["name"])}.items()
                 if k in A1111_OPTIONS and not (k == "CLIP_stop_at_last_layers" and "clip_skip" in body)}
        overrides = {**saved, **overrides}
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
        if overrides.get("sd_vae") not in (None, "Automatic", "None"):
            req["vae"] = overrides["sd_vae"]
        unit = controlnet_unit(body, lambda data: store_upload(data, who)["id"])
        if unit is not None:
            req["controlnet"] = unit
        if body.get("restore_faces"):  # A1111's face restoration -> imagesmith's face detailer
            req["detailer"] = {"kind": "face"}
        if body.get("enable_hr"):
            req["hires"] = {k: body[k] for k in ("hr_scale", "hr_upscaler", "hr_second_pass_steps") if k in body}
            req["hires"]["hr_denoising_strength"] = body.get("denoising_strength", 0.7)
        return req

    def a1111_response(job: dict, body: dict) -> dict:
        files = (job.get("result") or {}).get("files", [])
        images = [base64.b64encode(Path(f["path"]).read_bytes()).decode() for f in files]
        seeds = [f.get("seed") for f in files]
        req = job.get("request") or {}
        n = len(files)
        subseed = req.get("variation_seed") if req.get("variation_strength") else -1
        width, height = req.get("width"), req.get("height")
        if files and (width is None or height is None):  # the model's native size: read it off the file
            from PIL import Image
            with Image.open(files[0]["path"]) as im:
                width, height = im.size
        # A1111's info JSON (processing.Processed.js()): what clients read the seeds and infotexts from
        info = {"prompt": body.get("prompt", ""), "all_prompts": [body.get("prompt", "")] * n,
                "negative_prompt": body.get("negative_prompt", ""),
                "all_negative_prompts": [body.get("negative_prompt", "")] * n,
                "seed": seeds[0] if seeds else None, "all_seeds": seeds,
                "subseed": subseed, "all_subseeds": [subseed] * n,
                "subseed_strength": req.get("variation_strength", 0.0),
                "width": width, "height": height, "sampler_name": req.get("sampler_name"),
                "scheduler": req.get("scheduler"), "cfg_scale": req.get("cfg_scale"), "steps": req.get("steps"),
                "batch_size": req.get("batch_size", 1), "clip_skip": req.get("clip_skip", 1),
                "denoising_strength": req.get("denoising_strength") if req.get("init_image") else None,
                "restore_faces": bool(req.get("detailer")), "styles": body.get("styles") or [],
                "index_of_first_image": 0, "infotexts": [f.get("infotext") for f in files], "job_id": job["id"],
                "version": f"imagesmith {__version__}"}
        return {"images": images, "parameters": body, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        body = await json_object(request)
        who = caller(request)
        job = await run_sync("generate", a1111_request(body, who), who)
        return job if isinstance(job, JSONResponse) else a1111_response(job, body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        body = await json_object(request)
        inits = body.get("init_images") or []
        if not inits:
            raise BadRequest("init_images: give one base64 image")
        who = caller(request)
        req = a1111_request(body, who)
        req["init_image"] = store_upload(decode_base64(inits[0]), who)["id"]
        job_type = "img2img"
        if body.get("mask"):
            req["mask"] = store_upload(decode_base64(body["mask"]), who)["id"]
            job_type = "inpaint"
            if "mask_blur" in body:
                req["mask_blur"] = body["mask_blur"]
        job = await run_sync(job_type, req, who)
        return job if isinstance(job, JSONResponse) else a1111_response(job, body)

    @app.get("/sdapi/v1/sd-models")
    def sd_models(request: Request):
        caller(request)
        from ..models.house import make_registry
        return [{"title": e.name, "model_name": e.name, "filename": str(e.path), "hash": None}
                for e in make_registry(settings).list("checkpoint")]

    @app.get("/sdapi/v1/loras")
    def loras(request: Request):
        caller(request)
        from ..models.house import make_registry
        return [{"name": e.name, "alias": e.name, "path": str(e.path)} for e in make_registry(settings).list("lora")]

    @app.get("/sdapi/v1/upscalers")
    def a1111_upscalers(request: Request):
        caller(request)
        from ..core.requests import UPSCALERS
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}] + [
            {"name": n, "model_name": n, "model_path": None, "model_url": None, "scale": 4 if "ESRGAN" in n else 2}
            for n in UPSCALERS if n != "Latent"]

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        """A1111's PNG Info: the infotext and its fields, read from the file's chunks (pixels not decoded)."""
        caller(request)
        from ..core.metadata import read_png_metadata
        body = await json_object(request)
        if not isinstance(body.get("image"), str) or not body["image"]:
            raise BadRequest("image: give a base64 image")
        meta = read_png_metadata(decode_base64(body["image"]), settings=settings)
        return {"info": meta.get("parameters") or "", "items": {k: v for k, v in (meta.get("parsed") or {}).items()},
                "parameters": meta.get("parsed") or {}, "imagesmith": meta.get("imagesmith")}

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(request: Request):
        """A1111's Extras upscaling: through the queue as an ``upscale`` job."""
        body = await json_object(request)
        if not isinstance(body.get("image"), str) or not body["image"]:
            raise BadRequest("image: give a base64 image")
        upscaler = body.get("upscaler_1") or "R-ESRGAN 4x+"
        if upscaler in ("None", None):
            raise BadRequest("upscaler_1: choose an upscaler (GET /sdapi/v1/upscalers)")
        who = caller(request)
        req = {"image": store_upload(decode_base64(body["image"]), who)["id"], "scale": body.get("upscaling_resize", 2),
               "upscaler": upscaler}
        job = await run_sync("upscale", req, who)
        if isinstance(job, JSONResponse):
            return job
        path = Path(job["result"]["files"][0]["path"])
        return {"html_info": "", "image": base64.b64encode(path.read_bytes()).decode()}

    @app.get("/sdapi/v1/samplers")
    def samplers(request: Request):
        caller(request)
        from ..core.sampling_names import SAMPLER_NAMES
        # A1111's shape; ComfyUI's name is an alias, so a client may send either
        return [{"name": s.label, "aliases": [s.name, *s.aliases],
                 "options": {"scheduler": s.automatic} if s.automatic != "normal" else {}} for s in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers")
    def schedulers(request: Request):
        caller(request)
        from ..core.sampling_names import SCHEDULE_NAMES
        return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": 7.0 if s.name == "karras" else -1,
                 "need_inner_model": s.name in ("normal", "uniform", "simple", "sgm_uniform", "ddim_uniform", "beta")}
                for s in SCHEDULE_NAMES]

    @app.get("/sdapi/v1/options")
    def get_options(request: Request):
        """The caller's A1111 options: the server's defaults under what they have set (kept per user, durable)."""
        return {**default_options, **store.a1111_options(user_of(request))}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        """Set the caller's options. The ones that decide a picture (A1111_OPTIONS) are checked and become that
        user's defaults for later txt2img/img2img requests; other A1111 options are kept and echoed back."""
        who = caller(request)
        body = await json_object(request)
        check_a1111_options(body, settings)
        return {**default_options, **store.set_a1111_options(who["name"], body)}

    @app.get("/sdapi/v1/progress")
    def progress(request: Request):
        running, _ = store.list(user=user_of(request), status="running", limit=1)
        queued = store.depth().get("queued", 0)
        p = running[0]["progress"] if running else 0.0
        current = preview_path(running[0]) if running else None
        return {"progress": p, "eta_relative": 0.0, "state": {"job_count": len(running) + queued,
                                                              "job": running[0]["id"] if running else ""},
                "current_image": base64.b64encode(current.read_bytes()).decode() if current else None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt(request: Request):
        running, _ = store.list(user=user_of(request), status="running", limit=100)
        for job in running:
            store.cancel(job["id"])
        return {"interrupted": len(running)}

    def openapi_with_job_types() -> dict:
        """The generated document, with POST /v1/jobs' body shown as what it is: one request schema per job type,
        chosen by ``type`` (serve.jobs), instead of an untyped ``request`` object."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            body, named = openapi_body()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(named)
            schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] = body
        return app.openapi_schema
    app.openapi = openapi_with_job_types  # type: ignore[method-assign]
    return app


def _basic_auth_user(store: JobStore, credentials: str) -> dict:
    """HTTP Basic as A1111's ``--api-auth`` clients send it: ``user:token``; the token decides, and its user must
    be the name given."""
    try:
        name, _, token = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    who = store.user_for_token(token.strip())
    if who is None or (name and name != who["name"]):
        raise Unauthorized("invalid Basic credentials: give your user name and an imagesmith token as the password")
    return who


A1111_OPTIONS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "randn_source")
"""The A1111 options that decide a picture: a user's saved values are their defaults (override_settings wins)."""


def check_a1111_options(options: dict, settings: Settings) -> None:
    """BadRequest for a picture-deciding option with a value imagesmith cannot use (before anything is saved)."""
    from ..models.house import make_registry
    if "sd_model_checkpoint" in options:
        make_registry(settings).get(str(options["sd_model_checkpoint"]), "checkpoint")  # must exist
    vae = options.get("sd_vae")
    if vae not in (None, "Automatic", "None"):
        make_registry(settings).get(str(vae), "vae")
    clip = options.get("CLIP_stop_at_last_layers")
    if clip is not None and (not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12):
        raise BadRequest("CLIP_stop_at_last_layers must be a whole number from 1 to 12")
    ensd = options.get("eta_noise_seed_delta")
    if ensd is not None and (not isinstance(ensd, int) or isinstance(ensd, bool) or ensd < 0):
        raise BadRequest("eta_noise_seed_delta must be a whole number >= 0")
    source = options.get("randn_source")
    if source is not None and str(source).upper() not in ("CPU", "GPU"):
        raise BadRequest(f"randn_source {source!r}: imagesmith draws A1111's CPU or GPU noise (NV is not emulated)")
    if len(json.dumps(options, default=str)) > 65536:
        raise BadRequest("options: at most 64 KB of JSON")


def _default_checkpoint_name(settings: Settings) -> str | None:
    """The checkpoint a job without a model runs on, as A1111's options name it from the start."""
    try:
        from ..models.house import make_registry
        return make_registry(settings).default_checkpoint().name
    except Exception:  # no checkpoint yet: the engine builds the house placeholder on first need
        return None


async def json_object(request: Request) -> dict:
    """The request body as a JSON object, or a 4xx (an empty or malformed body is the client's error, not a 500)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
