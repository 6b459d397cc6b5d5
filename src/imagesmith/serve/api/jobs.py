"""The native job API: submit (``POST /v1/jobs``, a request schema per job type in ``/openapi.json``), read, list,
cancel, files, the live preview, and progress as server-sent events or WebSocket messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Header, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from ...core.errors import NotFound
from ..jobs import JOB_TYPES
from .context import FINISHED, Caller, Scope, Svc, check_page

router = APIRouter(tags=["jobs"])


class JobIn(BaseModel):
    type: str = Field(..., description=", ".join(JOB_TYPES))
    request: dict[str, Any]
    priority: int = Field(0, ge=-100, le=100)
    callback_url: str | None = None


@router.post("/v1/jobs", status_code=202)
def create_job(body: JobIn, svc: Svc, who: Caller, idempotency_key: str | None = Header(None)):
    job = svc.submit(body.type, body.request, who, body.priority, idempotency_key, body.callback_url)
    return {"job_id": job["id"], "status": job["status"]}


@router.get("/v1/jobs")
def list_jobs(svc: Svc, scope: Scope, status: str | None = None, limit: int = 50, offset: int = 0):
    check_page(limit, offset)
    jobs, total = svc.store.list(user=scope, status=status, limit=limit, offset=offset)
    return {"jobs": [svc.job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, svc: Svc, scope: Scope):
    return svc.job_view(svc.store.get(job_id, user=scope))


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(job_id: str, svc: Svc, scope: Scope):
    return svc.job_view(svc.store.cancel(job_id, user=scope))


@router.get("/v1/jobs/{job_id}/files/{index}")
def job_file(job_id: str, index: int, svc: Svc, scope: Scope):
    return svc.output_file(svc.store.get(job_id, user=scope), index)


@router.get("/v1/jobs/{job_id}/control-maps/{index}")
def job_control_map(job_id: str, index: int, svc: Svc, scope: Scope):
    """A ControlNet unit's detected map (the control image its preprocessor made), as a PNG."""
    return svc.output_file(svc.store.get(job_id, user=scope), index, key="control_maps")


@router.get("/v1/jobs/{job_id}/preview")
def job_preview(job_id: str, svc: Svc, scope: Scope):
    """The running job's live preview (JPEG, approximate colours from the latents); 404 when there is none."""
    job = svc.store.get(job_id, user=scope)
    path = svc.preview_path(job)
    if path is None:
        raise NotFound(f"job {job_id} has no preview now ({job['status']})")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def _changes(svc, job_id: str, scope: str | None):
    """The job's view each time its status or progress changes, until it has finished."""
    last = None
    while True:
        job = svc.job_view(svc.store.get(job_id, user=scope))
        state = (job["status"], job["progress"], job["progress_note"])
        if state != last:
            last = state
            yield job
            if job["status"] in FINISHED:
                return
        await asyncio.sleep(0.1)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, svc: Svc, scope: Scope):
    """Server-sent events: one ``progress`` event per change, then ``done`` with the final job."""
    svc.store.get(job_id, user=scope)  # 404 before the stream starts

    async def stream():
        async for job in _changes(svc, job_id, scope):
            kind = "done" if job["status"] in FINISHED else "progress"
            yield f"event: {kind}\ndata: {json.dumps(job)}\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream")


@router.websocket("/v1/jobs/{job_id}/ws")
async def job_socket(websocket: WebSocket, job_id: str, svc: Svc, scope: Scope):
    """The same progress as the SSE route, as JSON messages. The caller is checked as on every HTTP route (the
    token may also come as ?token=, since browsers cannot set headers on a WebSocket): a refused caller's socket
    is closed with 4401 (or 4429 past the rate limit), an unknown job's with 4404."""
    try:
        svc.store.get(job_id, user=scope)
    except NotFound:
        await websocket.close(code=4404)
        return
    await websocket.accept()
    try:
        async for job in _changes(svc, job_id, scope):
            await websocket.send_json(job)
        await websocket.close()
    except WebSocketDisconnect:
        pass
