"""Disk use per user, and the retention policy that keeps it bounded: finished jobs' output folders and uploads,
with their rows, deleted by age (``IMAGESMITH_RETENTION_DAYS``) and, per user, oldest first until the user is
under a size cap (``IMAGESMITH_RETENTION_GB_PER_USER``). Queued and running jobs are never touched, nor the
uploads they will read. ``imagesmith admin disk`` and ``imagesmith admin retention`` run it by hand;
``imagesmith serve`` runs it every ``IMAGESMITH_RETENTION_INTERVAL_S`` seconds (default an hour) when a policy is
set."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadRequest, NotFound
from ..core.settings import Settings
from .store import JobStore
from .worker import _safe

log = logging.getLogger(__name__)


def job_dir(settings: Settings, job: dict) -> Path:
    """Every attempt of a job writes under this folder (worker.job_folder)."""
    return settings.home / "outputs" / _safe(job["user"]) / job["id"]


def upload_file(settings: Settings, upload_id: str) -> Path:
    return settings.home / "uploads" / f"{upload_id}.png"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_use(settings: Settings, store: JobStore) -> dict:
    """Bytes and counts per user: job output folders (finished and unfinished) and uploads."""
    users: dict[str, dict] = {}

    def row(user: str) -> dict:
        return users.setdefault(user, {"outputs_bytes": 0, "jobs": 0, "uploads_bytes": 0, "uploads": 0})
    known_dirs = set()
    offset = 0
    while True:
        jobs, total = store.list(limit=500, offset=offset)
        for job in jobs:
            folder = job_dir(settings, job)
            known_dirs.add(folder)
            r = row(job["user"])
            r["jobs"] += 1
            r["outputs_bytes"] += tree_bytes(folder)
        offset += len(jobs)
        if not jobs or offset >= total:
            break
    for up in store.all_uploads():
        r = row(up["user"])
        r["uploads"] += 1
        r["uploads_bytes"] += tree_bytes(upload_file(settings, up["id"]))
    for user, n in store.blob_bytes_by_user().items():  # outputs also kept in the database (serve.storage)
        row(user)["database_bytes"] = n
    for r in users.values():
        r.setdefault("database_bytes", 0)
        r["total_bytes"] = r["outputs_bytes"] + r["uploads_bytes"]
    outputs = settings.home / "outputs"
    orphans = [d for u in (outputs.iterdir() if outputs.is_dir() else []) if u.is_dir()
               for d in u.iterdir() if d.is_dir() and d not in known_dirs]
    return {"users": dict(sorted(users.items())),
            "unowned_output_folders": {"count": len(orphans), "bytes": sum(tree_bytes(d) for d in orphans)},
            "total_bytes": sum(r["total_bytes"] for r in users.values())}


@dataclass
class Policy:
    max_age_s: float | None = None
    max_bytes_per_user: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Policy":
        return cls.make(settings.retention_days, settings.retention_gb_per_user)

    @classmethod
    def make(cls, days: float | None, gb_per_user: float | None) -> "Policy":
        if days is not None and days <= 0:
            raise BadRequest("retention days must be above 0")
        if gb_per_user is not None and gb_per_user <= 0:
            raise BadRequest("retention GB per user must be above 0")
        return cls(None if days is None else days * 86400.0,
                   None if gb_per_user is None else int(gb_per_user * 1024 ** 3))

    @property
    def active(self) -> bool:
        return self.max_age_s is not None or self.max_bytes_per_user is not None


def apply_retention(settings: Settings, store: JobStore, policy: Policy, *, now: float | None = None,
                    dry_run: bool = False) -> dict:
    """Delete what the policy says (or, `dry_run`, only say it): the report lists every job and upload deleted,
    the bytes freed, and why (``age`` or ``size``)."""
    now = time.time() if now is None else now
    needed = {str(v) for req in store.unfinished_requests() for v in _strings(req)}
    items: dict[str, list[dict]] = {}  # per user: deletable things, oldest first
    for job in store.finished_jobs():
        folder = job_dir(settings, job)
        items.setdefault(job["user"], []).append({"kind": "job", "id": job["id"], "when": job["finished_at"] or
                                                  job["created_at"], "path": folder, "bytes": tree_bytes(folder)})
    for up in store.all_uploads():
        path = upload_file(settings, up["id"])
        if str(path) in needed:
            continue
        items.setdefault(up["user"], []).append({"kind": "upload", "id": up["id"], "when": up["created_at"],
                                                 "path": path, "bytes": tree_bytes(path)})
    use = {u: r["total_bytes"] for u, r in disk_use(settings, store)["users"].items()}
    doomed: list[tuple[str, dict, str]] = []
    for user, things in items.items():
        things.sort(key=lambda t: t["when"])
        left = use.get(user, 0)
        for t in things:
            why = None
            if policy.max_age_s is not None and now - t["when"] > policy.max_age_s:
                why = "age"
            elif policy.max_bytes_per_user is not None and left > policy.max_bytes_per_user:
                why = "size"
            if why:
                doomed.append((user, t, why))
                left -= t["bytes"]
    report = {"dry_run": dry_run, "policy": {"max_age_days": None if policy.max_age_s is None else
                                             policy.max_age_s / 86400, "max_bytes_per_user": policy.max_bytes_per_user},
              "deleted_jobs": [], "deleted_uploads": [], "freed_bytes": 0}
    for user, t, why in doomed:
        entry = {"id": t["id"], "user": user, "bytes": t["bytes"], "why": why}
        report["deleted_jobs" if t["kind"] == "job" else "deleted_uploads"].append(entry)
        report["freed_bytes"] += t["bytes"]
    if not dry_run:
        jobs = [e["id"] for e in report["deleted_jobs"]]
        store.delete_finished(jobs)  # rows first: a job requeued meanwhile keeps its row and its files
        for user, t, _ in doomed:
            if t["kind"] == "job" and not _exists(store, t["id"]):
                shutil.rmtree(t["path"], ignore_errors=True)
        uploads = [e["id"] for e in report["deleted_uploads"]]
        for uid in uploads:
            upload_file(settings, uid).unlink(missing_ok=True)
        store.delete_uploads(uploads)
    return report


def _exists(store: JobStore, job_id: str) -> bool:
    try:
        store.get(job_id)
        return True
    except NotFound:
        return False


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def run_periodically(settings: Settings, store: JobStore, stop: threading.Event, *, interval_s: float) -> None:
    """The service's retention loop (a daemon thread of ``imagesmith serve``)."""
    policy = Policy.from_settings(settings)
    while not stop.wait(interval_s if policy.active else 3600):
        if not policy.active:
            continue
        try:
            r = apply_retention(settings, store, policy)
            if r["deleted_jobs"] or r["deleted_uploads"]:
                log.info("retention: %d jobs, %d uploads, %d bytes freed", len(r["deleted_jobs"]),
                         len(r["deleted_uploads"]), r["freed_bytes"])
        except Exception:
            log.exception("retention run failed; the next one tries again")
