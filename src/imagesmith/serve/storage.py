"""Where job outputs live, so that any API node can serve them.

``local`` (the default): the files stay in the home of the worker that wrote them; an API node serves them from
that path, which works when API and workers share a disk (one machine, or a shared volume).

``database`` (``IMAGESMITH_OUTPUT_STORE=database``): the worker also keeps each output in the job store's database
(table ``output_blobs``), and its file entry names that copy (``blob``). An API node serves the local file when it
can see it and the database copy when it cannot, so a job run by a Ray actor on another machine is downloadable
from any API node connected to the same PostgreSQL. Retention deletes the copies with their jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..core.errors import NotFound
from .store import JobStore

OutputStore = Literal["local", "database"]
MAX_BLOB_BYTES = 256 * 1024 * 1024


def keep_outputs(kind: OutputStore, store: JobStore, job: dict, result: dict) -> dict:
    """The job's result with its files kept where `kind` says (the worker calls this before committing)."""
    if kind != "database":
        return result
    files = []
    for i, entry in enumerate(result.get("files") or []):
        path = Path(entry["path"])
        if path.is_file() and path.stat().st_size <= MAX_BLOB_BYTES:
            blob = f"{job['id']}-{job.get('attempts', 0)}-{i}"  # per attempt: a lost lease's copies never collide
            store.put_blob(blob, job_id=job["id"], user=job.get("user") or "local", name=path.name,
                           data=path.read_bytes())
            entry = {**entry, "blob": blob}
        files.append(entry)
    return {**result, "files": files}


def output_bytes(store: JobStore, entry: dict) -> bytes:
    """A job output's bytes: the file where this node can see it, else the database copy; NotFound when neither."""
    path = Path(entry["path"])
    if path.is_file():
        return path.read_bytes()
    if entry.get("blob"):
        return store.get_blob(entry["blob"])
    raise NotFound(f"output {path.name} is gone")
