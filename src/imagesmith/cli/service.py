"""The service: serve, worker, users, tokens and the queue as a whole."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import app, _Exit


@app.command("serve")
def serve(host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(7860, "--port"),
          workers: int = typer.Option(1, "--workers", help="worker threads in this process (0: API only; run `imagesmith worker`)"),
          ray_address: Optional[str] = typer.Option(None, "--ray", help="run the workers as Ray actors: 'auto', 'local' or a cluster address"),
          batch: Optional[int] = typer.Option(None, "--batch", min=1, max=64, help="most compatible txt2img jobs one "
                                              "pipeline call takes (default IMAGESMITH_WORKER_BATCH or 4; 1: off)"),
          api_server_stop: bool = typer.Option(False, "--api-server-stop", help="serve A1111's server-stop, "
                                               "server-kill and server-restart to admins (graceful stops)"),
          comfy_frontend: bool = typer.Option(False, "--comfy-frontend", help="serve ComfyUI's web frontend at "
                                              "/comfy/ from your installed comfyui-frontend-package (GPL, optional)"),
          comfy_frontend_root: Optional[Path] = typer.Option(None, "--comfy-frontend-root", help="serve the ComfyUI "
                                                             "frontend built in this folder instead (implies "
                                                             "--comfy-frontend)")):
    """Start the HTTP API (/v1 jobs, A1111-compatible /sdapi/v1, OpenAPI at /docs) with its worker(s)."""
    if comfy_frontend or comfy_frontend_root:
        from ..serve.api.comfy_frontend import frontend_dir
        frontend_dir(comfy_frontend_root)  # not installed, or no frontend there: one clear line, before anything
        comfy_frontend = comfy_frontend_root or True
    import threading

    import uvicorn

    from ..core.settings import Settings
    from ..serve.app import create_app, default_store
    from ..serve.worker import Worker
    settings = Settings.from_env()
    store = default_store(settings)
    loopback = host in ("127.0.0.1", "localhost", "::1")
    auth = not loopback or os.environ.get("IMAGESMITH_AUTH", "") in ("1", "true", "yes")
    if ray_address:
        from ..serve.ray_workers import start_ray_workers
        actors = start_ray_workers(ray_address, store.url, str(settings.home), max(1, workers), batch=batch)
        print(f"{len(actors)} Ray worker actor(s) on {ray_address}", file=sys.stderr)
    from ..models.cache import ModelCache
    cache = ModelCache(settings)  # one per process: the worker threads load each model once, together
    local = [Worker(store, settings, batch=batch, cache=cache) for _ in range(0 if ray_address else workers)]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in local]
    for t in threads:
        t.start()
    from ..serve.retention import Policy, run_periodically
    if Policy.from_settings(settings).active:
        interval = float(os.environ.get("IMAGESMITH_RETENTION_INTERVAL_S", "3600"))
        threading.Thread(target=run_periodically, args=(settings, store, threading.Event()),
                         kwargs={"interval_s": interval}, daemon=True).start()
        print(f"retention on: every {interval:g} s (imagesmith admin retention --dry-run shows what it deletes)",
              file=sys.stderr)
    if auth:
        print("auth on: every route but /healthz and /readyz needs 'Authorization: Bearer <token>' "
              "(imagesmith users add NAME; imagesmith tokens create NAME)", file=sys.stderr)
    # uvicorn takes SIGTERM/SIGINT while it runs (stops accepting, answers what is in flight), then restores these
    # handlers and raises the signal again: so the workers hear it after the HTTP side has stopped
    _stop_gracefully_on_signals(local)
    if comfy_frontend:
        print(f"ComfyUI's frontend: http://{host}:{port}/comfy/", file=sys.stderr)
    uvicorn.run(create_app(settings, store, require_auth=auth, server_stop=api_server_stop,
                           comfy_frontend=comfy_frontend), host=host, port=port,
                log_level="info")
    for w in local:
        w.shutdown()
    for t in threads:
        t.join(timeout=120)


users_app = typer.Typer(no_args_is_help=True, help="Service users.")
app.add_typer(users_app, name="users")
tokens_app = typer.Typer(no_args_is_help=True, help="Service API tokens (stored hashed).")
app.add_typer(tokens_app, name="tokens")


queue_app = typer.Typer(no_args_is_help=True, help="The service's job queue as a whole: pause, resume, export.")
app.add_typer(queue_app, name="queue")


def _queue_line(state: dict) -> str:
    depth = ", ".join(f"{k} {v}" for k, v in sorted(state["depth"].items())) or "empty"
    if not state["paused"]:
        return f"queue running ({depth})"
    why = f": {state['reason']}" if state.get("reason") else ""
    return f"queue PAUSED by {state['changed_by']}{why} ({depth}); workers claim nothing until 'imagesmith queue resume'"


@queue_app.command("status")
def queue_status(as_json: bool = typer.Option(False, "--json", help="print the state as JSON")):
    """Whether the queue is paused, and how many jobs are in each state."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    state = default_store(Settings.from_env()).queue_state()
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("pause")
def queue_pause(reason: Optional[str] = typer.Option(None, "--reason", help="shown to whoever looks"),
                as_json: bool = typer.Option(False, "--json")):
    """Workers claim nothing until resumed; jobs are still accepted and wait; running jobs finish. Durable."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    state = default_store(Settings.from_env()).set_paused(True, by=os.environ.get("USER") or "cli", reason=reason)
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("resume")
def queue_resume(as_json: bool = typer.Option(False, "--json")):
    """Let workers claim jobs again."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    state = default_store(Settings.from_env()).set_paused(False, by=os.environ.get("USER") or "cli")
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("export")
def queue_export(output: Path = typer.Argument(..., help="JSON file to write ('-': stdout)"),
                 user: Optional[str] = typer.Option(None, "--user", help="only this user's jobs (default: all)")):
    """Every unfinished job as a JSON document that POST /v1/queue/import takes back (here or on another server)."""
    from ..core.settings import Settings
    from ..serve.app import default_store, export_queue_doc
    settings = Settings.from_env()
    doc = export_queue_doc(default_store(settings), settings, user=user)
    text = json.dumps(doc, indent=1)
    if str(output) == "-":
        print(text)
        return
    if not output.parent.is_dir() or output.is_dir():
        raise _Exit(f"cannot write {output}: give a file in an existing folder")
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(output)  # never a partial file
    print(f"{len(doc['jobs'])} unfinished jobs -> {output}", file=sys.stderr)


@users_app.command("add")
def users_add(name: str, admin: bool = typer.Option(False, "--admin", help="sees every user's jobs and files")):
    """Add a user to the service's job store."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    user = default_store(Settings.from_env()).add_user(name, "admin" if admin else "user")
    print(f"user {user['name']} ({user['role']})")


@tokens_app.command("create")
def tokens_create(user: str):
    """Create an API token for USER; it is printed once and stored only as a hash."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    print(default_store(Settings.from_env()).create_token(user))


@app.command("worker")
def worker_cmd(lease: float = typer.Option(30.0, "--lease", min=1.0, help="seconds a claimed job is leased for; a "
                                           "dead worker's job runs again after it (heartbeats renew it)"),
               batch: Optional[int] = typer.Option(None, "--batch", min=1, max=64, help="most compatible txt2img "
                                                   "jobs one pipeline call takes (default IMAGESMITH_WORKER_BATCH "
                                                   "or 4; 1: off)")):
    """Run a worker against the job store (IMAGESMITH_DATABASE_URL, default the home's SQLite)."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    from ..serve.worker import Worker
    settings = Settings.from_env()
    w = Worker(default_store(settings), settings, lease_s=lease, batch=batch)
    print(f"worker {w.id} on {w.store.url.split('://')[0]} (batches of up to {w.batch})", file=sys.stderr)
    _stop_gracefully_on_signals([w])
    w.run_forever()
    print(f"worker {w.id} stopped", file=sys.stderr)


def _stop_gracefully_on_signals(workers: list) -> None:
    """SIGTERM/SIGINT: each worker finishes its current step, hands its job back to the queue and stops."""
    import signal

    def stop(signum, frame) -> None:
        print(f"{signal.Signals(signum).name}: stopping after the current step; running jobs go back to the queue",
              file=sys.stderr)
        for w in workers:
            w.shutdown()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


admin_app = typer.Typer(no_args_is_help=True, help="Service administration: disk use per user, retention.")
app.add_typer(admin_app, name="admin")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@admin_app.command("disk")
def admin_disk(as_json: bool = typer.Option(False, "--json", help="machine-readable")):
    """Disk used per user: job output folders and uploads."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    from ..serve.retention import disk_use
    settings = Settings.from_env()
    use = disk_use(settings, default_store(settings))
    if as_json:
        print(json.dumps(use, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"disk use under {settings.home}")
    for col in ("user", "jobs", "outputs", "uploads", "upload files", "total"):
        table.add_column(col, justify="left" if col == "user" else "right")
    for user, r in use["users"].items():
        table.add_row(user, str(r["jobs"]), _size(r["outputs_bytes"]), str(r["uploads"]), _size(r["uploads_bytes"]),
                      _size(r["total_bytes"]))
    Console().print(table)
    orphans = use["unowned_output_folders"]
    if orphans["count"]:
        print(f"{orphans['count']} output folder(s) without a job row: {_size(orphans['bytes'])}")


@admin_app.command("retention")
def admin_retention(max_age_days: Optional[float] = typer.Option(None, "--max-age-days",
                                                                 help="default IMAGESMITH_RETENTION_DAYS"),
                    max_gb_per_user: Optional[float] = typer.Option(None, "--max-gb-per-user",
                                                                    help="default IMAGESMITH_RETENTION_GB_PER_USER"),
                    dry_run: bool = typer.Option(False, "--dry-run", help="say what would go; delete nothing"),
                    as_json: bool = typer.Option(False, "--json", help="machine-readable report")):
    """Delete finished jobs' outputs and unused uploads (with their rows) by age, and per user oldest first down
    to a size cap. Queued and running jobs, and the uploads they will read, are never touched."""
    from ..core.settings import Settings
    from ..serve.app import default_store
    from ..serve.retention import Policy, apply_retention
    settings = Settings.from_env()
    policy = Policy.make(max_age_days if max_age_days is not None else settings.retention_days,
                         max_gb_per_user if max_gb_per_user is not None else settings.retention_gb_per_user)
    if not policy.active:
        raise _Exit("no policy: give --max-age-days and/or --max-gb-per-user (or set IMAGESMITH_RETENTION_DAYS, "
                    "IMAGESMITH_RETENTION_GB_PER_USER)")
    report = apply_retention(settings, default_store(settings), policy, dry_run=dry_run)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    print(f"{verb} {len(report['deleted_jobs'])} job(s) and {len(report['deleted_uploads'])} upload(s): "
          f"{_size(report['freed_bytes'])}")
