"""Uploads and files: images come in through ``POST /v1/uploads`` (checked: format, bytes, pixels) and are stored
as their uploader's; ``GET /v1/files/{id}`` serves an upload or a job's output (``<job id>-<n>``) to its owner or
an admin, and a 404 to anyone else, as for a file that does not exist."""

from __future__ import annotations

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import FileResponse

from ...core.errors import BadRequest
from .context import MAX_UPLOAD_BYTES, OUTPUT_ID, UPLOAD_ID, Caller, Scope, Svc, check_page

router = APIRouter(tags=["files"])


@router.post("/v1/uploads", status_code=201)
async def upload(svc: Svc, who: Caller, file: UploadFile = File(...)):
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    row = svc.store_upload(data, who)
    return {"id": row["id"], "url": f"/v1/files/{row['id']}",
            **{k: row[k] for k in ("size", "width", "height", "created_at")}}


@router.get("/v1/uploads")
def list_uploads(svc: Svc, scope: Scope, limit: int = 50, offset: int = 0):
    """The caller's uploads, newest first (an admin sees everyone's, with their owners)."""
    check_page(limit, offset)
    rows, total = svc.store.list_uploads(user=scope, limit=limit, offset=offset)
    return {"uploads": [{**r, "url": f"/v1/files/{r['id']}"} for r in rows], "total": total, "limit": limit,
            "offset": offset}


@router.get("/v1/files/{file_id:path}")  # any text, slashes too, reaches the id check (a 422, not a 404)
def get_file(file_id: str, svc: Svc, who: Caller):
    """An upload's PNG, or a job's output by its ``file_id`` (``<job id>-<n>``): for its owner or an admin;
    anyone else gets 404, as for a file that does not exist."""
    if UPLOAD_ID.match(file_id):
        return FileResponse(svc.upload_path(file_id, who), media_type="image/png")
    found = OUTPUT_ID.match(file_id)
    if found:
        job = svc.store.get(found[1], user=None if who["role"] == "admin" else who["name"])
        return svc.output_file(job, int(found[2]))
    raise BadRequest(f"not a file id: {file_id!r} (an upload id or a job output's file_id)")
