"""Graceful shutdown: SIGTERM to a worker (in-process, `imagesmith worker`, `imagesmith serve`) finishes the current
step, hands the running job back to the queue at once (not after its lease, and not counted as an attempt) and
exits 0; the job then runs to the end on the next worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagesmith.engine.generate import Engine
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker, job_folder

# long enough to be caught mid-run: 100 runs of 150 steps on the tiny model (a few seconds per run)
LONG = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 150, "seed": 5,
        "sampler_name": "Euler", "batch_count": 100}


@pytest.fixture()
def home(tiny_home, tmp_path):
    from fixtures.tiny import home_with_tiny_sd15
    return home_with_tiny_sd15(tmp_path / "home", tiny_home)


def _wait(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _running_with_progress(store: JobStore, job_id: str):
    job = store.get(job_id)
    return job if job["status"] == "running" and job["progress"] > 0 else None


def _assert_returned(store: JobStore, job_id: str, lease_s: float) -> None:
    job = store.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["worker"] is None, job
    assert "shut down" in job["progress_note"]
    # back in the queue at once: a new worker claims it long before the old lease (lease_s) would have run out
    t0 = time.time()
    again = store.claim("next", lease_s=5)
    assert again is not None and again["id"] == job_id and again["attempts"] == 1 and time.time() - t0 < lease_s


def test_shutdown_returns_the_running_job_and_the_next_worker_finishes_it(home, tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("generate", {**LONG, "batch_count": 40})
    worker = Worker(store, home, engine=Engine(home, device="cpu"), lease_s=60, batch=1)
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.05})
    thread.start()
    _wait(lambda: _running_with_progress(store, job["id"]), 60, "the job to start")
    t0 = time.time()
    worker.shutdown()
    thread.join(60)
    assert not thread.is_alive() and time.time() - t0 < 30  # the current step, not the whole job
    assert not job_folder(home, {**job, "attempts": 1}).exists()  # the stopped attempt leaves no files
    _assert_returned(store, job["id"], lease_s=60)
    store.release(job["id"], "next")  # (the claim above) back once more; a short version of it runs to the end
    with store.sessions() as s:  # the same job, made short, so the next worker finishes it here quickly
        from imagesmith.serve.store import JobRow
        s.get(JobRow, job["id"]).request = {**LONG, "batch_count": 1, "steps": 3}
        s.commit()
    nxt = Worker(store, home, engine=worker.engine, lease_s=60, batch=1)
    assert nxt.run_once()
    done = store.get(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and len(done["result"]["files"]) == 1
    assert Path(done["result"]["files"][0]["path"]).is_file()


def test_release_is_only_for_the_lease_holder(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("generate", {})
    store.claim("w1", lease_s=30)
    assert not store.release(job["id"], "w2")  # not its job
    assert store.release(job["id"], "w1")
    assert not store.release(job["id"], "w1")  # queued now: nothing to release
    assert store.get(job["id"])["status"] == "queued" and store.get(job["id"])["attempts"] == 0


def _env(home) -> dict:
    return {**os.environ, "IMAGESMITH_HOME": str(home.home), "IMAGESMITH_SAFETY": "0",
            "PYTHONPATH": os.pathsep.join(sys.path), "IMAGESMITH_DATABASE_URL": f"sqlite:///{home.home / 'jobs.db'}"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from imagesmith.cli import main; main()", *args]


def test_sigterm_to_imagesmith_worker(home):
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    job, _ = store.submit("generate", LONG)
    proc = subprocess.Popen(_cli("worker", "--lease", "120", "--batch", "1"), env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _running_with_progress(store, job["id"]), 120, "the worker to start the job")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "SIGTERM: stopping after the current step" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_returned(store, job["id"], lease_s=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_imagesmith_serve_stops_accepting_and_returns_its_workers_jobs(home):
    import httpx
    port = _free_port()
    proc = subprocess.Popen(_cli("serve", "--port", str(port), "--workers", "1"), env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get_ok(f"{base}/healthz"), 120, "the server to answer")
        r = httpx.post(f"{base}/v1/jobs", json={"type": "generate", "request": LONG}, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        _wait(lambda: _running_with_progress(store, job_id), 120, "the server's worker to start the job")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-2000:]
        with pytest.raises(httpx.HTTPError):  # no longer accepting
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_returned(store, job_id, lease_s=30)


def _get_ok(url: str) -> bool:
    import httpx
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a1111_server_stop_only_when_asked_for_and_graceful(home):
    """A1111's server-stop / server-kill: a 404 unless the server was started with --api-server-stop; with it, an
    admin's call answers and the process stops gracefully (exit 0)."""
    import httpx
    port = _free_port()
    proc = subprocess.Popen(_cli("serve", "--port", str(port), "--workers", "0"), env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get_ok(f"{base}/healthz"), 120, "the server to answer")
        r = httpx.post(f"{base}/sdapi/v1/server-stop", timeout=30)
        assert r.status_code == 404 and "--api-server-stop" in r.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    port = _free_port()
    proc = subprocess.Popen(_cli("serve", "--port", str(port), "--workers", "0", "--api-server-stop"), env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get_ok(f"{base}/healthz"), 120, "the server to answer")
        r = httpx.post(f"{base}/sdapi/v1/server-kill", timeout=30)
        assert r.status_code == 200 and r.json()["stopping"] is True
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
