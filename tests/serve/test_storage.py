"""Outputs reachable from any API node (serve.storage): with IMAGESMITH_OUTPUT_STORE=database a job's files are
also kept in the job store's database, so an API node that cannot see the worker's disk still serves them; and a
real two-node Ray cluster on this machine (two `ray start` nodes, the actor placed on the second with its own home)
whose output is downloaded from the API node after the worker's home is gone."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fixtures.postgres import postgres_schema
from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker

GEN = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "seed": 3,
       "sampler_name": "Euler"}


@pytest.fixture()
def pg_url():
    with postgres_schema() as url:
        if url is None:
            pytest.skip("PostgreSQL is not running on loopback")
        yield url


def node_home(root: Path, tiny_home) -> "object":
    from fixtures.tiny import home_with_tiny_sd15
    return home_with_tiny_sd15(root, tiny_home)


def test_an_api_node_serves_outputs_it_cannot_see_on_disk(tiny_home, tmp_path, pg_url):
    worker_settings = node_home(tmp_path / "worker-node", tiny_home).model_copy(update={"output_store": "database"})
    api_settings = node_home(tmp_path / "api-node", tiny_home)
    store = JobStore(pg_url)
    api = TestClient(create_app(api_settings, store, safety=False))
    job_id = api.post("/v1/jobs", json={"type": "generate", "request": GEN}).json()["job_id"]
    worker = Worker(store, worker_settings, engine=Engine(worker_settings, device="cpu"), safety=False)
    assert worker.run_once()
    job = store.get(job_id)
    entry = job["result"]["files"][0]
    assert job["status"] == "succeeded" and entry["blob"].startswith(job_id)
    original = Path(entry["path"]).read_bytes()
    shutil.rmtree(worker_settings.home / "outputs")  # as seen from another machine: the worker's disk is not here
    r = api.get(f"/v1/jobs/{job_id}/files/0")
    assert r.status_code == 200 and r.content == original and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).text["parameters"].startswith("a red apple")
    file_id = api.get(f"/v1/jobs/{job_id}").json()["files"][0]["file_id"]
    assert api.get(f"/v1/files/{file_id}").content == original
    # retention takes the database copy with the job
    from imagesmith.serve.retention import Policy, apply_retention
    apply_retention(api_settings, store, Policy(max_age_s=1.0), now=time.time() + 10)
    assert store.blob_bytes_by_user() == {}


def test_a_local_store_keeps_files_on_disk_only(tiny_home, tmp_path):
    settings = node_home(tmp_path / "home", tiny_home)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.submit("generate", GEN, model="tiny-sd15")
    Worker(store, settings, engine=Engine(settings, device="cpu"), safety=False).run_once()
    entry = store.get(job["id"])["result"]["files"][0]
    assert "blob" not in entry and Path(entry["path"]).is_file() and store.blob_bytes_by_user() == {}
    Path(entry["path"]).unlink()
    assert TestClient(create_app(settings, store, safety=False)).get(f"/v1/jobs/{job['id']}/files/0").status_code == 404


def _ray(*args: str, env: dict) -> None:
    subprocess.run([str(Path(sys.executable).with_name("ray")), *args], check=True, env=env, capture_output=True,
                   timeout=180)


DRIVER = """
import json, sys, time
import ray
from imagesmith.serve.ray_workers import start_ray_workers
from imagesmith.serve.store import JobStore
address, url, home, job_id = sys.argv[1:5]
ray.init(address=address, log_to_driver=False)
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "api_node" in n["Resources"])
nodes = len([n for n in ray.nodes() if n["Alive"]])
[actor] = start_ray_workers(address, url, home, 1, lease_s=30, resources={"node_2": 1})
status = ray.get(actor.status.remote(), timeout=120)
store, end = JobStore(url), time.time() + 240
while store.get(job_id)["status"] not in ("succeeded", "failed") and time.time() < end:
    time.sleep(0.3)
ray.get(actor.stop.remote(), timeout=60)
print(json.dumps({"nodes": nodes, "head": head, **status}))
"""


def test_a_job_run_on_another_ray_node_is_downloadable_from_the_api_node(tiny_home, tmp_path, pg_url):
    """The API node (this process) and the Ray cluster's driver (a fresh process, as a deployment's `serve --ray`
    would be) share only the PostgreSQL job store; the actor runs on the second node with its own home."""
    pytest.importorskip("ray")
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a throwaway loopback cluster without Ray 2.60's token auth (which would need its token on every node)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "IMAGESMITH_OUTPUT_STORE": "database", "IMAGESMITH_SAFETY": "0"}
    address = f"127.0.0.1:{port}"
    api_settings = node_home(tmp_path / "api-node", tiny_home)
    node2 = node_home(tmp_path / "node-2", tiny_home)  # the second node's own home: its models, its outputs
    store = JobStore(pg_url)
    api = TestClient(create_app(api_settings, store, safety=False))
    job_id = api.post("/v1/jobs", json={"type": "generate", "request": GEN}).json()["job_id"]
    _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--resources={\"api_node\": 1}", "--include-dashboard=false", "--disable-usage-stats", env=env)
    try:
        _ray("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--resources={\"node_2\": 1}", env=env)
        run = subprocess.run([sys.executable, "-c", DRIVER, address, pg_url, str(node2.home), job_id], env=env,
                             capture_output=True, text=True, timeout=420)
        assert run.returncode == 0, run.stderr[-2000:]
        status = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)
    assert status["nodes"] == 2 and status["node_id"] != status["head"] and status["home"] == str(node2.home)
    job = store.get(job_id)
    assert job["status"] == "succeeded" and job["worker"] == status["id"], job.get("error")
    assert job["result"]["files"][0]["path"].startswith(str(node2.home))  # written on node 2
    shutil.rmtree(node2.home)  # node 2's disk is not the API node's
    r = api.get(f"/v1/jobs/{job_id}/files/0")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
