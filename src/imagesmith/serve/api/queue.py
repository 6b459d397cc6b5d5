"""The queue as a whole: its state for anyone; pause, resume, requeue and import for admins (an import by a user
makes every job theirs); export of the caller's unfinished jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...core.errors import BadRequest
from ..worker import batch_key
from .context import Admin, Caller, Scope, Svc, export_queue_doc, json_object

router = APIRouter(prefix="/v1/queue", tags=["queue"])


@router.get("")
def queue_state(svc: Svc, _: Caller):
    """Whether the queue is paused (who paused it, when, why) and how many jobs are in each state."""
    return svc.store.queue_state()


@router.post("/pause")
async def pause_queue(request: Request, svc: Svc, who: Admin):
    """Admin: workers claim nothing until resumed; new jobs are still accepted and wait; running ones finish.
    Body (optional): ``{"reason": "..."}``."""
    body = await json_object(request) if await request.body() else {}
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        raise BadRequest("reason must be a string of at most 500 characters")
    return svc.store.set_paused(True, by=who["name"], reason=reason)


@router.post("/resume")
def resume_queue(svc: Svc, who: Admin):
    return svc.store.set_paused(False, by=who["name"])


@router.post("/jobs/{job_id}/requeue")
def requeue_job(job_id: str, svc: Svc, _: Admin):
    """Admin: a failed or canceled job (a poison job that lost its worker IMAGESMITH_MAX_ATTEMPTS times, say)
    back to the queue with its attempts reset. 404 for an unknown id, 409 for a job in another state."""
    return svc.store.requeue(job_id)


@router.get("/export")
def export_queue(svc: Svc, scope: Scope):
    """The caller's unfinished jobs (an admin's: everyone's) as a document ``POST /v1/queue/import`` takes."""
    return export_queue_doc(svc.store, svc.settings, user=scope)


@router.post("/import")
async def import_queue(request: Request, svc: Svc, who: Caller):
    """Submit an export's jobs again, each keeping its id, priority and place. A user's import makes every job
    theirs; an admin's keeps each job's owner. Every request is validated again (uploads must be here and
    the caller's; prompts pass the safety policy) before any job is submitted."""
    body = await json_object(request)

    def prepare(job: dict) -> dict:
        callback = job.get("callback_url")
        normalised, model = svc.checked(job["type"], job["request"], who, callback if callback else None)
        return {**job, "request": normalised, "model": model, "batch_key": batch_key(job["type"], normalised)}
    out = svc.store.import_queue(body, user=None if who["role"] == "admin" else who["name"], prepare=prepare)
    return {"imported": len(out["imported"]), "existing": len(out["existing"]),
            "imported_ids": out["imported"], "existing_ids": out["existing"]}
