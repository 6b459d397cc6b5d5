"""Uploads are owned: ``GET /v1/files/{id}`` serves an upload's PNG (and a job output by its ``file_id``) to its
owner or an admin, 404 to anyone else; jobs may only use their caller's own uploads."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker, wait_for

GEN = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "seed": 5,
       "sampler_name": "Euler"}


@pytest.fixture()
def served(tiny_home, tmp_path):
    """An authenticated server with users ann and bob and the admin root, and a worker thread."""
    from fixtures.tiny import home_with_tiny_sd15
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    tokens = {}
    for name, role in (("ann", "user"), ("bob", "user"), ("root", "admin")):
        store.add_user(name, role)
        tokens[name] = {"Authorization": f"Bearer {store.create_token(name)}"}
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"), lease_s=10)
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    yield TestClient(create_app(settings, store, require_auth=True)), store, settings, tokens
    worker.stopping.set()
    thread.join(10)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def picture() -> Image.Image:
    """An RGBA picture with structure (gradients, a square, half-transparent pixels)."""
    y, x = np.mgrid[0:30, 0:40]
    rgba = np.stack([x * 6, y * 8, (x + y) * 3, np.where(x < 20, 255, 128)], axis=-1).astype(np.uint8)
    rgba[10:20, 10:20, :3] = (250, 20, 30)
    return Image.fromarray(rgba, "RGBA")


def test_uploads_are_served_to_their_owner_and_admins_only(served):
    client, store, settings, tokens = served
    original = picture()
    r = client.post("/v1/uploads", files={"file": ("p.png", png(original), "image/png")}, headers=tokens["ann"])
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["url"] == f"/v1/files/{up['id']}" and (up["width"], up["height"]) == (40, 30)
    stored = settings.home / "uploads" / f"{up['id']}.png"
    assert up["size"] == stored.stat().st_size
    assert store.get_upload(up["id"])["user"] == "ann"
    got = client.get(up["url"], headers=tokens["ann"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    back = Image.open(io.BytesIO(got.content))
    assert back.mode == "RGBA" and np.array_equal(np.asarray(back), np.asarray(original))  # every pixel, alpha too
    assert got.content == stored.read_bytes()
    other = client.get(up["url"], headers=tokens["bob"])
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    missing = client.get(f"/v1/files/{'0' * 32}", headers=tokens["bob"])
    assert missing.status_code == 404 and missing.json() == {"error": {"code": "not_found", "message":
                                                                       f"no upload {'0' * 32}"}}
    assert other.json()["error"]["message"] == f"no upload {up['id']}"  # the same answer: existence is not told
    admin = client.get(up["url"], headers=tokens["root"])
    assert admin.status_code == 200 and admin.content == got.content
    assert client.get(up["url"]).status_code == 401
    for bad in ("nope", up["id"].upper(), up["id"] + "0", "..%2F..%2Fjobs.db", f"{up['id'][:-1]}g"):
        r = client.get(f"/v1/files/{bad}", headers=tokens["ann"])
        assert 400 <= r.status_code < 500 and r.status_code != 404, (bad, r.status_code)
        assert r.json()["error"]["code"] == "bad_request", bad


def test_each_user_lists_their_own_uploads_and_the_admin_all(served):
    client, _, _, tokens = served
    ids = {who: [client.post("/v1/uploads", files={"file": ("p.png", png(picture()), "image/png")},
                             headers=tokens[who]).json()["id"] for _ in range(n)] for who, n in (("ann", 3), ("bob", 1))}
    page = client.get("/v1/uploads?limit=2", headers=tokens["ann"]).json()
    assert page["total"] == 3 and len(page["uploads"]) == 2 and page["uploads"][0]["id"] == ids["ann"][-1]  # newest
    rest = client.get("/v1/uploads?limit=2&offset=2", headers=tokens["ann"]).json()["uploads"]
    assert {u["id"] for u in page["uploads"] + rest} == set(ids["ann"]) and all(u["user"] == "ann" for u in rest)
    assert [u["id"] for u in client.get("/v1/uploads", headers=tokens["bob"]).json()["uploads"]] == ids["bob"]
    everyone = client.get("/v1/uploads", headers=tokens["root"]).json()
    assert everyone["total"] == 4 and {u["user"] for u in everyone["uploads"]} == {"ann", "bob"}
    assert all(u["url"] == f"/v1/files/{u['id']}" for u in everyone["uploads"])
    r = client.get("/v1/uploads?limit=0", headers=tokens["ann"])
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "bad_request"
    assert client.get("/v1/uploads").status_code == 401


def test_jobs_can_only_use_their_callers_uploads(served):
    client, store, _, tokens = served
    ann_upload = client.post("/v1/uploads", files={"file": ("p.png", png(picture().convert("RGB")), "image/png")},
                             headers=tokens["ann"]).json()["id"]
    for job in ({"type": "img2img", "request": dict(GEN, init_image=ann_upload)},
                {"type": "cutout", "request": {"image": ann_upload}},
                {"type": "classify", "request": {"images": [ann_upload], "imagenet": True}},
                {"type": "generate", "request": dict(GEN, controlnet={"model": "x", "image": ann_upload})}):
        r = client.post("/v1/jobs", json=job, headers=tokens["bob"])
        assert r.status_code == 404 and r.json()["error"] == {"code": "not_found",
                                                              "message": f"no upload {ann_upload}"}, (job, r.text)
    assert store.list()[1] == 0  # nothing was queued
    r = client.post("/v1/jobs", json={"type": "cutout", "request": {"image": ann_upload}}, headers=tokens["ann"])
    assert r.status_code == 202
    r = client.post("/v1/jobs", json={"type": "cutout", "request": {"image": ann_upload}}, headers=tokens["root"])
    assert r.status_code == 202
    r = client.post("/v1/jobs", json={"type": "cutout", "request": {"image": 12}}, headers=tokens["ann"])
    assert r.status_code == 422 and "not an upload id" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json={"type": "generate", "request": dict(GEN, controlnet={
        "model": "x", "image": "/etc/hosts"})}, headers=tokens["root"])  # a path, even for an admin
    assert r.status_code == 422 and "not an upload id" in r.json()["error"]["message"]


def test_an_upload_stored_before_uploads_had_owners_is_for_admins_only(served):
    client, _, settings, tokens = served
    legacy = "5e" * 16
    (settings.home / "uploads").mkdir(exist_ok=True)
    picture().save(settings.home / "uploads" / f"{legacy}.png")  # a file with no record
    assert client.get(f"/v1/files/{legacy}", headers=tokens["ann"]).status_code == 404
    r = client.get(f"/v1/files/{legacy}", headers=tokens["root"])
    assert r.status_code == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))),
                                                   np.asarray(picture()))


def test_job_outputs_by_file_id(served):
    client, store, _, tokens = served
    job_id = client.post("/v1/jobs", json={"type": "generate", "request": dict(GEN, batch_size=2)},
                         headers=tokens["ann"]).json()["job_id"]
    assert wait_for(store, job_id, timeout=120)["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}", headers=tokens["ann"]).json()
    assert [f["file_id"] for f in job["files"]] == [f"{job_id}-0", f"{job_id}-1"]
    for k, f in enumerate(job["files"]):
        by_id = client.get(f"/v1/files/{f['file_id']}", headers=tokens["ann"])
        by_url = client.get(f["url"], headers=tokens["ann"])
        assert by_id.status_code == 200 and by_id.headers["content-type"] == "image/png"
        assert by_id.content == by_url.content
        assert f"Seed: {5 + k}" in Image.open(io.BytesIO(by_id.content)).info["parameters"]
    assert client.get(f"/v1/files/{job_id}-0", headers=tokens["bob"]).status_code == 404
    admin = client.get(f"/v1/files/{job_id}-1", headers=tokens["root"])
    assert admin.status_code == 200 and admin.content == by_url.content
    r = client.get(f"/v1/files/{job_id}-2", headers=tokens["ann"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}/files/1", headers=tokens["bob"]).status_code == 404
