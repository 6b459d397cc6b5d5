"""Pausing, resuming, exporting and importing the service's queue over HTTP (admin-only where it acts on
everyone's jobs), with a real worker on the tiny SD1.5 model, and the `imagesmith queue` CLI."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker

from fixtures.cli import run_cli

GEN = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "seed": 5,
       "sampler_name": "Euler"}


@pytest.fixture()
def home(tiny_home, tmp_path):
    from fixtures.tiny import home_with_tiny_sd15
    return home_with_tiny_sd15(tmp_path / "home", tiny_home)


def test_pause_holds_jobs_until_resume_and_only_an_admin_may(home):
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    store.add_user("root", "admin")
    store.add_user("ann")
    root, ann = store.create_token("root"), store.create_token("ann")
    client = TestClient(create_app(home, store, require_auth=True))
    as_root, as_ann = ({"Authorization": f"Bearer {t}"} for t in (root, ann))
    r = client.post("/v1/queue/pause", json={"reason": "driver update"}, headers=as_ann)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.post("/v1/queue/pause", json={"reason": 5}, headers=as_root).status_code == 422
    state = client.post("/v1/queue/pause", json={"reason": "driver update"}, headers=as_root).json()
    assert state["paused"] and state["changed_by"] == "root" and state["reason"] == "driver update"
    job = client.post("/v1/jobs", json={"type": "generate", "request": GEN}, headers=as_ann)
    assert job.status_code == 202  # still accepted while paused
    job_id = job.json()["job_id"]
    worker = Worker(store, home, engine=Engine(home, device="cpu"), lease_s=10)
    assert worker.run_once() is False  # nothing is claimed
    assert client.get(f"/v1/jobs/{job_id}", headers=as_ann).json()["status"] == "queued"
    seen = client.get("/v1/queue", headers=as_ann).json()
    assert seen["paused"] and seen["depth"] == {"queued": 1}
    assert client.post("/v1/queue/resume", headers=as_ann).status_code == 403
    assert client.post("/v1/queue/resume", headers=as_root).json()["paused"] is False
    assert worker.run_once() is True
    assert client.get(f"/v1/jobs/{job_id}", headers=as_ann).json()["status"] == "succeeded"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def test_export_refers_to_uploads_by_id_and_import_validates_everything_first(home, tmp_path, tiny_home):
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    client = TestClient(create_app(home, store))
    upload = client.post("/v1/uploads", files={"file": ("p.png", _png(), "image/png")}).json()["id"]
    client.post("/v1/queue/pause")
    ids = [client.post("/v1/jobs", json={"type": t, "request": r}).json()["job_id"] for t, r in (
        ("generate", GEN), ("img2img", dict(GEN, init_image=upload, denoising_strength=0.5)))]
    doc = client.get("/v1/queue/export").json()
    assert [j["id"] for j in doc["jobs"]] == ids
    assert doc["jobs"][1]["request"]["init_image"] == upload  # an id, never a server path
    again = client.post("/v1/queue/import", json=doc).json()  # the same server: nothing twice
    assert again == {"imported": 0, "existing": 2, "imported_ids": [], "existing_ids": ids}

    from fixtures.tiny import home_with_tiny_sd15
    other_home = home_with_tiny_sd15(tmp_path / "other", tiny_home)
    other = JobStore(f"sqlite:///{other_home.home / 'jobs.db'}")
    remote = TestClient(create_app(other_home, other))
    r = remote.post("/v1/queue/import", json=doc)  # the upload is not on that server: nothing is imported
    assert r.status_code == 404 and "upload" in r.json()["error"]["message"] and other.depth() == {}
    assert remote.post("/v1/queue/import", json={"jobs": "x"}).status_code == 422
    assert remote.post("/v1/queue/import", content=b"not json").status_code == 422
    doc["jobs"] = doc["jobs"][:1]
    out = remote.post("/v1/queue/import", json=doc).json()
    assert out["imported"] == 1 and out["existing"] == 0 and out["imported_ids"] == ids[:1]
    assert Worker(other, other_home, engine=Engine(other_home, device="cpu"), lease_s=10).run_once()
    assert remote.get(f"/v1/jobs/{ids[0]}").json()["status"] == "succeeded"


def test_queue_cli(home, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    job, _ = store.submit("generate", GEN, priority=3)
    code, out, _ = run_cli(capsys, "queue", "pause", "--reason", "maintenance")
    assert code == 0 and "PAUSED" in out and "maintenance" in out and store.claim("w") is None
    code, out, _ = run_cli(capsys, "queue", "status", "--json")
    assert code == 0 and json.loads(out)["paused"] is True and json.loads(out)["depth"] == {"queued": 1}
    code, _, err = run_cli(capsys, "queue", "export", str(tmp_path / "q.json"))
    saved = json.loads((tmp_path / "q.json").read_text())
    assert code == 0 and [j["id"] for j in saved["jobs"]] == [job["id"]] and saved["jobs"][0]["priority"] == 3
    code, _, err = run_cli(capsys, "queue", "export", str(tmp_path / "missing" / "q.json"))
    assert code != 0 and "existing folder" in err and not (tmp_path / "missing").exists()
    code, out, _ = run_cli(capsys, "queue", "resume")
    assert code == 0 and "running" in out and store.claim("w")["id"] == job["id"]


def test_requeue_is_for_admins_and_answers_404_and_409(home):
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}", max_attempts=1)
    store.add_user("root", "admin")
    store.add_user("ann")
    root, ann = store.create_token("root"), store.create_token("ann")
    client = TestClient(create_app(home, store, require_auth=True))
    as_root, as_ann = ({"Authorization": f"Bearer {t}"} for t in (root, ann))
    job, _ = store.submit("generate", {"prompt": "x"}, user="ann")
    assert client.post(f"/v1/queue/jobs/{job['id']}/requeue", headers=as_root).status_code == 409  # queued
    store.claim("w", lease_s=0.01)
    import time
    time.sleep(0.05)
    store.requeue_expired()
    assert store.get(job["id"])["status"] == "failed"
    assert client.post(f"/v1/queue/jobs/{job['id']}/requeue", headers=as_ann).status_code == 403
    r = client.post(f"/v1/queue/jobs/{job['id']}/requeue", headers=as_root)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    missing = client.post("/v1/queue/jobs/nope/requeue", headers=as_root)
    assert missing.status_code == 404 and "error" in missing.json()


def test_a1111_options_are_per_user_durable_and_defaults_for_their_requests(home, tiny_home):
    """POST /sdapi/v1/options is the caller's own (another user's options are untouched), survives a restart of the
    API (a new app on the same database), and its picture-deciding values apply to that user's later requests."""
    import json as _json
    (home.models_dir / "checkpoints" / "tiny-sdxl").symlink_to(tiny_home.models_dir / "checkpoints" / "tiny-sdxl",
                                                              target_is_directory=True)
    db = f"sqlite:///{home.home / 'jobs.db'}"
    store = JobStore(db)
    store.add_user("ann")
    store.add_user("bob")
    ann, bob = ({"Authorization": f"Bearer {store.create_token(u)}"} for u in ("ann", "bob"))
    client = TestClient(create_app(home, store, require_auth=True, sync_timeout=120))
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl", "CLIP_stop_at_last_layers": 2,
                                               "eta_noise_seed_delta": 31337, "show_progressbar": True}, headers=ann)
    assert r.status_code == 200 and r.json()["sd_model_checkpoint"] == "tiny-sdxl" and r.json()["show_progressbar"]
    for bad in ({"sd_model_checkpoint": "nope"}, {"CLIP_stop_at_last_layers": 0}, {"randn_source": "NV"},
                {"eta_noise_seed_delta": -1}, {"sd_vae": "no-such-vae"}):
        r = client.post("/sdapi/v1/options", json=bad, headers=ann)
        assert 400 <= r.status_code < 500 and "error" in r.json(), bad
    assert client.get("/sdapi/v1/options", headers=ann).json()["CLIP_stop_at_last_layers"] == 2  # nothing half-saved
    assert client.get("/sdapi/v1/options", headers=bob).json()["sd_model_checkpoint"] != "tiny-sdxl"
    restarted = TestClient(create_app(home, JobStore(db), require_auth=True, sync_timeout=120))
    assert restarted.get("/sdapi/v1/options", headers=ann).json()["eta_noise_seed_delta"] == 31337
    from imagesmith.engine.generate import Engine
    from imagesmith.serve.worker import Worker
    import threading
    worker = Worker(JobStore(db), home, engine=Engine(home, device="cpu"), lease_s=30)
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    try:
        body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 1}
        info = _json.loads(restarted.post("/sdapi/v1/txt2img", json=body, headers=ann).json()["info"])["infotexts"][0]
        assert "Model: tiny-sdxl" in info and "Clip skip: 2" in info and "ENSD: 31337" in info
        mine = {**body, "override_settings": {"CLIP_stop_at_last_layers": 1}}  # the request's own setting wins
        info = _json.loads(restarted.post("/sdapi/v1/txt2img", json=mine, headers=ann).json()["info"])["infotexts"][0]
        assert "Clip skip" not in info and "Model: tiny-sdxl" in info
        info = _json.loads(restarted.post("/sdapi/v1/txt2img", json=body, headers=bob).json()["info"])["infotexts"][0]
        assert "Model: tiny-sdxl" not in info and "ENSD" not in info  # bob's requests: the server's defaults
    finally:
        worker.stopping.set()
        thread.join(10)


def test_unload_and_reload_checkpoint_reach_the_worker(tiny_home, tmp_path):
    """A1111's unload-checkpoint / reload-checkpoint: a durable server-wide request that each worker follows
    between jobs (models dropped; the default warmed up again); a request older than the worker is history."""
    from fixtures.tiny import home_with_tiny_sd15
    from imagesmith.engine.generate import Engine
    from imagesmith.serve.store import JobStore
    from imagesmith.serve.worker import Worker
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home).model_copy(update={"warmup_sizes": [(64, 64)]})
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.set_checkpoint_state("unloaded", by="old")
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"))
    assert worker.follow_checkpoint_state() is None  # asked before the worker existed
    worker.warm_up()
    assert worker.loaded_models()
    assert store.set_checkpoint_state("unloaded", by="admin")["state"] == "unloaded"
    assert worker.follow_checkpoint_state() == "unloaded" and worker.loaded_models() == ()
    assert worker.follow_checkpoint_state() is None  # once
    store.set_checkpoint_state("loaded", by="admin")
    assert worker.follow_checkpoint_state() == "loaded" and worker.loaded_models()
    assert JobStore(f"sqlite:///{tmp_path / 'jobs.db'}").checkpoint_state()["by"] == "admin"  # durable
