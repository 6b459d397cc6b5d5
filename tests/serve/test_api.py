"""The HTTP API on tiny models with a real worker thread: native /v1 jobs, uploads, files, errors as JSON 4xx,
and the A1111-compatible routes driven with requests shaped like a real A1111 client's."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import torch
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker


@pytest.fixture(scope="module")
def served(tiny_home, tmp_path_factory):
    from fixtures.tiny import home_with_tiny_sd15
    home = tmp_path_factory.mktemp("served")
    settings = home_with_tiny_sd15(home, tiny_home)
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"), lease_s=10)
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    client = TestClient(create_app(settings, store, sync_timeout=120))
    yield client, store, settings
    worker.stopping.set()
    thread.join(10)


GEN = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 3, "seed": 5,
       "sampler_name": "Euler"}


def wait(client, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_native_job_lifecycle_files_and_listing(served):
    client, store, _ = served
    r = client.post("/v1/jobs", json={"type": "generate", "request": dict(GEN, batch_size=2)},
                    headers={"Idempotency-Key": "abc"})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert client.post("/v1/jobs", json={"type": "generate", "request": GEN},
                       headers={"Idempotency-Key": "abc"}).json()["job_id"] == job_id
    job = wait(client, job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and len(job["files"]) == 2
    assert [f["seed"] for f in job["files"]] == [5, 6]
    image = Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content))
    assert image.size == (64, 64) and "Seed: 5" in image.info.get("parameters", "")
    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert job_id in [j["id"] for j in listed["jobs"]] and listed["total"] >= 1


def test_bad_input_is_a_json_4xx(served):
    client, _, _ = served
    for body, status, text in (({"type": "paint", "request": {}}, 422, "unknown job type"),
                               ({"type": "generate", "request": dict(GEN, steps=0)}, 422, "steps"),
                               ({"type": "img2img", "request": GEN}, 422, "init_image"),
                               ({"type": "generate", "request": dict(GEN, init_image="/etc/passwd")}, 422,
                                "not an upload id")):
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == status and text in r.json()["error"]["message"], r.text
    r = client.get("/v1/jobs/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/v1/uploads", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422 and "error" in r.json()
    assert client.get("/v1/jobs/nope/files/0").status_code == 404


def test_upload_then_cutout_job(served):
    client, _, _ = served
    im = Image.new("RGB", (96, 96), (240, 240, 240))
    im.paste((200, 30, 30), (24, 24, 72, 72))
    upload = client.post("/v1/uploads", files={"file": ("p.png", png(im), "image/png")})
    assert upload.status_code == 201
    job = wait(client, client.post("/v1/jobs", json={"type": "cutout", "request": {"image": upload.json()["id"]}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    cut = Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content))
    a = np.asarray(cut)[..., 3]
    assert cut.mode == "RGBA" and a[48, 48] > 200 and a[4, 4] < 30


def test_a1111_client_routes(served):
    client, _, _ = served
    models = client.get("/sdapi/v1/sd-models").json()
    assert "tiny-sd15" in [m["title"] for m in models]
    assert "Euler a" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"}).json()["sd_model_checkpoint"] == "tiny-sd15"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404
    payload = {"prompt": "a red apple", "negative_prompt": "blurry", "seed": 11, "subseed": -1, "subseed_strength": 0,
               "sampler_name": "Euler a", "batch_size": 1, "n_iter": 2, "steps": 3, "cfg_scale": 7, "width": 64,
               "height": 64, "restore_faces": False, "tiling": False, "send_images": True, "save_images": False,
               "override_settings": {}, "styles": []}
    r = client.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["parameters"]["seed"] == 11
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and "Steps: 3" in info["infotexts"][0]
    first = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert first.size == (64, 64)
    r = client.post("/sdapi/v1/img2img", json={"init_images": [base64.b64encode(png(first)).decode()], "prompt": "x",
                                               "denoising_strength": 0.5, "steps": 3, "seed": 3, "width": 64,
                                               "height": 64})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)
    idle = client.get("/sdapi/v1/progress").json()  # nothing running now: A1111's idle answer
    assert idle["progress"] == 0 and idle["current_image"] is None
    assert client.get("/healthz").json() == {"ok": True} and client.get("/readyz").json()["ok"]
    listed = client.get("/v1/models").json()["models"]
    assert {"name": "tiny-sd15", "kind": "checkpoint"}.items() <= next(m for m in listed if m["name"] == "tiny-sd15").items()
    assert 'imagesmith_jobs{status="succeeded"}' in client.get("/metrics").text


def test_ad_job_makes_png_html_and_zip(served):
    client, _, _ = served
    product = Image.new("RGBA", (120, 160), (0, 0, 0, 0))
    product.paste((40, 90, 200, 255), (30, 20, 90, 140))
    pid = client.post("/v1/uploads", files={"file": ("p.png", png(product), "image/png")}).json()["id"]
    req = {"products": [pid], "concept": "on a wooden table", "headline": "Fresh drop", "cta": "Shop now",
           "formats": ["300x250"], "model": "tiny-sd15", "steps": 2, "seed": 4, "upscaler": "Lanczos"}
    job = wait(client, client.post("/v1/jobs", json={"type": "ad", "request": req}).json()["job_id"])
    assert job["status"] == "succeeded", job
    kinds = [f["kind"] for f in job["files"]]
    assert kinds == ["png", "html", "zip"]
    ad = Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content))
    assert ad.size == (300, 250)
    html = client.get(job["files"][1]["url"])
    assert html.headers["content-type"].startswith("text/html") and "Fresh drop" in html.text
    z = client.get(job["files"][2]["url"])
    assert z.headers["content-type"] == "application/zip" and z.content[:2] == b"PK"
    bad = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, formats=["2:7"])})
    assert bad.status_code == 422 and "2:7" in bad.json()["error"]["message"]
    bad = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, brand_color="red")})
    assert bad.status_code == 422
    # "this one" is checked before anything is queued, naming the field
    bad = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, product_box=[10, 10, 400, 100])})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "product_box"
    assert "outside the 120x160 image" in bad.json()["error"]["message"]
    bad = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, product_point=[5, 500])})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "product_point"
    bad = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, products=[pid, pid], product_box=[0, 0, 9, 9])})
    assert bad.status_code == 422 and "exactly one product" in bad.json()["error"]["message"]


def test_an_unclear_cutout_is_a_422_naming_product_box_before_queueing(served, monkeypatch):
    """A photo whose product cannot be separated cleanly: the ad is refused at submission (nothing queued) with
    the field that fixes it; with a box around the product the same photo is accepted."""
    import imagesmith.models.segment as seg_module
    from fixtures.cutout import ColourKeySegmenter, _cluttered
    monkeypatch.setattr(seg_module, "load_segmenter", lambda *a, **k: ColourKeySegmenter())
    client, store, _ = served
    photo, _truth = _cluttered()
    pid = client.post("/v1/uploads", files={"file": ("busy.png", png(photo), "image/png")}).json()["id"]
    before = store.depth().get("queued", 0)
    req = {"products": [pid], "concept": "marble", "headline": "Hi", "formats": ["300x250"], "model": "tiny-sd15",
           "steps": 2, "upscaler": "Lanczos"}
    bad = client.post("/v1/jobs", json={"type": "ad", "request": req})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "product_box", bad.text
    assert "could not be separated cleanly" in bad.json()["error"]["message"]
    assert store.depth().get("queued", 0) == before
    ok = client.post("/v1/jobs", json={"type": "ad", "request": dict(req, product_box=[105, 50, 195, 140])})
    assert ok.status_code == 202, ok.text
    client.post(f"/v1/jobs/{ok.json()['job_id']}/cancel")


def test_web_studio_is_served_self_contained(served):
    import re
    import shutil
    import subprocess
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for tab in ("generate", "ad", "gallery", "queue", "models"):
        assert f'id="{tab}"' in page.text
    assert 'name="viewport"' in page.text  # phone-sized screens
    js = client.get("/studio/studio.js")
    css = client.get("/studio/studio.css")
    assert js.status_code == 200 and css.status_code == 200
    # no third-party code or hosts: every URL the studio fetches is this server's API
    assert not re.search(r"https?://", js.text + css.text + page.text.replace('http-equiv', ''))
    for route in set(re.findall(r'["`](/(?:v1|sdapi/v1)/[a-z0-9/_-]*)', js.text)):
        assert route.startswith(("/v1/jobs", "/v1/uploads", "/v1/models", "/v1/queue", "/sdapi/v1/samplers")), route
    # job views carry the request, for "reuse parameters"
    job_id = client.post("/v1/jobs", json={"type": "generate", "request": GEN}).json()["job_id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["request"]["prompt"] == "a red apple"
    node = shutil.which("node")
    if node:  # the script at least parses
        path = __import__("pathlib").Path(__file__).resolve().parents[2] / "src/imagesmith/serve/static/studio.js"
        assert subprocess.run([node, "--check", str(path)], capture_output=True).returncode == 0


def test_upscale_job_and_websocket_progress(served):
    client, _, _ = served
    src = Image.new("RGB", (40, 30), (20, 120, 200))
    uid = client.post("/v1/uploads", files={"file": ("s.png", png(src), "image/png")}).json()["id"]
    assert client.post("/v1/jobs", json={"type": "upscale", "request": {"image": uid, "scale": 9}}).status_code == 422
    job_id = client.post("/v1/jobs", json={"type": "upscale",
                                           "request": {"image": uid, "scale": 2, "upscaler": "Lanczos"}}).json()["job_id"]
    with client.websocket_connect(f"/v1/jobs/{job_id}/ws") as ws:
        messages = []
        while True:
            msg = ws.receive_json()
            messages.append(msg)
            if msg["status"] in ("succeeded", "failed", "canceled"):
                break
    assert messages[-1]["status"] == "succeeded" and messages[-1]["id"] == job_id
    big = Image.open(io.BytesIO(client.get(messages[-1]["files"][0]["url"]).content))
    assert big.size == (80, 60)


def test_grid_job(served):
    client, _, _ = served
    req = {"base": dict(GEN, steps=2), "x": {"field": "cfg_scale", "values": [3, 7]},
           "y": {"field": "seed", "values": [1, 2]}}
    job = wait(client, client.post("/v1/jobs", json={"type": "grid", "request": req}).json()["job_id"])
    assert job["status"] == "succeeded", job
    grid = client.get(job["files"][0]["url"])
    meta = client.get(job["files"][1]["url"]).json()
    assert grid.headers["content-type"] == "image/png" and len(meta["cells"]) == 4
    bad = client.post("/v1/jobs", json={"type": "grid", "request": dict(req, x={"field": "steps", "values": [0]})})
    assert bad.status_code == 422


def test_safety_blocks_prompts_and_withholds_or_blurs_images(served, tiny_home):
    from imagesmith.vision.safety import SafetyGate, SafetyPolicy
    client, store, settings = served
    r = client.post("/v1/jobs", json={"type": "generate", "request": dict(GEN, prompt="explicit sexual scene")})
    assert r.status_code == 422 and "safety policy" in r.json()["error"]["message"]
    # the served worker runs the default policy: a tiny model's output is not flagged
    job = wait(client, client.post("/v1/jobs", json={"type": "generate", "request": dict(GEN, seed=10)}).json()["job_id"])
    assert job["status"] == "succeeded" and len(job["files"]) == 1
    assert "safety" not in store.get(job["id"])["result"]
    # a policy that flags everything: withheld, or blurred with the reason in the PNG
    strict = Worker(store, settings, engine=Engine(settings, device="cpu"),
                    safety=SafetyGate(SafetyPolicy(image_threshold=0.0)))
    from imagesmith.core.progress import CancelToken
    result = strict.execute({"type": "generate", "request": dict(GEN, seed=11)}, settings.home / "strict",
                            lambda e: None, CancelToken())
    assert result["files"] == [] and result["safety"]["action"] == "withhold" and result["safety"]["flagged"][0]["seed"] == 11
    blur = Worker(store, settings, engine=strict.engine,
                  safety=SafetyGate(SafetyPolicy(image_threshold=0.0, action="blur")))
    result = blur.execute({"type": "generate", "request": dict(GEN, seed=12)}, settings.home / "blur",
                          lambda e: None, CancelToken())
    saved = Image.open(result["files"][0]["path"])
    assert saved.info["imagesmith-safety"].startswith("blurred: open_nsfw score")


def test_describe_classify_and_prompt_expand_jobs(served):
    """The vision workflows as job types: the answer is in the job's result and in result.json."""
    skimage_data = pytest.importorskip("skimage.data")
    client, _, _ = served
    upload = client.post("/v1/uploads", files={"file": ("c.png", png(Image.fromarray(skimage_data.coffee())),
                                                        "image/png")}).json()["id"]
    job = wait(client, client.post("/v1/jobs", json={"type": "classify", "request": {
        "images": [upload], "imagenet": True, "top": 3}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    row = job["result"]["results"][0]
    assert row["label"] == "espresso" and len(row["probabilities"]) == 3
    saved = json.loads(client.get(job["files"][0]["url"]).content)
    assert saved["results"][0]["label"] == "espresso"
    job = wait(client, client.post("/v1/jobs", json={"type": "describe", "request": {"image": upload}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["description"]["caption"].startswith("an espresso")
    job = wait(client, client.post("/v1/jobs", json={"type": "prompt_expand", "request": {
        "request": "a white cat, 3D", "n": 3, "seed": 1}}).json()["job_id"])
    assert job["status"] == "succeeded" and len(job["result"]["prompts"]) == 3
    assert all(p["prompt"].startswith("a white cat, 3D") for p in job["result"]["prompts"])
    for bad in ({"type": "classify", "request": {"images": [upload]}},                        # no mode
                {"type": "classify", "request": {"images": [upload], "gate": "no-such-gate"}},
                {"type": "describe", "request": {"image": upload, "question": "a photo of"}},  # no captioner
                {"type": "describe", "request": {"image": upload, "captioner": "/etc"}},
                {"type": "prompt_expand", "request": {"request": ""}}):
        r = client.post("/v1/jobs", json=bad)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.text)


def test_vision_jobs_on_a_registered_transformers_clip(served):
    """classify / describe jobs take ``clip``: a registered CLIP by name, never a path; unknown ones are 404s."""
    from fixtures.tiny import build_tiny_transformers_clip
    from imagesmith.models.clip import load_clip
    client, _, settings = served
    build_tiny_transformers_clip(settings.models_dir / "clip" / "tiny-clip")
    im = Image.new("RGB", (64, 64), (220, 40, 40))
    upload = client.post("/v1/uploads", files={"file": ("r.png", png(im), "image/png")}).json()["id"]
    job = wait(client, client.post("/v1/jobs", json={"type": "classify", "request": {
        "images": [upload], "labels": ["apple", "car"], "clip": "tiny-clip"}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    row = job["result"]["results"][0]
    expected = dict(load_clip("tiny-clip", settings=settings).classify(im, ["apple", "car"]))
    assert row["model"] == "tiny-clip" and abs(row["probabilities"]["apple"] - expected["apple"]) < 1e-3
    job = wait(client, client.post("/v1/jobs", json={"type": "describe", "request": {
        "image": upload, "clip": "tiny-clip"}}).json()["job_id"])
    assert job["status"] == "succeeded" and job["result"]["description"]["clip"] == "tiny-clip", job
    r = client.post("/v1/jobs", json={"type": "classify", "request": {"images": [upload], "labels": ["a", "b"],
                                                                     "clip": "no-such-clip"}})
    assert r.status_code == 404 and "no CLIP named 'no-such-clip'" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json={"type": "describe", "request": {"image": upload, "clip": "/etc/clip"}})
    assert 400 <= r.status_code < 500 and "not a path" in r.json()["error"]["message"]


def test_restyle_job_returns_the_image_boxes_and_objects(served):
    client, _, _ = served
    im = Image.new("RGB", (128, 128), (235, 235, 240))
    im.paste((200, 30, 30), (40, 40, 88, 88))
    upload = client.post("/v1/uploads", files={"file": ("p.png", png(im), "image/png")}).json()["id"]
    job = wait(client, client.post("/v1/jobs", json={"type": "restyle", "request": {
        "photo": upload, "model": "tiny-sd15", "concept": "on a marble table", "steps": 2, "seed": 4,
        "width": 64, "height": 64, "sampler_name": "Euler"}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert [f.get("kind") for f in job["files"]] == ["png", "png", "json"]
    out = Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content))
    assert out.size == (64, 64) and job["result"]["prompt"].endswith("on a marble table")
    for o in job["result"]["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    r = client.post("/v1/jobs", json={"type": "restyle", "request": {"photo": upload, "gate": "no-such-gate"}})
    assert r.status_code == 404 or 400 <= r.status_code < 500, r.text


def test_storyboard_job_makes_sheet_pdf_manifest_and_panels(served):
    client, _, _ = served
    script = "A red car waits by the house in the rain.\n\nClose on the car: its lights blink twice at night."
    job = wait(client, client.post("/v1/jobs", json={"type": "storyboard", "request": {
        "script": script, "model": "tiny-sd15", "steps": 2, "seed": 7, "width": 64, "height": 64,
        "panel_px": 64, "sampler_name": "Euler"}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    kinds = [f.get("kind") for f in job["files"]]
    assert kinds[:3] == ["png", "pdf", "json"] and kinds[3:] == ["png", "png"]
    assert client.get(job["files"][1]["url"]).content.startswith(b"%PDF")
    assert [f["seed"] for f in job["files"][3:]] == [7, 8]
    manifest = json.loads(client.get(job["files"][2]["url"]).content)
    assert len(manifest["panels"]) == 2 and manifest["panels"][1]["shot"] == "close-up"
    for bad in ({"script": "too short."}, {"script": script, "output": "/tmp/x"},
                {"script": script, "llm": {"url": "http://example.com"}}, {"script": script, "style": "no-such-lora"}):
        r = client.post("/v1/jobs", json={"type": "storyboard", "request": bad})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.text)


def test_live_preview_of_a_running_job(tmp_path, tiny_home):
    """The worker turns latents into preview.jpg (approximate colours, no VAE); the API serves it while the job
    runs (/v1/jobs/{id}/preview, preview_url, A1111's current_image) and not after."""
    from imagesmith.core.preview import factors_for, latents_preview
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.models.house import make_registry
    from imagesmith.serve.worker import PREVIEW_NAME, job_folder
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    client = TestClient(create_app(settings, store, sync_timeout=5))
    job_id = client.post("/v1/jobs", json={"type": "generate", "request": {"prompt": "a red apple"}}).json()["job_id"]
    job = store.claim("test-worker", lease_s=30)
    assert job["id"] == job_id
    assert client.get(f"/v1/jobs/{job_id}/preview").status_code == 404  # nothing drawn yet
    # the house model's own latent->RGB fit: a red picture's latents preview as red
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"))
    worker.preview_every_s = 0.0
    write = worker._previewer(job, job_folder(settings, job))
    assert write is not None
    entry = make_registry(settings).default_checkpoint()
    matrix, unit = factors_for(entry.arch, entry.path)
    pipe = worker.engine._pipeline_entry(entry).value
    red = torch.zeros(1, 3, 128, 128)
    red[:, 0] = 0.8
    red[:, 1:] = -0.8
    with torch.no_grad():
        z = pipe.vae.encode(red.to(pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor
    write(z)
    path = job_folder(settings, job) / PREVIEW_NAME
    im = Image.open(path)
    assert im.format == "JPEG" and im.size == (128, 128)
    r, g, b = np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
    assert r > g + 60 and r > b + 60, (r, g, b)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["preview_url"] == f"/v1/jobs/{job_id}/preview"
    got = client.get(view["preview_url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg" and got.content == path.read_bytes()
    assert base64.b64decode(client.get("/sdapi/v1/progress").json()["current_image"]) == path.read_bytes()
    assert store.complete(job_id, "test-worker", {"files": []})
    assert client.get(f"/v1/jobs/{job_id}/preview").status_code == 404
    assert "preview_url" not in client.get(f"/v1/jobs/{job_id}").json()
    # SD-family models use the published factors; 16-channel latent spaces get none
    assert factors_for("sd1")[1] is False and factors_for("flux") is None
    assert latents_preview(torch.zeros(1, 16, 8, 8), factors_for("sd1")[0]) is None


def test_a1111_png_info_upscalers_and_extras(served):
    """The rest of the A1111 utility routes, shaped as a WebUI client sends them."""
    client, _, _ = served
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names[0] == "None" and "R-ESRGAN 4x+" in names and "Lanczos" in names
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "seed": 21, "steps": 2, "width": 64,
                                                  "height": 64, "sampler_name": "Euler"}).json()
    made = body["images"][0]  # a PNG with its infotext, as the client received it
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + made}).json()
    assert "Seed: 21" in info["info"] and info["items"]["Seed"] == "21" and info["items"]["Steps"] == "2"
    plain = Image.new("RGB", (32, 24), (10, 200, 30))
    assert client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(png(plain)).decode()}).json()["info"] == ""
    r = client.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(png(plain)).decode(),
                                                           "resize_mode": 0, "upscaling_resize": 2,
                                                           "upscaler_1": "Lanczos", "show_extras_results": True})
    assert r.status_code == 200, r.text
    big = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    assert big.size == (64, 48) and np.asarray(big.convert("RGB"))[24, 32].tolist() == [10, 200, 30]
    for bad in ({"image": "not base64!"}, {}):
        r = client.post("/sdapi/v1/png-info", json=bad)
        assert 400 <= r.status_code < 500 and "error" in r.json()
    r = client.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(png(plain)).decode(),
                                                           "upscaler_1": "None"})
    assert 400 <= r.status_code < 500


def test_malformed_bodies_are_4xx_not_500(served):
    """What `make fuzz` (schemathesis) found: empty or non-object JSON bodies and non-string images crashed the
    A1111 routes with 500s."""
    client, _, _ = served
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/png-info",
                  "/sdapi/v1/extra-single-image"):
        for body in (b"", b"[1, 2]", b"{not json"):
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "error" in r.json(), (route, body, r.status_code)
    r = client.post("/sdapi/v1/img2img", json={"init_images": [12345], "prompt": "x"})
    assert r.status_code == 422


def test_native_job_with_a_reference_image(served):
    """``ip_adapter`` in a native generate job: the reference as an upload id, resolved like every input image;
    a name that is not installed is a 4xx at submit or a failed job naming it, never a 500."""
    from fixtures.tiny import build_clip_vision, build_ip_adapter, build_sd15
    client, _, settings = served
    build_clip_vision(settings.models_dir / "clip_vision" / "tiny-vision")
    build_ip_adapter(build_sd15(0).unet, settings.models_dir / "ipadapter" / "tiny-ip.safetensors")
    ref = Image.fromarray((np.indices((40, 40)).sum(0) * 6 % 255).astype(np.uint8)).convert("RGB")
    upload = client.post("/v1/uploads", files={"file": ("ref.png", png(ref), "image/png")}).json()["id"]
    plain = wait(client, client.post("/v1/jobs", json={"type": "generate", "request": GEN}).json()["job_id"])
    job = wait(client, client.post("/v1/jobs", json={"type": "generate", "request": {
        **GEN, "ip_adapter": {"model": "tiny-ip", "image": upload, "weight": 1.0}}}).json()["job_id"])
    assert job["status"] == "succeeded", job
    assert "IP-Adapter" in job["files"][0]["infotext"]
    a = np.asarray(Image.open(io.BytesIO(client.get(plain["files"][0]["url"]).content)), np.int16)
    b = np.asarray(Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content)), np.int16)
    assert np.abs(a - b).max() > 8
    r = client.post("/v1/jobs", json={"type": "generate", "request": {
        **GEN, "ip_adapter": {"model": "nope", "image": upload}}})
    if r.status_code < 300:
        failed = wait(client, r.json()["job_id"])
        assert failed["status"] == "failed" and "nope" in failed["error"]
    else:
        assert 400 <= r.status_code < 500 and "nope" in r.text


def test_native_job_with_regions_and_a_controlnet_map(served, tiny_home):
    """Regional prompts through the native API (a box region and a mask region given as an upload id), and a
    ControlNet unit whose detected map the job lists beside its picture."""
    client, _, settings = served
    link = settings.models_dir / "controlnet" / "tiny-controlnet"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tiny_home.models_dir / "controlnet" / "tiny-controlnet", target_is_directory=True)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (32, 0, 64, 64))
    mask_id = client.post("/v1/uploads", files={"file": ("half.png", png(half), "image/png")}).json()["id"]
    edges = Image.new("RGB", (64, 64), "white")
    edges.paste((0, 0, 0), (16, 16, 48, 48))
    control_id = client.post("/v1/uploads", files={"file": ("c.png", png(edges), "image/png")}).json()["id"]
    plain = wait(client, client.post("/v1/jobs", json={"type": "generate", "request": GEN}).json()["job_id"])
    job = wait(client, client.post("/v1/jobs", json={"type": "generate", "request": {
        **GEN, "regions": [{"prompt": "a red apple", "box": [0, 0, 0.5, 1]},
                           {"prompt": "a green pear", "mask": mask_id, "weight": 1.5}],
        "controlnet": {"model": "tiny-controlnet", "image": control_id, "preprocessor": "canny"}}}).json()["job_id"])
    assert job["status"] == "succeeded", job.get("error")
    a = np.asarray(Image.open(io.BytesIO(client.get(plain["files"][0]["url"]).content)), np.int16)
    b = np.asarray(Image.open(io.BytesIO(client.get(job["files"][0]["url"]).content)), np.int16)
    assert np.abs(a - b).max() > 8
    assert [(m["unit"], m["preprocessor"]) for m in job["control_maps"]] == [(0, "canny")]
    edge_map = np.asarray(Image.open(io.BytesIO(client.get(job["control_maps"][0]["url"]).content)).convert("L"))
    assert edge_map.shape == (64, 64) and edge_map.max() == 255 and (edge_map == 0).mean() > 0.5
    assert client.get(f"/v1/jobs/{job['id']}/control-maps/5").status_code == 404
