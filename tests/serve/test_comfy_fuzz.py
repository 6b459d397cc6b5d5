"""The ComfyUI routes fuzzed: 1,200 malformed or mutated prompts, queue/history bodies, /view and upload calls,
seeded so a failure reproduces. Every answer is a 2xx or a 4xx with a JSON error; never a 5xx."""

from __future__ import annotations

import copy
import json
import random
from urllib.parse import quote, urlencode

import pytest
from fastapi.testclient import TestClient

from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore

BASE = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 8.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "b", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["8", 0]}},
}
JUNK = [None, True, False, 0, -1, 2 ** 70, -2 ** 70, 1.5, float("inf"), "", "x" * 5000, "../../etc/passwd", [],
        [None], ["4"], ["4", 9], ["nope", 0], ["4", -1], ["4", 0, 0], [1, 0], ["4", "0"], {}, {"a": 1}, "\x00",
        "é", ["3", 0], ["9", 0]]


def mutate(rng: random.Random) -> object:
    prompt = copy.deepcopy(BASE)
    for _ in range(rng.randint(1, 4)):
        node_id = rng.choice(list(prompt))
        node = prompt[node_id] if isinstance(prompt[node_id], dict) else {}
        roll = rng.random()
        if roll < 0.45 and isinstance(node.get("inputs"), dict) and node["inputs"]:
            node["inputs"][rng.choice(list(node["inputs"]))] = rng.choice(JUNK)
        elif roll < 0.55:
            node["class_type"] = rng.choice(["Nope", "", None, 5, "SaveImage", "LoadImage", "KSampler"])
        elif roll < 0.65:
            node.pop(rng.choice(["inputs", "class_type"]), None)
        elif roll < 0.75 and isinstance(node.get("inputs"), dict) and node["inputs"]:
            node["inputs"].pop(rng.choice(list(node["inputs"])))
        elif roll < 0.85:
            prompt[rng.choice(["10", "", "a/b", "3"])] = rng.choice(JUNK)
        elif roll < 0.92:
            prompt[node_id] = rng.choice(JUNK)
        else:  # a long chain, or a cycle
            for i in range(rng.choice([3, 250])):
                prompt[f"c{i}"] = {"class_type": "LatentUpscaleBy", "inputs": {
                    "samples": [f"c{i - 1}" if i else rng.choice(["5", "c0"]), 0], "upscale_method": "area",
                    "scale_by": 1.0}}
    return rng.choice([prompt, prompt, prompt, {"x": prompt}, [prompt], rng.choice(JUNK)])


@pytest.fixture(scope="module")
def client(tiny_home, tmp_path_factory):
    from fixtures.tiny import home_with_tiny_sd15
    home = tmp_path_factory.mktemp("comfy-fuzz")
    settings = home_with_tiny_sd15(home, tiny_home)
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")  # no worker: valid prompts only queue
    return TestClient(create_app(settings, store, rate_per_minute=10 ** 6, safety=False), raise_server_exceptions=False)


def check(r) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
    if r.status_code >= 400:  # imagesmith's JSON error; FastAPI's own for a path no route matches
        assert "error" in r.json() or r.json() == {"detail": "Not Found"}


def test_fuzz_the_comfy_routes(client):
    rng = random.Random(20261204)
    cases = 0
    for _ in range(700):
        body = {"prompt": mutate(rng)}
        if rng.random() < 0.3:
            body.update(client_id=rng.choice(JUNK), extra_data=rng.choice(JUNK), front=rng.choice(JUNK),
                        number=rng.choice(JUNK))
        content = json.dumps(body, default=str) if rng.random() < 0.9 else rng.choice(["{", "[]", "", "null", "1"])
        check(client.post(rng.choice(["/prompt", "/api/prompt"]), content=content,
                          headers={"content-type": rng.choice(["application/json", "text/plain",
                                                               "application/x-www-form-urlencoded"])}))
        cases += 1
    for _ in range(200):
        route = rng.choice(["/queue", "/history", "/interrupt", "/free"])
        body = rng.choice([{"clear": rng.choice(JUNK)}, {"delete": rng.choice(JUNK)}, {"prompt_id": rng.choice(JUNK)},
                           {"unload_models": rng.choice(JUNK)}, rng.choice(JUNK)])
        if isinstance(body, dict) and rng.random() < 0.3:  # as a form, the way comfy-catapult posts its commands
            check(client.post(route, content=urlencode({k: str(v) for k, v in body.items()}),
                              headers={"content-type": "application/x-www-form-urlencoded"}))
        else:
            check(client.post(route, content=json.dumps(body, default=str)))
        cases += 1
    for _ in range(200):
        params = {k: str(rng.choice(JUNK)) for k in rng.sample(["filename", "subfolder", "type", "preview",
                                                                 "channel"], rng.randint(0, 5))}
        check(client.get(rng.choice(["/view", "/api/view"]), params=params))
        check(client.get(f"/history/{quote(str(rng.choice(JUNK)), safe='')}",
                         params={"max_items": str(rng.choice(JUNK))}))
        check(client.get("/history", params={"max_items": str(rng.choice(JUNK))}))
        check(client.get("/api/jobs", params={k: str(rng.choice(JUNK)) for k in rng.sample(
            ["status", "workflow_id", "sort_by", "sort_order", "limit", "offset"], rng.randint(0, 6))}))
        check(client.get(f"/api/jobs/{quote(str(rng.choice(JUNK)), safe='')}"))
        cases += 4
    for _ in range(100):
        files = {"image": (str(rng.choice(JUNK)), rng.choice([b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"0" * 64]))}
        data = {k: str(rng.choice(JUNK)) for k in rng.sample(["subfolder", "type", "overwrite", "original_ref"],
                                                             rng.randint(0, 4))}
        check(client.post(rng.choice(["/upload/image", "/upload/mask"]), files=files, data=data))
        cases += 1
    assert cases >= 1200
