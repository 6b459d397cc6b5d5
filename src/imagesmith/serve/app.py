"""The HTTP API: the native ``/v1`` job API (OpenAPI at ``/docs``) and the A1111-compatible ``/sdapi/v1`` routes,
both on the durable queue (:mod:`.store`), served by worker(s) (:mod:`.worker`).

:func:`create_app` puts together the routers of :mod:`.api` over one :class:`~.api.context.Services` (settings,
store, rate limiter, safety gate), which every route reaches through FastAPI dependencies; the caller of every
route, HTTP or WebSocket, comes from the one ``Caller`` dependency.

Clients never name paths: images come in through ``POST /v1/uploads`` (or base64 in A1111 requests), are
checked (format, bytes, pixels) and stored under the home as their uploader's; requests refer to them by upload id,
and only their owner (or an admin) may use or read them (``GET /v1/files/{id}``, which also serves job outputs by
their ``file_id``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..core.errors import ImagesmithError
from ..core.settings import Settings
from .api import a1111, a1111_controlnet, a1111_lists, comfy, files, jobs, ops, queue
from .api import comfy_frontend as comfy_pages
from .api.context import RateLimiter, Services, default_store, export_queue_doc
from .jobs import openapi_body
from .store import JobStore

__all__ = ["create_app", "default_store", "export_queue_doc"]
A1111_PREFIXES = ("/sdapi/", "/controlnet/")


def create_app(settings: Settings | None = None, store: JobStore | None = None, *, sync_timeout: float = 600.0,
               require_auth: bool | None = None, rate_per_minute: int | None = None, safety=None,
               server_stop: bool = False, comfy_frontend: bool | str | Path = False) -> FastAPI:
    """``require_auth``: every route but the health checks needs ``Authorization: Bearer <token>`` (default:
    ``IMAGESMITH_AUTH=1``; ``imagesmith serve`` turns it on for any non-loopback address). ``rate_per_minute``: each
    caller's request budget (default ``IMAGESMITH_RATE_PER_MINUTE`` or 600)."""
    settings = settings or Settings.from_env()
    if rate_per_minute is None:
        rate_per_minute = int(os.environ.get("IMAGESMITH_RATE_PER_MINUTE", "600"))
    if require_auth is None:
        require_auth = os.environ.get("IMAGESMITH_AUTH", "") in ("1", "true", "yes")
    if safety is None and os.environ.get("IMAGESMITH_SAFETY", "1") not in ("0", "false", "no"):
        from ..models.cache import ModelCache
        from ..vision.safety import SafetyGate
        cache = ModelCache(settings)  # the API process's one memory manager (its only model: the prompt encoder)
        # prompts are checked at submit; the workers check the images
        safety = SafetyGate.from_settings(settings, cache=lambda: cache)
    settings.ensure_home()
    store = store or default_store(settings)
    app = FastAPI(title="imagesmith", version=__version__,
                  description="Native job API (/v1) and A1111-compatible API (/sdapi/v1) on one durable queue.")
    app.state.settings, app.state.store = settings, store
    app.state.services = Services(settings=settings, store=store, limiter=RateLimiter(rate_per_minute),
                                  require_auth=require_auth, safety=safety, sync_timeout=sync_timeout,
                                  a1111_defaults={"sd_model_checkpoint": a1111.default_checkpoint_name(settings)},
                                  server_stop=server_stop)

    def error(request: Request, status: int, code: str, message: str, kind: str,
              field: str | None = None) -> JSONResponse:
        """The native error shape, or on the A1111 routes A1111's own (``{"error", "detail", "body", "errors"}``,
        what its clients parse)."""
        if request.url.path.startswith(A1111_PREFIXES):
            return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message, "code": code},
                                status_code=status)
        body = {"code": code, "message": message}
        if field:
            body["field"] = field
        return JSONResponse({"error": body}, status_code=status)

    @app.exception_handler(ImagesmithError)
    async def _user_error(request: Request, exc: ImagesmithError):
        return error(request, exc.http_status, exc.code, str(exc), type(exc).__name__, getattr(exc, "field", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logging.getLogger(__name__).exception("internal error")
        return error(request, 500, "internal", type(exc).__name__, type(exc).__name__)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return error(request, 422, "bad_request", f"{where}: {err['msg']}", "ValidationError")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith(A1111_PREFIXES):
            return error(request, exc.status_code, "http", str(exc.detail), "HTTPException")
        return await http_exception_handler(request, exc)

    app.mount("/studio", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="studio")
    for module in (ops, files, jobs, queue, a1111, a1111_lists, a1111_controlnet, comfy, comfy_pages):
        app.include_router(module.router)
    if comfy_frontend:  # ComfyUI's own web frontend (the user's installed package) at /comfy/, its API beside it
        static = comfy_pages.frontend_dir(None if comfy_frontend is True else Path(comfy_frontend))
        app.include_router(comfy.router, prefix="/comfy", include_in_schema=False)
        app.include_router(comfy_pages.router, prefix="/comfy", include_in_schema=False)
        templates = comfy_pages.templates_dir()
        if templates is not None:  # ComfyUI's template browser, from the user's comfyui-workflow-templates
            app.mount("/comfy/templates", StaticFiles(directory=templates), name="comfy-templates")
        progress_icons = static / "assets" / "images" / "favicon_progress_16x16"
        if progress_icons.is_dir():  # newer frontends ask for their progress favicons at the server root
            app.mount("/assets/images/favicon_progress_16x16", StaticFiles(directory=progress_icons),
                      name="comfy-progress-icons")
        app.mount("/comfy", StaticFiles(directory=static, html=True), name="comfy-frontend")

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
