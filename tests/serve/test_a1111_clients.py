"""Real A1111 clients' exact request sequences, replayed against a live `imagesmith serve` (headers, bodies and the
order of calls as each client's public source makes them; the source files are named in each test). webuiapi itself
runs in test_webuiapi.py. What the replays found is fixed in serve/api: SillyTavern's always-sent 'Basic ' header
was a 401 on a server without auth, the AIYA bot's `sampler_index`, `denoising_strength: null` and `styles: ["None"]`
were ignored or refused."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

W = H = 64


@pytest.fixture(scope="module")
def server(tiny_home, tmp_path_factory):
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("clients")) as (url, store, home):
        yield url, store


@pytest.fixture(scope="module")
def locked(tiny_home, tmp_path_factory):
    """A server that requires auth, with a user whose token a client sends as A1111 --api-auth's password."""
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("clients-auth"), require_auth=True) as (url, store, home):
        store.add_user("ann")
        yield url, "ann:" + store.create_token("ann")


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_open_webui(server, locked):
    """open-webui backend/open_webui/routers/images.py: verify the URL (GET options), list models (title and
    model_name), set the model by posting the whole options dict back with sd_model_checkpoint changed, read it
    back, then txt2img with {prompt, batch_size, width, height, steps, negative_prompt}; it reads `images` (bare
    base64) and `info`. It sends `authorization: ''` without auth, `Basic base64(user:pass)` with it."""
    for url, auth in ((server[0], ""), (locked[0], "Basic " + base64.b64encode(locked[1].encode()).decode())):
        c = httpx.Client(base_url=url, headers={"authorization": auth}, timeout=120)
        assert c.get("/sdapi/v1/options").status_code == 200  # verify_url
        models = [{"id": m["title"], "name": m["model_name"]} for m in c.get("/sdapi/v1/sd-models").json()]
        assert {"id": "tiny-sd15", "name": "tiny-sd15"} in models
        options = c.get("/sdapi/v1/options").json()
        if options["sd_model_checkpoint"] != "tiny-sd15":
            options["sd_model_checkpoint"] = "tiny-sd15"
            c.post("/sdapi/v1/options", json=options).raise_for_status()
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "batch_size": 2, "width": W, "height": H,
                                              "steps": 3, "negative_prompt": "blurry"})
        r.raise_for_status()
        res = r.json()
        assert len(res["images"]) == 2 and all(png_of(i).size == (W, H) for i in res["images"])
        info = json.loads(res["info"])
        assert len(info["all_seeds"]) == 2 and "Model: tiny-sd15" in info["infotexts"][0]
    bad = httpx.get(f"{locked[0]}/sdapi/v1/options", headers={"authorization": ""})
    assert bad.status_code == 401  # a locked server still says no to no credentials


def test_sillytavern(server):
    """SillyTavern src/endpoints/stable-diffusion.js (+ the SD extension's generateAutoImage): every call carries
    `Authorization: Basic <base64 of its auth setting>`, which is 'Basic ' when the setting is empty. ping, upscalers
    + latent upscale modes, VAEs (sd-vae, or Forge's sd-modules), samplers, schedulers, models (title), get-model,
    set-model then polling progress until progress 0 and job_count 0, generate: GET options (Forge check), then
    txt2img with its whole request body (its own url and auth fields included)."""
    url = server[0]
    # 'Basic ' arrives as 'Basic' (the trailing space is trimmed on the wire); an unset auth setting is
    # base64('undefined'), which A1111 without --api-auth ignores as well
    for header in ("Basic", "Basic " + base64.b64encode(b"undefined").decode()):
        assert httpx.get(f"{url}/sdapi/v1/options", headers={"Authorization": header}).status_code == 200  # ping
    c = httpx.Client(base_url=url, headers={"Authorization": "Basic " + base64.b64encode(b"undefined").decode()},
                     timeout=120)
    upscalers = [x["name"] for x in c.get("/sdapi/v1/upscalers").json()]
    latent = [x["name"] for x in c.get("/sdapi/v1/latent-upscale-modes").json()]
    upscalers[1:1] = latent
    assert upscalers[:2] == ["None", "Latent"] and "R-ESRGAN 4x+" in upscalers
    vaes = [c.get(p) for p in ("/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules")]
    assert any(r.status_code == 200 and isinstance(r.json(), list) for r in vaes)
    assert "Euler a" in [x["name"] for x in c.get("/sdapi/v1/samplers").json()]
    assert "karras" in [x["name"] for x in c.get("/sdapi/v1/schedulers").json()]
    models = [{"value": x["title"], "text": x["title"]} for x in c.get("/sdapi/v1/sd-models").json()]
    assert {"value": "tiny-sd15", "text": "tiny-sd15"} in models
    assert isinstance(c.get("/sdapi/v1/options").json()["sd_model_checkpoint"], str)  # get-model
    c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"}).raise_for_status()  # set-model
    for _ in range(10):
        state = c.get("/sdapi/v1/progress").json()
        if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
            break
    else:
        pytest.fail("progress never settled")
    assert "forge_preset" not in c.get("/sdapi/v1/options").json()
    body = {"url": url, "auth": "", "prompt": "a teapot", "negative_prompt": "lowres", "sampler_name": "DPM++ 2M",
            "steps": 3, "cfg_scale": 7, "width": W, "height": H, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            "save_images": True, "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False}
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert png_of(r.json()["images"][0]).size == (W, H)
    assert "Sampler: DPM++ 2M" in json.loads(r.json()["info"])["infotexts"][0]


def test_aiya_discord_bot(server):
    """Kilvoctu/aiyabot core/stablecog.py: POST /login (a Gradio route; its answer is ignored), optionally POST options
    with the model, txt2img with `sampler_index`, `denoising_strength: null`, `seed_resize_from_*: 0`, `styles:
    ["None"]` and CLIP skip in override_settings; then png-info with each image as a data: URL."""
    c = httpx.Client(base_url=server[0], timeout=120)
    c.post("/login")
    c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"}).raise_for_status()
    payload = {"prompt": "a lighthouse", "negative_prompt": "", "steps": 3, "width": W, "height": H, "cfg_scale": 7.0,
               "sampler_index": "Euler", "seed": 77, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
               "denoising_strength": None, "n_iter": 1, "styles": ["None"],
               "override_settings": {"CLIP_stop_at_last_layers": 2}}
    r = c.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    image_b64 = r.json()["images"][0]
    image = Image.open(io.BytesIO(base64.b64decode(image_b64.split(",", 1)[0])))
    assert image.size == (W, H)
    info = c.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image_b64}).json()["info"]
    assert "Seed: 77" in info and "Sampler: Euler," in info and "Clip skip: 2" in info
    init = "data:image/png;base64," + image_b64  # its img2img: init_images as data: URLs
    r = c.post("/sdapi/v1/img2img", json={**payload, "init_images": [init], "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    again = np.asarray(png_of(r.json()["images"][0]).convert("RGB"), np.int16)
    assert again.shape == (H, W, 3)
