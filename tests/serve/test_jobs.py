"""The job-type registry (serve.jobs): one entry per type drives validation at submit, the worker's run, previews,
answers and the OpenAPI document, where POST /v1/jobs shows each type's own request schema."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from imagesmith.core.errors import BadRequest
from imagesmith.serve.app import create_app
from imagesmith.serve.jobs import JOB_TYPES, JOBS, validate_request
from imagesmith.serve.store import JobStore


@pytest.fixture()
def client(tiny_home, tmp_path):
    from fixtures.tiny import home_with_tiny_sd15
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    return TestClient(create_app(settings, JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")))


def _refs(node, out: set):
    if isinstance(node, dict):
        if "$ref" in node:
            out.add(node["$ref"])
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)
    return out


def test_openapi_shows_every_job_types_request_schema(client):
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "type"
    assert set(body["discriminator"]["mapping"]) == set(JOB_TYPES)
    schemas = doc["components"]["schemas"]
    for name, spec in JOBS.items():  # each variant's request is the type's own model, with its fields
        variant = schemas[body["discriminator"]["mapping"][name].rsplit("/", 1)[1]]
        assert variant["properties"]["type"]["const"] == name
        model = schemas[variant["properties"]["request"]["$ref"].rsplit("/", 1)[1]]
        assert set(model["properties"]) == set(spec.model.model_fields), name
    assert "cfg_scale" in schemas["GenerateRequest"]["properties"]
    missing = {r for r in _refs(doc, set()) if r.rsplit("/", 1)[1] not in schemas}
    assert missing == set()  # every reference resolves inside the document


def test_checks_run_at_submit_with_one_clear_error(client, tiny_home):
    for body, needle in (({"type": "upscale", "request": {"image": "x.png", "scale": 20}}, "scale"),
                         ({"type": "upscale", "request": {"image": "x.png", "upscaler": "Nope"}}, "upscaler"),
                         ({"type": "cutout", "request": {"image": "x.png", "extra": 1}}, "extra"),
                         ({"type": "inpaint", "request": {"prompt": "x"}}, "init_image"),
                         ({"type": "paint", "request": {}}, "unknown job type")):
        with pytest.raises(Exception) as exc:  # the registry's own check, before any upload is looked up
            validate_request(body["type"], body["request"])
        assert needle in str(exc.value)
    r = client.post("/v1/jobs", json={"type": "paint", "request": {}})
    assert r.status_code == 422 and "unknown job type" in r.json()["error"]["message"]
    with pytest.raises(BadRequest):
        validate_request("inpaint", {"prompt": "x", "init_image": "a.png"})  # no mask
    normalised, model = validate_request("upscale", {"image": "a.png"})
    assert normalised == {"image": "a.png", "scale": 4.0, "upscaler": "R-ESRGAN 4x+", "refine": None,
                          "restore_faces": None} and model is None
    assert validate_request("generate", {"prompt": "x", "model": "tiny-sd15"})[1] == "tiny-sd15"


def test_flags_are_where_they_belong():
    assert {n for n, s in JOBS.items() if s.answers} == {"describe", "classify", "prompt_expand", "restyle", "cutout",
                                                         "comfy"}
    assert {n for n, s in JOBS.items() if s.preview} == {"generate", "img2img", "inpaint", "grid", "restyle",
                                                         "storyboard"}


def test_unknown_ids_are_404_on_every_route_that_takes_one(client):
    """Every route with an id in its path answers a well-formed id that does not exist with a 404 JSON error (a new
    route is covered as soon as it exists)."""
    import re
    import uuid
    ids = {"job_id": str(uuid.uuid4()), "upload_id": uuid.uuid4().hex, "index": "0"}
    ids["file_id"] = f"{uuid.uuid4()}-0"
    checked = 0
    for path, operations in client.app.openapi()["paths"].items():  # every HTTP route, routers' included
        if "{" not in path:
            continue
        url = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: ids.get(m[1], "nope"), path)
        for method in sorted(m.upper() for m in operations):
            r = client.request(method, url, json={})
            assert r.status_code == 404 and "error" in r.json(), (method, path, r.status_code, r.text[:200])
            checked += 1
    assert checked >= 7
