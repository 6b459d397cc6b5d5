"""What ComfyUI's web frontend needs beside the prompt API: users, per-user settings, user data (saved
workflows), i18n, and the small listings it reads at start. ``imagesmith serve --comfy-frontend`` serves the
frontend itself from the user's installed ``comfyui-frontend-package`` (GPL, an optional extra, never bundled)
under ``/comfy/``, so imagesmith's own studio keeps ``/``.

User data lives under ``<home>/comfy/user/<user>/``; file names are checked as names (a ``/`` separated path of
plain names), never joined as given."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ...core.errors import BadRequest, Conflict, NotFound
from ..worker import _safe
from .comfy import _lists, _raw_json, _routes
from .context import Caller, Services, Svc

router = APIRouter(tags=["comfyui"])
MAX_USERDATA_BYTES = 16 * 1024 * 1024


def user_dir(svc: Services, user: str) -> Path:
    return svc.settings.home / "comfy" / "user" / _safe(user)


def _user_path(svc: Services, user: str, rel: str) -> Path:
    from ...engine.graph.nodes import safe_name
    parts = [p for p in rel.replace("\\", "/").split("/") if p]
    if not parts:
        raise BadRequest("give a file name")
    return user_dir(svc, user).joinpath(*[safe_name(p, "user data path") for p in parts])


def _settings_file(svc: Services, user: str) -> Path:
    return user_dir(svc, user) / "comfy.settings.json"


def _read_settings(svc: Services, user: str) -> dict:
    path = _settings_file(svc, user)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{time.time_ns()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _frontend_routes(path: str, methods: list[str]):
    return _routes(path, methods, on=router, schema=False)


@_frontend_routes("/users", ["GET"])
def users(who: Caller):
    """Single-user mode as the frontend sees it: imagesmith's auth already says who is calling (a ``users`` list
    here would make the frontend ask for a user name)."""
    return {"storage": "server", "migrated": True}


@_frontend_routes("/settings", ["GET"])
def get_settings(svc: Svc, who: Caller):
    return _read_settings(svc, who["name"])


@_frontend_routes("/settings", ["POST"])
async def post_settings(request: Request, svc: Svc, who: Caller):
    updates = await _raw_json(request)
    settings = {**_read_settings(svc, who["name"]), **updates}
    _write(_settings_file(svc, who["name"]), json.dumps(settings, indent=1).encode())
    return {}


@_frontend_routes("/settings/{setting_id}", ["GET"])
def get_setting(setting_id: str, svc: Svc, who: Caller):
    return _read_settings(svc, who["name"]).get(setting_id)


@_frontend_routes("/settings/{setting_id}", ["POST"])
async def post_setting(setting_id: str, request: Request, svc: Svc, who: Caller):
    body = await request.body()
    try:
        value = json.loads(body or b"null")
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    settings = {**_read_settings(svc, who["name"]), setting_id: value}
    _write(_settings_file(svc, who["name"]), json.dumps(settings, indent=1).encode())
    return {}


@_frontend_routes("/userdata", ["GET"])
def list_userdata(svc: Svc, who: Caller, dir: str, recurse: bool = False, full_info: bool = False,
                  split: bool = False):
    root = _user_path(svc, who["name"], dir)
    if not root.is_dir():
        raise NotFound(f"no user data folder {dir!r}")
    files = [p for p in (root.rglob("*") if recurse else root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    out = []
    for p in sorted(files):
        rel = str(p.relative_to(root)).replace("\\", "/")
        if full_info:
            st = p.stat()
            out.append({"path": rel, "size": st.st_size, "modified": st.st_mtime})
        elif split:
            out.append([rel, *rel.split("/")])
        else:
            out.append(rel)
    return out


@_frontend_routes("/userdata/{file:path}", ["GET"])
def get_userdata(file: str, svc: Svc, who: Caller):
    path = _user_path(svc, who["name"], file)
    if not path.is_file():
        raise NotFound(f"no user data file {file!r}")
    media = "application/json" if path.suffix == ".json" else "text/css" if path.suffix == ".css" else \
        "application/octet-stream"
    return FileResponse(path, media_type=media)


@router.get("/user.css", include_in_schema=False)
def user_css(svc: Svc, who: Caller):
    """The page's own stylesheet link: the caller's saved ``user.css`` (Settings -> Appearance), else none."""
    path = _user_path(svc, who["name"], "user.css")
    return FileResponse(path, media_type="text/css") if path.is_file() else Response("", media_type="text/css")


@_frontend_routes("/userdata/{file:path}", ["POST"])
async def post_userdata(file: str, request: Request, svc: Svc, who: Caller, overwrite: bool = True,
                        full_info: bool = False):
    if "/move/" in file:
        source, dest = file.split("/move/", 1)
        src, dst = _user_path(svc, who["name"], source), _user_path(svc, who["name"], dest)
        if not src.is_file():
            raise NotFound(f"no user data file {source!r}")
        if dst.exists() and not overwrite:
            raise Conflict(f"{dest!r} exists")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dst)
        return _info(dst, who, svc) if full_info else dest
    body = await request.body()
    if len(body) > MAX_USERDATA_BYTES:
        raise BadRequest(f"user data files are at most {MAX_USERDATA_BYTES} bytes")
    path = _user_path(svc, who["name"], file)
    if path.exists() and not overwrite:
        return JSONResponse({"error": {"code": "conflict", "message": f"{file!r} exists"}}, status_code=409)
    _write(path, body)
    return _info(path, who, svc) if full_info else file


def _info(path: Path, who: dict, svc: Services) -> dict:
    st = path.stat()
    return {"path": str(path.relative_to(user_dir(svc, who["name"]))).replace("\\", "/"), "size": st.st_size,
            "modified": st.st_mtime}


@_frontend_routes("/userdata/{file:path}", ["DELETE"])
def delete_userdata(file: str, svc: Svc, who: Caller):
    path = _user_path(svc, who["name"], file)
    if not path.is_file():
        raise NotFound(f"no user data file {file!r}")
    path.unlink()
    return Response(status_code=204)


@_frontend_routes("/i18n", ["GET"])
def i18n(who: Caller):
    return {}


@_frontend_routes("/workflow_templates", ["GET"])
def workflow_templates(who: Caller):
    return {}  # custom nodes' templates: imagesmith has none


@_frontend_routes("/global_subgraphs", ["GET"])
def global_subgraphs(who: Caller):
    return {}  # custom nodes' subgraph blueprints (newer frontends ask): imagesmith has none


FOLDERS = ("checkpoints", "loras", "vae", "controlnet", "embeddings", "upscale_models")


@_frontend_routes("/experiment/models", ["GET"])
def experiment_models(svc: Svc, who: Caller):
    return [{"name": f, "folders": [str(svc.settings.models_dir / f)]} for f in FOLDERS]


@_frontend_routes("/experiment/models/{folder}", ["GET"])
def experiment_models_in(folder: str, svc: Svc, who: Caller):
    if folder not in FOLDERS:
        raise NotFound(f"no model folder {folder!r}")
    return [{"name": n, "pathIndex": 0} for n in _lists(svc, who["name"])[folder]]


@router.get("/internal/logs", include_in_schema=False)
def logs(who: Caller):
    return ""


@router.get("/internal/logs/raw", include_in_schema=False)
def logs_raw(who: Caller):
    return {"entries": [], "size": {"cols": 80, "rows": 24}}


@router.patch("/internal/logs/subscribe", include_in_schema=False)
def logs_subscribe(who: Caller):
    return {}


@router.get("/internal/folder_paths", include_in_schema=False)
def folder_paths(svc: Svc, who: Caller):
    return {f: [[str(svc.settings.models_dir / f)], []] for f in FOLDERS}


def frontend_dir(root: Path | None = None) -> Path:
    """The frontend's built files: ``root`` where the user names one (``--comfy-frontend-root``, as ComfyUI's
    ``--front-end-root``: another version, or a frontend they built), else their installed comfyui-frontend-package."""
    if root is not None:
        if not (Path(root) / "index.html").is_file():
            raise BadRequest(f"--comfy-frontend-root {root}: no index.html there (name the folder of a built ComfyUI "
                             "frontend, such as comfyui_frontend_package/static)")
        return Path(root)
    try:
        import comfyui_frontend_package
    except ImportError:
        raise BadRequest("--comfy-frontend needs ComfyUI's frontend: pip install 'comfyui-frontend-package>=1.27,"
                         "<1.45' (GPL-3.0; imagesmith does not bundle it)") from None
    return Path(comfyui_frontend_package.__file__).parent / "static"


def templates_dir() -> Path | None:
    """ComfyUI's workflow templates, where the user installed ``comfyui-workflow-templates`` (GPL; optional)."""
    try:
        import comfyui_workflow_templates
    except ImportError:
        return None
    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    return folder if folder.is_dir() else None
