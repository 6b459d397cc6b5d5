"""ComfyUI's API on `imagesmith serve`, driven by a real ComfyUI client from PyPI (`comfy-api-simplified` 1.6.0:
queue, wait on the WebSocket, fetch from history and /view, upload, interrupt) and by raw HTTP/WebSocket calls
shaped as ComfyUI's own example scripts send them."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

comfy = pytest.importorskip("comfy_api_simplified")
import httpx  # noqa: E402

DEFAULT = {  # ComfyUI's default graph as "Save (API)" writes it (with _meta titles), on the tiny SD1.5 model
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
          "inputs": {"seed": 5, "steps": 2, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
          "inputs": {"ckpt_name": "tiny-sd15"}},
    "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
          "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
          "inputs": {"text": "a glass bottle on a table", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"},
          "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}, "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
          "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


@pytest.fixture(scope="module")
def server(tiny_home, tmp_path_factory):
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("comfy")) as (url, store, home):
        yield url, store, home


def test_the_client_queues_waits_and_fetches_images(server, tmp_path):
    url, store, home = server
    api = comfy.ComfyApiWrapper(url)
    wf = comfy.ComfyWorkflowWrapper(copy.deepcopy(DEFAULT))
    wf.set_node_param("KSampler", "seed", 12)
    images = api.queue_and_wait_images(wf, "Save Image")
    assert len(images) == 2 and all(name.startswith("ComfyUI_") for name in images)
    for data in images.values():
        im = Image.open(io.BytesIO(data))
        assert im.size == (64, 64) and json.loads(im.info["prompt"])["3"]["inputs"]["seed"] == 12
        assert "Seed: 12" in im.info["parameters"]  # A1111 infotext too
    # the prompt is a durable imagesmith job like any other
    jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
    assert any(j["type"] == "comfy" and j["status"] == "succeeded" for j in jobs)
    # upload, then img2img from the uploaded photo
    photo = tmp_path / "photo.png"
    Image.fromarray((np.indices((72, 80)).sum(0) % 255).astype(np.uint8)).convert("RGB").save(photo)
    up = api.upload_image(photo, subfolder="mine")
    assert up == {"name": "photo.png", "subfolder": "mine", "type": "input"}
    img2img = copy.deepcopy(DEFAULT)
    img2img["10"] = {"class_type": "LoadImage", "_meta": {"title": "Load"}, "inputs": {"image": "mine/photo.png"}}
    img2img["11"] = {"class_type": "VAEEncode", "_meta": {"title": "Enc"}, "inputs": {"pixels": ["10", 0],
                                                                                       "vae": ["4", 2]}}
    img2img["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    out = api.queue_and_wait_images(comfy.ComfyWorkflowWrapper(img2img), "Save Image")
    assert [Image.open(io.BytesIO(b)).size for b in out.values()] == [(80, 72)]
    assert "CheckpointLoaderSimple" in api.get_object_info()
    assert api.get_object_info("KSampler")["KSampler"]["output"] == ["LATENT"]
    stats = api.get_system_stats()
    assert stats["system"]["comfyui_version"] and stats["devices"]
    assert isinstance(api.get_embeddings(), list)
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    api.interrupt()  # nothing running: a no-op, as in ComfyUI


def test_raw_calls_as_comfyuis_example_scripts_make_them(server):
    url, store, home = server
    # ComfyUI's websockets_api_example.py: urllib, form-encoded content type, JSON body
    body = json.dumps({"prompt": DEFAULT, "client_id": "abc"}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/prompt", data=body)) as r:
        queued = json.loads(r.read())
    assert set(queued) == {"prompt_id", "number", "node_errors"} and queued["node_errors"] == {}
    pid = queued["prompt_id"]
    for _ in range(600):
        hist = httpx.get(f"{url}/history/{pid}").json()
        if hist:
            break
        asyncio.run(asyncio.sleep(0.05))
    entry = hist[pid]
    assert entry["status"]["completed"] and entry["status"]["status_str"] == "success"
    assert entry["prompt"][1] == pid and entry["prompt"][2] == DEFAULT and entry["prompt"][4] == ["9"]
    image = entry["outputs"]["9"]["images"][0]
    r = httpx.get(f"{url}/api/view", params=image)  # the frontend's /api prefix
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    for params, media, mode in (({"preview": "webp;80"}, "image/webp", "RGB"), ({"preview": "jpeg;70"}, "image/jpeg",
                                                                               "RGB"),
                                ({"channel": "rgb"}, "image/png", "RGB"), ({"channel": "a"}, "image/png", "RGBA")):
        r = httpx.get(f"{url}/view", params={**image, **params})  # the frontend's preview and channel options
        assert r.status_code == 200 and r.headers["content-type"] == media, params
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (64, 64) and im.mode == mode
    assert pid in httpx.get(f"{url}/history", params={"max_items": 50}).json()
    assert httpx.get(f"{url}/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    # unknown ids: 404 (ComfyUI answers {}); bad prompts: ComfyUI's 400 shapes; paths are refused as names
    assert httpx.get(f"{url}/history/nope").status_code == 404
    bad = copy.deepcopy(DEFAULT)
    bad["3"]["inputs"]["sampler_name"] = "nope"
    r = httpx.post(f"{url}/prompt", json={"prompt": bad})
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_outputs_failed_validation"
    assert r.json()["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"
    r = httpx.post(f"{url}/api/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "missing_node_type"
    for params in ({"filename": "../jobs.db", "type": "output"}, {"filename": "x.png", "subfolder": "../..",
                                                                    "type": "output"},
                   {"filename": "x.png", "type": "secret"}):
        r = httpx.get(f"{url}/view", params=params)
        assert 400 <= r.status_code < 500 and "error" in r.json()
    for raw in (b"", b"[1]", b"{nope", json.dumps({"prompt": "x"}).encode()):
        r = httpx.post(f"{url}/prompt", content=raw)
        assert 400 <= r.status_code < 500, raw
    # history clear: the entries go, the images stay
    httpx.post(f"{url}/history", json={"delete": [pid]})
    assert httpx.get(f"{url}/history/{pid}").status_code == 404
    assert httpx.get(f"{url}/view", params=image).status_code == 200


def test_websocket_messages_in_comfyuis_order(server):
    import websockets
    url, store, home = server
    ws_url = url.replace("http://", "ws://") + "/ws?clientId=me"

    async def run():
        got = []
        async with websockets.connect(ws_url) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "status" and first["data"]["sid"] == "me"
            prompt = copy.deepcopy(DEFAULT)
            prompt["3"]["inputs"]["seed"] = 99
            pid = httpx.post(f"{url}/prompt", json={"prompt": prompt, "client_id": "me"}).json()["prompt_id"]
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
                got.append(msg)
                if msg["type"] == "executing" and msg["data"]["node"] is None:
                    break
        return pid, got
    pid, got = asyncio.run(run())
    kinds = [m["type"] for m in got if m["type"] not in ("status", "feature_flags")]
    assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"]
    assert all(m["data"]["prompt_id"] == pid for m in got if m["type"].startswith("execut"))
    executed = [m for m in got if m["type"] == "executed"]
    assert executed and executed[0]["data"]["node"] == "9" and len(executed[0]["data"]["output"]["images"]) == 2
    assert "execution_cached" in kinds


def test_auth_and_each_users_own_prompts_and_files(tiny_home, tmp_path_factory):
    """Off loopback every route needs a token; ComfyUI clients that cannot send a header put ?token= on /ws and
    /view; a user never sees another's prompts, history or images."""
    import websockets
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("comfy-auth"), require_auth=True) as (url, store, home):
        store.add_user("ann")
        store.add_user("bob")
        ann, bob = store.create_token("ann"), store.create_token("bob")
        as_ann, as_bob = {"Authorization": f"Bearer {ann}"}, {"Authorization": f"Bearer {bob}"}
        assert httpx.post(f"{url}/prompt", json={"prompt": DEFAULT}).status_code == 401
        assert httpx.get(f"{url}/object_info").status_code == 401
        pid = httpx.post(f"{url}/prompt", json={"prompt": DEFAULT}, headers=as_ann).json()["prompt_id"]
        for _ in range(600):
            hist = httpx.get(f"{url}/history/{pid}", headers=as_ann).json()
            if hist:
                break
            asyncio.run(asyncio.sleep(0.05))
        image = hist[pid]["outputs"]["9"]["images"][0]
        assert httpx.get(f"{url}/history/{pid}", headers=as_bob).status_code == 404
        assert pid not in httpx.get(f"{url}/history", headers=as_bob).json()
        assert httpx.get(f"{url}/view", params=image, headers=as_bob).status_code == 404  # bob's own folder
        assert httpx.get(f"{url}/view", params=image).status_code == 401
        assert httpx.get(f"{url}/view", params={**image, "token": ann}).status_code == 200
        assert httpx.get(f"{url}/history/{pid}", params={"token": ann}).status_code == 401  # only /ws and /view

        async def hello(token):
            async with websockets.connect(url.replace("http://", "ws://") + f"/ws?clientId=x&token={token}") as ws:
                return json.loads(await ws.recv())["type"]
        assert asyncio.run(hello(ann)) == "status"
        with pytest.raises(Exception):
            asyncio.run(hello("ism_wrong"))


def test_a_prompt_survives_the_server_going_away(tiny_home, tmp_path_factory):
    """A queued prompt is a durable job: the server that took it stops with no worker having run it; a new worker
    on the same database runs it later, and its history and image are there."""
    from fastapi.testclient import TestClient

    from fixtures.tiny import home_with_tiny_sd15
    from imagesmith.engine.generate import Engine
    from imagesmith.serve.app import create_app
    from imagesmith.serve.store import JobStore
    from imagesmith.serve.worker import Worker
    home = tmp_path_factory.mktemp("comfy-durable")
    settings = home_with_tiny_sd15(home, tiny_home)
    url = f"sqlite:///{home / 'jobs.db'}"
    first = TestClient(create_app(settings, JobStore(url), safety=False))
    pid = first.post("/prompt", json={"prompt": DEFAULT, "client_id": "c"}).json()["prompt_id"]
    assert first.get("/queue").json()["queue_pending"][0][1] == pid
    first.close()
    store = JobStore(url)  # a new process, as after a restart
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"), safety=False)
    assert worker.run_once()
    second = TestClient(create_app(settings, store, safety=False))
    entry = second.get(f"/history/{pid}").json()[pid]
    assert entry["status"]["completed"]
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 2 and all(second.get("/view", params=i).status_code == 200 for i in images)


def test_comfyscript_builds_nodes_from_object_info_and_runs_them(server):
    """ComfyScript turns /object_info into Python node classes: a wrong schema breaks it at load or at call."""
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("comfy_script")
    url, store, home = server
    script = Path(__file__).parent / "clients" / "comfy_script_default.py"
    r = subprocess.run([sys.executable, str(script), url + "/"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from imagesmith.engine.graph.nodes import NODES
    assert f"Nodes: {len(NODES)}" in r.stdout  # it built a class for every node /object_info lists
    assert "IMAGES [(64, 48), (64, 48)]" in r.stdout, r.stdout[-2000:]


CATAPULT = Path(__file__).resolve().parents[2] / ".venv" / "clients" / "catapult" / "bin" / "python"


@pytest.mark.skipif(not CATAPULT.is_file(), reason="comfy-catapult's environment is missing (make install makes it)")
def test_comfy_catapult_schedules_waits_downloads_and_cancels(server, tmp_path):
    """comfy-catapult 3.0.0 in its own environment (its pins conflict with ours): pydantic models of
    /system_stats, /object_info, /queue and /history, upload through its comfy+http:// file API, two jobs
    scheduled and awaited as futures, their images downloaded, a pending job cancelled."""
    import subprocess
    import time
    url, store, home = server
    Image.fromarray((np.indices((40, 48)).sum(0) * 3 % 255).astype(np.uint8)).convert("RGB").save(
        tmp_path / "photo.png")
    script = Path(__file__).parent / "clients" / "comfy_catapult_default.py"
    proc = subprocess.Popen([str(CATAPULT), str(script), url, "tiny-sd15", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        store.set_paused(True)  # the client's third job waits in the queue, to be cancelled there
        (tmp_path / "paused").unlink(missing_ok=True)
        out, err = proc.communicate(timeout=300)
    finally:
        store.set_paused(False)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    seen = json.loads(next(line for line in out.splitlines() if line.startswith("CATAPULT "))[9:])
    from imagesmith.engine.graph.nodes import NODES
    assert seen["nodes"] == len(NODES) and seen["devices"] >= 1
    assert seen["uploaded"] == "comfy+" + url + "/input/catapult/photo.png"
    assert seen["default"]["success"] and seen["default"]["size"] == [64, 56] and not seen["default"]["errors"]
    assert seen["img2img"]["success"] and seen["img2img"]["size"] == [48, 40]  # the upload's size
    assert seen["canceled"] == {"prompt_id": seen["canceled"]["prompt_id"], "cancelled": True,
                                "future_cancelled": True}
    assert seen["queue_after"] == {"queue_pending": [], "queue_running": []}
    assert store.get(seen["canceled"]["prompt_id"])["status"] == "canceled"
    assert seen["history_ids"] == [seen["default"]["prompt_id"]]
    for key, size in (("default", (64, 56)), ("img2img", (48, 40))):
        with Image.open(tmp_path / ("a.png" if key == "default" else "b.png")) as im:
            assert im.size == size and json.loads(im.info["prompt"])["9"]["inputs"]["filename_prefix"] == "catapult"


def test_jobs_view_as_newer_frontends_read_it(server):
    """``/api/jobs``: ComfyUI's unified queue-and-history view (frontends from 1.3x read only this). Every state
    appears with ComfyUI's names; a finished prompt carries its preview and outputs; a failed one names its node."""
    from imagesmith.serve.store import _try_claim
    url, store, home = server
    done = httpx.post(f"{url}/prompt", json={"prompt": DEFAULT, "extra_data": {"extra_pnginfo": {
        "workflow": {"id": "wf-1", "nodes": []}}}}).json()["prompt_id"]
    for _ in range(600):
        if httpx.get(f"{url}/history/{done}").json():
            break
        asyncio.run(asyncio.sleep(0.05))
    store.set_paused(True)  # no worker takes the next three: each is put in a state by hand
    try:
        ids = [httpx.post(f"{url}/api/prompt", json={"prompt": DEFAULT}).json()["prompt_id"] for _ in range(3)]
        pending, canceled, failed = ids
        httpx.post(f"{url}/queue", json={"delete": [canceled]})
        with store.sessions() as s:
            assert _try_claim(s, failed, "by-hand", 30) is not None
        view = httpx.get(f"{url}/api/jobs", params={"status": "in_progress"}).json()
        assert [j["id"] for j in view["jobs"]] == [failed] and view["jobs"][0]["status"] == "in_progress"
        store.heartbeat(failed, "by-hand", note="comfy 3 1/2")
        store.fail(failed, "by-hand", "out of memory")
        everything = httpx.get(f"{url}/api/jobs").json()
        states = {j["id"]: j["status"] for j in everything["jobs"]}
        assert {k: states[k] for k in (done, pending, canceled, failed)} == {
            done: "completed", pending: "pending", canceled: "cancelled", failed: "failed"}
        assert everything["pagination"] == {"offset": 0, "limit": len(everything["jobs"]),
                                            "total": len(everything["jobs"]), "has_more": False}
        times = [j["create_time"] for j in everything["jobs"]]
        assert times == sorted(times, reverse=True)  # newest first, as ComfyUI
        ok = next(j for j in everything["jobs"] if j["id"] == done)
        assert ok["outputs_count"] == 2 and ok["workflow_id"] == "wf-1"
        assert ok["preview_output"]["nodeId"] == "9" and ok["preview_output"]["mediaType"] == "images"
        assert ok["execution_end_time"] >= ok["execution_start_time"] >= ok["create_time"]
        r = httpx.get(f"{url}/view", params={k: ok["preview_output"][k] for k in ("filename", "subfolder", "type")})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
        bad = next(j for j in everything["jobs"] if j["id"] == failed)["execution_error"]
        assert (bad["node_id"], bad["node_type"], bad["exception_message"]) == ("3", "KSampler", "out of memory")
        # paging, filters and order, as the frontend asks for its history and queue
        page = httpx.get(f"{url}/jobs", params={"status": "completed,failed,cancelled", "limit": 1,
                                                 "offset": 1}).json()
        finished = [j["id"] for j in everything["jobs"] if j["status"] != "pending"]
        assert [j["id"] for j in page["jobs"]] == finished[1:2]
        assert page["pagination"]["total"] == len(finished) and page["pagination"]["has_more"]
        oldest = httpx.get(f"{url}/api/jobs", params={"sort_order": "asc", "limit": 1}).json()["jobs"]
        assert oldest[0]["create_time"] == min(times)
        only = httpx.get(f"{url}/api/jobs", params={"workflow_id": "wf-1"}).json()
        assert [j["id"] for j in only["jobs"]] == [done] and only["pagination"]["total"] == 1
        # one job in full: outputs, status messages, the workflow to load again
        full = httpx.get(f"{url}/api/jobs/{done}").json()
        assert full["outputs"]["9"]["images"][0]["filename"].startswith("ComfyUI_")
        assert full["workflow"]["prompt"] == DEFAULT and full["workflow"]["extra_data"]["extra_pnginfo"][
            "workflow"]["id"] == "wf-1"
        assert full["execution_status"]["status_str"] == "success"
        assert httpx.get(f"{url}/api/jobs/{pending}").json()["status"] == "pending"
        assert httpx.get(f"{url}/api/jobs/nope").status_code == 404
        for params in ({"status": "done"}, {"limit": "x"}, {"limit": "0"}, {"offset": "-1"}, {"sort_by": "name"},
                       {"sort_order": "up"}):
            r = httpx.get(f"{url}/api/jobs", params=params)
            assert 400 <= r.status_code < 500 and "error" in r.json(), params
    finally:
        httpx.post(f"{url}/queue", json={"clear": True})
        store.set_paused(False)


def test_serve_refuses_a_frontend_root_without_a_frontend(tmp_path, monkeypatch, capsys):
    from fixtures.cli import run_cli
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMAGESMITH_DATABASE_URL", raising=False)
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "serve", "--comfy-frontend-root", str(tmp_path / "empty"))
    assert code != 0 and err.count("\n") == 1 and "no index.html" in err and "Traceback" not in err
    assert not (tmp_path / "home" / "jobs.db").exists()  # refused before anything started


def test_embedding_names_in_clip_text_encode(server, tiny_models):
    """ComfyUI's ``embedding:NAME`` (the embedding_example template writes ``embedding:SDA768.pt``): /embeddings
    lists the file, the text encoder gets its vectors, and without the file the word is dropped, as ComfyUI."""
    import shutil
    url, store, home = server

    def run(text: str) -> np.ndarray:
        graph = copy.deepcopy(DEFAULT)
        graph["6"]["inputs"]["text"] = text
        graph["5"]["inputs"]["batch_size"] = 1
        pid = httpx.post(f"{url}/prompt", json={"prompt": graph}).json()["prompt_id"]
        for _ in range(600):
            hist = httpx.get(f"{url}/history/{pid}").json()
            if hist:
                break
            asyncio.run(asyncio.sleep(0.05))
        image = hist[pid]["outputs"]["9"]["images"][0]
        return np.asarray(Image.open(io.BytesIO(httpx.get(f"{url}/view", params=image).content)))

    folder = home / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models.paths["tiny-embedding"], folder / "SDA768.safetensors")
    try:
        for _ in range(100):  # the model lists are rescanned at most every 2 s
            if "SDA768" in httpx.get(f"{url}/embeddings").json():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert "SDA768" in httpx.get(f"{url}/embeddings").json()
        with_ti = run("photograph in the style of embedding:SDA768.pt girl with blonde hair")
    finally:
        (folder / "SDA768.safetensors").unlink()
    dropped = run("photograph in the style of embedding:SDA768.pt girl with blonde hair")
    written_without = run("photograph in the style of  girl with blonde hair")
    assert np.array_equal(dropped, written_without) and not np.array_equal(with_ti, dropped)
