"""Batching: a worker that claims a txt2img job also claims the queued jobs that can share its pipeline call
(same model, size, sampler, steps, CFG, LoRAs, ...; prompts and seeds may differ) and runs them as one batched
diffusers call. Each job keeps its own lease, cancel, attempt folder, metadata and result, and gets the pixels
it gets alone."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagesmith.engine import generate as G
from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore
from imagesmith.serve.worker import Worker, batch_key, worker_batch

BASE = {"model": "tiny-sd15", "width": 64, "height": 64, "steps": 4, "cfg_scale": 6.0, "sampler_name": "Euler a"}
COMPATIBLE = [dict(BASE, prompt="a red apple", seed=11),
              dict(BASE, prompt="a (blue:1.3) teapot in the garden", negative_prompt="blurry, watermark", seed=12),
              dict(BASE, prompt="a cat on a table", seed=13)]
OTHER = dict(BASE, prompt="a red apple", seed=14, steps=3)  # another step count: cannot share the call


@pytest.fixture(scope="module")
def engine(tiny_home, tmp_path_factory):
    from fixtures.tiny import home_with_tiny_sd15
    home = tmp_path_factory.mktemp("batching")
    settings = home_with_tiny_sd15(home, tiny_home)
    return Engine(settings, device="cpu")


@pytest.fixture()
def served(engine, tmp_path):
    """A fresh queue and API on the shared engine (its settings, so outputs land under its home)."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    client = TestClient(create_app(engine.settings, store, safety=False))
    return client, store, engine.settings


def submit(client, request: dict) -> str:
    r = client.post("/v1/jobs", json={"type": "generate", "request": request})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def pixels(client, job: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(client.get(f["url"]).content)).convert("RGB"), np.int16)
            for f in job["files"]]


def assert_same_pixels(batched: np.ndarray, solo: np.ndarray) -> None:
    """Batched and solo runs feed every image the same noise, conditioning and generator, so the pictures are the
    same; exact identity is not promised by PyTorch, though: its CPU convolutions round differently for another
    batch size (the tiny UNet's outputs differ by ~1e-6 between a batch of 2 and of 8 rows, its VAE decoder's by
    ~1e-5), which can flip an 8-bit rounding. Measured: identical at 64x64; at 256x256, with a LoRA or with the
    hires fix, up to 41 of 196,608 values one level apart. So: at most one level on under 1% of the values."""
    diff = np.abs(batched - solo)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


class _Calls:
    """Counts the engine's sampling runs and the images (rows of latents) each one made; a hires pass is a run
    of its own, recorded as minus its rows."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        real = G.K.sample

        def counted(denoiser, ms, sampler, sigmas, **kwargs):
            rows = int(kwargs["noise"].shape[0])
            self.rows.append(-rows if kwargs.get("latent") is not None else rows)
            return real(denoiser, ms, sampler, sigmas, **kwargs)
        monkeypatch.setattr(G.K, "sample", counted)


def test_compatible_jobs_share_one_call_and_match_their_solo_runs(served, engine, monkeypatch):
    client, store, settings = served
    engine.generate(G.GenerateRequest(**OTHER))  # the model loaded: the timings below are of the runs only
    calls = _Calls(monkeypatch)
    first = submit(client, COMPATIBLE[0])
    other = submit(client, OTHER)  # queued between them: the batch takes the compatible ones past it
    rest = [submit(client, r) for r in COMPATIBLE[1:]]
    ids = [first, *rest]
    keys = {store.get(i)["batch_key"] for i in ids}
    assert len(keys) == 1 and None not in keys and store.get(other)["batch_key"] not in keys
    worker = Worker(store, settings, engine=engine, batch=4, safety=False)
    start = time.perf_counter()
    assert worker.run_once()
    batched_s = time.perf_counter() - start
    assert calls.rows == [3]  # one diffusers call, three images
    assert store.get(other)["status"] == "queued"
    jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
    for k, job in enumerate(jobs):
        assert job["status"] == "succeeded", job
        assert job["batch"] == {"jobs": 3, "images": 3, "position": k}
        assert job["attempts"] == 1 and len(job["files"]) == 1
        assert job["files"][0]["seed"] == COMPATIBLE[k]["seed"]
        path = store.get(job["id"])["result"]["files"][0]["path"]
        assert f"/{job['id']}/attempt-1/" in path  # each job's own attempt folder
    assert worker.run_once()  # the incompatible job, on its own
    assert calls.rows == [3, 1]
    alone = store.get(other)
    assert alone["status"] == "succeeded" and "batch" not in alone["result"]
    # the same requests again, one by one: the same pictures and the same metadata
    solo_worker = Worker(store, settings, engine=engine, batch=1, safety=False)
    solo_ids = [submit(client, r) for r in COMPATIBLE]
    start = time.perf_counter()
    while solo_worker.run_once():
        pass
    solo_s = time.perf_counter() - start
    assert calls.rows == [3, 1, 1, 1, 1]
    solo = [client.get(f"/v1/jobs/{i}").json() for i in solo_ids]
    batched = [pixels(client, j)[0] for j in jobs]
    for k, (b, s) in enumerate(zip(batched, (pixels(client, j)[0] for j in solo))):
        assert s.shape == (64, 64, 3) and "batch" not in solo[k]
        assert_same_pixels(b, s)
        assert jobs[k]["files"][0]["infotext"] == solo[k]["files"][0]["infotext"]
        meta = Image.open(io.BytesIO(client.get(jobs[k]["files"][0]["url"]).content)).info["parameters"]
        assert f"Seed: {COMPATIBLE[k]['seed']}" in meta and "Batch size" not in meta
    assert "Negative prompt: blurry, watermark" in jobs[1]["files"][0]["infotext"]
    for a in range(3):  # three different pictures: nothing was mixed up between the jobs
        for b in range(a + 1, 3):
            assert np.abs(batched[a] - batched[b]).mean() > 3
    print(f"\nbatch of 3 (one call): {batched_s:.2f} s; 3 solo runs: {solo_s:.2f} s")


def test_a_canceled_job_in_a_batch_ends_canceled_and_the_others_succeed(served, engine, monkeypatch):
    client, store, settings = served
    ids = [submit(client, dict(r, steps=6)) for r in COMPATIBLE]
    worker = Worker(store, settings, engine=engine, batch=4, lease_s=10, heartbeat_s=0.05, safety=False)
    started, go = threading.Event(), threading.Event()
    steps: list[int] = []
    tokens: list = []  # the cancel token of each call
    real = engine.generate_many

    def paused(reqs, *, progress=None, cancel=None):
        tokens.append(cancel)

        def on_step(event):
            steps.append(event.step)
            progress(event)
            if not started.is_set():  # hold the batch after its first step until the test says go
                started.set()
                assert go.wait(60)
        return real(reqs, progress=on_step, cancel=cancel)
    monkeypatch.setattr(engine, "generate_many", paused)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert started.wait(60)
    assert client.post(f"/v1/jobs/{ids[1]}/cancel").json()["status"] == "running"
    end = time.time() + 10
    while store.get(ids[1])["status"] != "canceled" and time.time() < end:  # the heartbeat ends it at once
        time.sleep(0.02)
    assert store.get(ids[1])["status"] == "canceled"
    assert [store.get(i)["status"] for i in (ids[0], ids[2])] == ["running", "running"]
    go.set()
    thread.join(60)
    jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "canceled", "succeeded"]
    assert jobs[0]["batch"]["jobs"] == 3 and jobs[2]["batch"]["jobs"] == 3
    assert jobs[1]["files"] == [] and store.get(ids[1])["result"] is None
    assert not (settings.home / "outputs" / "local" / ids[1]).joinpath("attempt-1").exists()
    for k in (0, 2):  # the survivors' pictures are the ones they get alone
        alone = engine.generate(G.GenerateRequest(**dict(COMPATIBLE[k], steps=6)))
        assert_same_pixels(pixels(client, jobs[k])[0], np.asarray(alone.images[0].convert("RGB"), np.int16))
    # when every job of a batch is canceled, the call itself stops at its next step
    steps.clear()
    started.clear()
    go.clear()
    ids = [submit(client, dict(r, steps=6)) for r in COMPATIBLE[:2]]
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert started.wait(60)
    for i in ids:
        client.post(f"/v1/jobs/{i}/cancel")
    while any(store.get(i)["status"] != "canceled" for i in ids) and time.time() < end + 20:
        time.sleep(0.02)
    while not tokens[-1].cancelled and time.time() < end + 40:  # the heartbeat sees no job is left: stops the call
        time.sleep(0.02)
    assert tokens[-1].cancelled
    go.set()
    thread.join(60)
    assert [store.get(i)["status"] for i in ids] == ["canceled", "canceled"]
    assert max(steps) < 6


def test_a_lease_that_expires_requeues_every_member_and_the_next_worker_runs_them(served, engine):
    client, store, settings = served
    ids = [submit(client, r) for r in COMPATIBLE]
    # a worker claims the batch and dies (no heartbeats): every lease runs out
    head = store.claim("dead", lease_s=0.2)
    claimed = [head] + store.claim_compatible("dead", head, max_jobs=3, max_images=3, lease_s=0.2)
    assert sorted(j["id"] for j in claimed) == sorted(ids)
    time.sleep(0.3)
    worker = Worker(store, settings, engine=engine, batch=4, lease_s=10, safety=False)
    assert worker.run_once()
    jobs = [store.get(i) for i in ids]
    assert all(j["status"] == "succeeded" and j["attempts"] == 2 and j["worker"] == worker.id for j in jobs)
    assert [j["result"]["batch"]["jobs"] for j in jobs] == [3, 3, 3]
    assert all("/attempt-2/" in j["result"]["files"][0]["path"] for j in jobs)
    assert not any(store.complete(i, "dead", {"files": []}) for i in ids)  # the dead worker commits nothing
    assert [store.get(i)["result"] for i in ids] == [j["result"] for j in jobs]


def test_batch_keys_and_the_setting(monkeypatch):
    key = batch_key("generate", COMPATIBLE[0])
    assert key is not None and key == batch_key("generate", dict(COMPATIBLE[1], seed=-1, batch_size=2))
    for change in ({"steps": 5}, {"cfg_scale": 7.5}, {"sampler_name": "Euler"}, {"width": 128}, {"clip_skip": 2},
                   {"vae": "v"}, {"loras": [{"name": "l", "weight": 0.5}]}, {"prompt": "x <lora:l:0.5>"},
                   {"prompt": "x --ar 2:3"}, {"scheduler": "karras"}, {"model": "other"},
                   {"hires": {"hr_scale": 2}}):
        assert batch_key("generate", dict(COMPATIBLE[0], **change)) != key, change
    assert batch_key("generate", dict(COMPATIBLE[0], prompt="y <lora:l:0.5>")) == \
        batch_key("generate", dict(COMPATIBLE[0], loras=[{"name": "l", "weight": 0.5}]))
    for alone in ({"batch_count": 2}, {"init_image": "/x.png"}, {"detailer": {}},
                  {"controlnet": {"model": "c", "image": "/x.png"}}):
        assert batch_key("generate", dict(COMPATIBLE[0], **alone)) is None, alone
    assert batch_key("img2img", COMPATIBLE[0]) is None and batch_key("generate", {"steps": 0}) is None
    monkeypatch.delenv("IMAGESMITH_WORKER_BATCH", raising=False)
    assert worker_batch() == 4
    monkeypatch.setenv("IMAGESMITH_WORKER_BATCH", "1")
    assert worker_batch() == 1
    monkeypatch.setenv("IMAGESMITH_WORKER_BATCH", "lots")
    with pytest.raises(Exception, match="IMAGESMITH_WORKER_BATCH"):
        worker_batch()


def test_the_engine_splits_a_batch_only_where_the_conditioning_differs_in_length(engine, monkeypatch):
    """A prompt longer than 75 tokens has two chunks of conditioning: it cannot be stacked with one-chunk
    prompts, so the engine makes one call per length (here with the hires fix: first pass, then hires pass)."""
    hires = {"hr_scale": 2, "hr_upscaler": "Lanczos", "hr_denoising_strength": 0.5}
    long = ", ".join(["a red apple on a wooden table"] * 12)
    reqs = [G.GenerateRequest(**dict(r, hires=hires)) for r in
            (COMPATIBLE[0], dict(COMPATIBLE[1], prompt=long), dict(COMPATIBLE[2], batch_size=2))]
    solo = [engine.generate(r) for r in reqs]
    calls = _Calls(monkeypatch)
    many = engine.generate_many(reqs)
    assert calls.rows == [3, -3, 1, -1]  # requests 1 and 3 (three images) together, then the long prompt
    for a, b in zip(solo, many):
        assert [r.seed for r in a.records] == [r.seed for r in b.records]
        assert [r.infotext for r in a.records] == [r.infotext for r in b.records]
        for x, y in zip(a.images, b.images):
            assert x.size == y.size == (128, 128)
            assert_same_pixels(np.asarray(y, np.int16), np.asarray(x, np.int16))
    with pytest.raises(Exception, match="can be batched"):
        engine.generate_many([G.GenerateRequest(**dict(COMPATIBLE[0], batch_count=2))])


def test_when_a_batched_call_fails_each_job_runs_on_its_own(served, engine, monkeypatch):
    client, store, settings = served
    ids = [submit(client, r) for r in COMPATIBLE[:2]] + [submit(client, dict(COMPATIBLE[2], model="gone"))]
    assert len({store.get(i)["batch_key"] for i in ids}) == 2  # another model name: another key

    def broken(reqs, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(engine, "generate_many", broken)
    worker = Worker(store, settings, engine=engine, batch=4, safety=False)
    assert worker.run_once()  # the batch of two fails as a whole; each then runs alone and succeeds
    jobs = [store.get(i) for i in ids[:2]]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    assert all("batch" not in j["result"] and j["attempts"] == 1 for j in jobs)
    assert worker.run_once()
    failed = store.get(ids[2])
    assert failed["status"] == "failed" and "gone" in failed["error"]  # its own error, nobody else's
