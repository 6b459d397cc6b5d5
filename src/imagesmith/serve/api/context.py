"""What every route shares: the services of one app (settings, the job store, the rate limiter, the safety gate)
and the dependencies that give a route its caller.

``Caller`` is the one way a route learns who is calling, for HTTP and WebSocket routes alike: a bearer token, HTTP
Basic with a token as the password (A1111's ``--api-auth`` clients), or, on a WebSocket only, ``?token=`` (browsers
cannot set headers there); the caller's rate limit is taken in the same step. Without credentials on a server
that does not require them, the caller is the local admin. A WebSocket whose caller is refused is closed with
4000 + the HTTP status (4401, 4429) before it is accepted."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, WebSocketException
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import HTTPConnection, Request

from ...core.errors import BadRequest, Forbidden, ImagesmithError, NotFound, TooManyRequests, Unauthorized
from ...core.settings import Settings
from ..jobs import JOBS, validate_request
from ..store import JobStore
from ..worker import PREVIEW_NAME, batch_key, job_folder

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
OUTPUT_ID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(\d{1,5})$")  # job id-index
MEDIA_TYPES = {".png": "image/png", ".html": "text/html", ".zip": "application/zip", ".jpg": "image/jpeg",
               ".json": "application/json", ".pdf": "application/pdf"}
FINISHED = ("succeeded", "failed", "canceled")


def default_store(settings: Settings) -> JobStore:
    settings.ensure_home()
    url = os.environ.get("IMAGESMITH_DATABASE_URL") or f"sqlite:///{settings.home / 'jobs.db'}"
    return JobStore(url)


def map_inputs(request: dict, fn: Callable[[Any], Any]) -> dict:
    """``request`` with ``fn`` applied to each of its input images (upload ids, or the files they became)."""
    request = dict(request)
    for key in ("init_image", "mask", "image", "photo"):
        if request.get(key) is not None:
            request[key] = fn(request[key])
    for key in ("products", "images", "edit_images"):
        if isinstance(request.get(key), list):
            request[key] = [fn(x) for x in request[key]]
    def unit(u):  # a ControlNet unit's control image; an IP-Adapter's reference and mask
        if not isinstance(u, dict):
            return u
        return {**u, **{k: fn(u[k]) for k in ("image", "mask") if u.get(k) is not None}}
    for key in ("controlnet", "ip_adapter"):  # each unit's image (a control image, a reference)
        if isinstance(request.get(key), list):
            request[key] = [unit(u) for u in request[key]]
        elif isinstance(request.get(key), dict):
            request[key] = unit(request[key])
    if isinstance(request.get("regions"), list):  # regional prompts' masks
        request["regions"] = [{**r, "mask": fn(r["mask"])} if isinstance(r, dict) and r.get("mask") is not None
                              else r for r in request["regions"]]
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


class RateLimiter:
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


@dataclass
class Services:
    """One app's shared parts, and the operations more than one router needs."""
    settings: Settings
    store: JobStore
    limiter: RateLimiter
    require_auth: bool = False
    safety: Any = None
    sync_timeout: float = 600.0
    a1111_defaults: dict = field(default_factory=dict)
    server_stop: bool = False
    """A1111's ``--api-server-stop``: the admin routes server-stop / server-kill / server-restart are served."""
    _model_lists: dict = field(default_factory=dict, repr=False)

    def model_lists(self, max_age_s: float = 2.0) -> dict[str, list[str]]:
        """The registry's files by ComfyUI folder and the upscaler names, scanned at most every `max_age_s`
        (every /prompt validates against them; a scan probes every model file's header)."""
        cached = self._model_lists.get("lists")
        if cached is None or time.monotonic() - self._model_lists["at"] > max_age_s:
            from ...engine.graph.nodes import model_lists
            from ...engine.upscale import UpscalerSet
            from ...models.house import make_registry
            cached = model_lists(make_registry(self.settings), UpscalerSet(self.settings).names(files=True))
            self._model_lists.update(lists=cached, at=time.monotonic())
        return cached

    # ------------------------------------------------------------------ who is calling
    def authenticate(self, conn: HTTPConnection) -> dict:
        header = conn.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token is None and (conn.scope["type"] == "websocket" or conn.url.path in ("/view", "/api/view")):
            # browsers cannot set headers on a WebSocket, and ComfyUI clients fetch images as plain URLs
            token = conn.query_params.get("token")
        who = None
        if token is not None:
            who = self.store.user_for_token(token)
            if who is None:
                raise Unauthorized("invalid or revoked token")
        elif header.lower().startswith("basic "):  # A1111's --api-auth: the user's name, a token as the password
            try:
                who = basic_auth_user(self.store, header[6:].strip())
            except Unauthorized:
                # A1111 without --api-auth ignores whatever Basic header a client sends (SillyTavern always sends
                # one, 'Basic ' with its empty auth setting): so does a server that requires no auth
                if self.require_auth:
                    raise
        elif self.require_auth:
            raise Unauthorized("this server needs 'Authorization: Bearer <token>' or HTTP Basic with a token as the "
                               "password (imagesmith tokens create USER)")
        who = who or {"name": "local", "role": "admin"}
        self.limiter.take(who["name"])
        return who

    # ------------------------------------------------------------------ uploads and files
    def upload_path(self, upload_id: str, who: dict) -> Path:
        """The file of an upload ``who`` may use: their own, or any for an admin. Someone else's upload is
        "not found", as a missing one is (its existence is not told). An upload stored before uploads had owners
        (a file with no record) belongs to no one: only an admin may use it."""
        if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
            raise BadRequest(f"not an upload id: {upload_id!r}")
        admin = who["role"] == "admin"
        path = self.settings.home / "uploads" / f"{upload_id}.png"
        try:
            self.store.get_upload(upload_id, user=None if admin else who["name"])
        except NotFound:
            if not (admin and path.is_file()):
                raise
        if not path.is_file():
            raise NotFound(f"no upload {upload_id}")
        return path

    def store_upload(self, data: bytes, who: dict) -> dict:
        from ...core.imageio import load_image, save_png_atomic
        if len(data) > MAX_UPLOAD_BYTES:
            raise BadRequest(f"upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
        image = load_image(data, settings=self.settings, mode=None, what="upload")
        upload_id = uuid.uuid4().hex
        path = self.settings.home / "uploads" / f"{upload_id}.png"
        save_png_atomic(image, path)
        try:
            return self.store.add_upload(upload_id, user=who["name"], size=path.stat().st_size, width=image.width,
                                         height=image.height)
        except Exception:
            path.unlink(missing_ok=True)  # no owner recorded: no file either
            raise

    def discard(self, job: dict | None, uploads: list[str] = ()) -> None:
        """Keep nothing of an A1111 call that asked for nothing to be saved (``save_images: false``, A1111's
        default; Extras never save): the job's output folder and database copies and the uploads the route made
        from its base64 images. The job's row stays (history, accounting) with ``files_not_kept``."""
        import shutil

        from ..retention import job_dir, upload_file
        if job is not None and job.get("status") == "succeeded":
            self.store.forget_outputs(job["id"], "not kept: the A1111 call had save_images false")
            shutil.rmtree(job_dir(self.settings, job), ignore_errors=True)
        for upload_id in uploads:
            upload_file(self.settings, upload_id).unlink(missing_ok=True)
        self.store.delete_uploads(list(uploads))

    def output_file(self, job: dict, index: int, key: str = "files") -> Response:
        """A job's output (``key``: its pictures, or its ControlNet units' detected maps): the file where this node
        can see it, else its database copy (serve.storage)."""
        files = (job.get("result") or {}).get(key, [])
        if not 0 <= index < len(files):
            raise NotFound(f"job {job['id']} has no file {index}")
        entry = files[index]
        path = Path(entry["path"])  # a path the worker wrote, never the client's
        media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        if path.is_file():
            return FileResponse(path, media_type=media, filename=path.name if path.suffix == ".zip" else None)
        if not entry.get("blob"):
            raise NotFound(f"job {job['id']} file {index} is gone")
        headers = {"Content-Disposition": f'attachment; filename="{path.name}"'} if path.suffix == ".zip" else None
        return Response(self.store.get_blob(entry["blob"]), media_type=media, headers=headers)

    def output_bytes(self, entry: dict) -> bytes:
        from ..storage import output_bytes
        return output_bytes(self.store, entry)

    def preview_path(self, job: dict) -> Path | None:
        if job["status"] != "running":
            return None
        path = job_folder(self.settings, job) / PREVIEW_NAME
        return path if path.is_file() else None

    # ------------------------------------------------------------------ jobs
    def resolve_inputs(self, request: dict, who: dict) -> dict:
        """Upload ids in a request -> their files, each the caller's own (or any, for an admin)."""
        request = map_inputs(request, lambda x: str(self.upload_path(x, who)))
        if isinstance(request.get("captioner"), str) and not re.fullmatch(r"[\w.-]+", request["captioner"]):
            raise BadRequest("captioner: give the name of a folder under models/captioners, not a path")
        if isinstance(request.get("clip"), str) and not re.fullmatch(r"[\w.-]+", request["clip"]):
            raise BadRequest("clip: give the name of a registered CLIP (models list --kind clip), not a path")
        return request

    def checked(self, job_type: str, request: dict, who: dict, callback_url: str | None) -> tuple[dict, str | None]:
        """(normalised request, model) of a job ``who`` may submit: valid, its uploads theirs, its prompt allowed."""
        if callback_url is not None:
            if not re.match(r"^https?://[^\s]+$", callback_url):
                raise BadRequest("callback_url must be an http(s) URL")
            from ..webhooks import resolve_target
            resolve_target(callback_url)  # a loopback/private/link-local target is refused here, at submit
        normalised, model = validate_request(job_type, self.resolve_inputs(request, who), self.settings)
        if self.safety:
            text = " ".join(str(x) for x in (normalised.get("prompt"), (normalised.get("base") or {}).get("prompt"),
                                             normalised.get("concept"), normalised.get("headline")) if x)
            verdict = self.safety.check_prompt(text)
            if verdict.flagged:
                raise BadRequest(f"prompt blocked by the safety policy: {verdict.reason}")
        return normalised, model

    def submit(self, job_type: str, request: dict, who: dict, priority: int = 0, key: str | None = None,
               callback_url: str | None = None) -> dict:
        normalised, model = self.checked(job_type, request, who, callback_url)
        job, _ = self.store.submit(job_type, normalised, user=who["name"], priority=priority, idempotency_key=key,
                                   model=model, callback_url=callback_url, batch_key=batch_key(job_type, normalised))
        return job

    async def run_sync(self, job_type: str, request: dict, who: dict) -> dict | JSONResponse:
        """Submit and wait (A1111's synchronous routes): the finished job, or a 422 JSON error if it did not
        succeed; 504 past the server's sync timeout."""
        job = self.submit(job_type, request, who)
        end = time.monotonic() + self.sync_timeout
        while True:
            job = self.store.get(job["id"])
            if job["status"] in FINISHED:
                break
            if time.monotonic() > end:
                raise HTTPException(504, "the job did not finish in time")
            await asyncio.sleep(0.05)
        if job["status"] != "succeeded":  # A1111's error shape: these are the A1111 routes' waits
            detail = job["error"] or f"the job was {job['status']}"
            return JSONResponse({"error": "Job" + job["status"].capitalize(), "detail": detail, "body": "",
                                 "errors": detail, "code": f"job_{job['status']}"}, status_code=422)
        return job

    def job_view(self, job: dict) -> dict:
        files = (job.get("result") or {}).get("files", [])
        out = {k: job[k] for k in ("id", "type", "status", "priority", "progress", "progress_note", "error",
                                   "attempts", "created_at", "started_at", "finished_at", "request")}
        out["files"] = [{"url": f"/v1/jobs/{job['id']}/files/{k}", "file_id": f"{job['id']}-{k}",
                         **{x: f[x] for x in ("seed", "width", "height", "infotext", "kind", "format", "product")
                            if x in f}}
                        for k, f in enumerate(files)]
        maps = (job.get("result") or {}).get("control_maps") or []
        if maps:  # A1111's detected maps, apart from the pictures
            out["control_maps"] = [{"url": f"/v1/jobs/{job['id']}/control-maps/{k}",
                                    **{x: m[x] for x in ("unit", "preprocessor", "width", "height") if x in m}}
                                   for k, m in enumerate(maps)]
        if (job.get("result") or {}).get("batch"):  # ran in one pipeline call with other jobs
            out["batch"] = job["result"]["batch"]
        if job["status"] == "running" and self.preview_path(job) is not None:
            out["preview_url"] = f"/v1/jobs/{job['id']}/preview"
        if getattr(JOBS.get(job["type"]), "answers", False) and job.get("result"):  # the answer, not only its files
            out["result"] = {k: v for k, v in job["result"].items() if k != "files"}
        return out


def basic_auth_user(store: JobStore, credentials: str) -> dict:
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


async def json_object(request: Request) -> dict:
    """The request body as a JSON object, or a 4xx (an empty or malformed body is the client's error, not a 500)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= 500 or offset < 0:
        raise BadRequest("limit must be 1..500 and offset >= 0")


# ---------------------------------------------------------------------------------------------- dependencies
def services(conn: HTTPConnection) -> Services:
    return conn.app.state.services


Svc = Annotated[Services, Depends(services)]


def caller(conn: HTTPConnection, svc: Svc) -> dict:
    """The caller of an HTTP or WebSocket route (see the module's docstring)."""
    try:
        return svc.authenticate(conn)
    except ImagesmithError as exc:
        if conn.scope["type"] == "websocket":
            raise WebSocketException(code=4000 + exc.http_status, reason=str(exc)[:120]) from None
        raise


Caller = Annotated[dict, Depends(caller)]


def scope(who: Caller) -> str | None:
    """Whose jobs and uploads the caller may see: their own, or everyone's (None) for an admin."""
    return None if who["role"] == "admin" else who["name"]


Scope = Annotated[str | None, Depends(scope)]


def admin(who: Caller) -> dict:
    if who["role"] != "admin":
        raise Forbidden("only an admin may pause, resume, requeue or import into the whole queue")
    return who


Admin = Annotated[dict, Depends(admin)]
