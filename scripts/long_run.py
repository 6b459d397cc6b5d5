"""make long-run: at least 1,000 generate jobs through the HTTP API, switching between three checkpoints (tiny SD1.5,
tiny SDXL, the shipped house-ldm) and four LoRAs at changing weights, with the API server and one worker as
separate processes (as deployed). Every 50 finished jobs it records both processes' RSS (VmRSS from /proc). The
target (issue 22): after job 200, RSS stays within 5% of its value at job 200 through the last job, for the worker
and for the server. Results: benchmarks/results/long_run.json (the RSS series, the verdict, the command).

    .venv/bin/python scripts/long_run.py [--jobs 1000] [--every 50] [--window 4]
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import machine, write_report  # noqa: E402

BIN = ROOT / ".venv/bin/imagesmith"
TARGET_FROM, TOLERANCE = 200, 0.05


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def requests():
    """The job mix, forever: each checkpoint with and without LoRAs, weights changing, seeds changing."""
    mix = [
        {"model": "tiny-sd15", "loras": []},
        {"model": "tiny-sd15", "loras": [{"name": "tiny-lora-peft", "weight": 0.8}]},
        {"model": "tiny-sdxl", "loras": [{"name": "tiny-lora-sdxl-peft", "weight": 0.6}]},
        {"model": "tiny-sd15", "loras": [{"name": "tiny-lora-kohya", "weight": 0.5},
                                         {"name": "tiny-lora-peft", "weight": 0.3}]},
        {"model": "house-ldm", "loras": []},
        {"model": "tiny-sdxl", "loras": [{"name": "tiny-lora-sdxl-kohya", "weight": 1.0}]},
        {"model": "tiny-sdxl", "loras": []},
    ]
    for i in itertools.count():
        m = mix[i % len(mix)]
        size = 64
        yield {"prompt": f"a red apple on a wooden table, photo {i % 13}", "model": m["model"], "loras": m["loras"],
               "width": size, "height": size, "steps": 4, "seed": i, "sampler_name": "Euler a" if i % 2 else "DPM++ 2M"}


def call(method, url: str, **kw):
    """One API call; a 429 (the server's per-user rate limit) is waited out, as a well-behaved client does."""
    while True:
        r = method(url, **kw)
        if r.status_code != 429:
            r.raise_for_status()
            return r
        time.sleep(1.0)


def wait_done(client, job_id: str) -> dict:
    """The job's final state, from its server-sent events (`event: done` carries the job)."""
    import json
    while True:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            if r.status_code == 429:
                time.sleep(1.0)
                continue
            r.raise_for_status()
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "done":
                    return json.loads(line[6:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50, help="record RSS every this many finished jobs")
    ap.add_argument("--window", type=int, default=4, help="jobs kept queued ahead of the worker")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/long_run.json")
    args = ap.parse_args(argv)
    import httpx

    from fixtures.tiny import build_tiny_home
    home = Path(tempfile.mkdtemp(prefix="imagesmith-long-"))
    build_tiny_home(home / "tiny", archs=("sd15", "sdxl"))
    env = {**os.environ, "IMAGESMITH_HOME": str(home / "tiny"), "IMAGESMITH_WORKER_BATCH": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    logs = open(home / "processes.log", "w")
    server = subprocess.Popen([str(BIN), "serve", "--port", str(port), "--workers", "0"], env=env, stdout=logs,
                              stderr=subprocess.STDOUT)
    worker = subprocess.Popen([str(BIN), "worker"], env=env, stdout=logs, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=base, timeout=60)
    for _ in range(480):
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.25)
    else:
        raise RuntimeError("the server did not start; see " + str(home / "processes.log"))
    samples, pending, done, failed = [], [], 0, 0
    gen = requests()
    t0 = time.time()
    try:
        while done < args.jobs:
            while len(pending) < args.window and done + len(pending) < args.jobs:
                r = call(client.post, "/v1/jobs", json={"type": "generate", "request": next(gen)})
                pending.append(r.json()["job_id"])
            job = wait_done(client, pending.pop(0))  # one server-sent event stream per job: 2 requests a job
            done += 1
            failed += job["status"] != "succeeded"
            if done % args.every == 0:
                samples.append({"jobs": done, "seconds": round(time.time() - t0, 1),
                                "worker_rss_mb": round(rss_bytes(worker.pid) / 2**20, 1),
                                "server_rss_mb": round(rss_bytes(server.pid) / 2**20, 1)})
                print(samples[-1], flush=True)
            if worker.poll() is not None or server.poll() is not None:
                raise RuntimeError("a process died; see " + str(home / "processes.log"))
    finally:
        client.close()
        for p in (worker, server):
            p.terminate()
        for p in (worker, server):
            p.wait(60)
    verdict = {}
    for who in ("worker", "server"):
        ref = next((s[f"{who}_rss_mb"] for s in samples if s["jobs"] == TARGET_FROM), None)
        later = [s[f"{who}_rss_mb"] for s in samples if s["jobs"] > TARGET_FROM]
        worst = max((abs(v - ref) / ref for v in later), default=0.0) if ref else None
        verdict[who] = {"rss_at_job_200_mb": ref, "max_after_mb": max(later, default=None),
                        "min_after_mb": min(later, default=None),
                        "worst_relative_change": None if worst is None else round(worst, 4),
                        "within_5_percent": worst is not None and worst <= TOLERANCE}
    report = {"machine": machine(), "command": f"python scripts/long_run.py --jobs {args.jobs} --every {args.every}",
              "date": time.strftime("%Y-%m-%d"), "jobs": done, "failed": failed,
              "checkpoints": ["tiny-sd15", "tiny-sdxl", "house-ldm"],
              "loras": ["tiny-lora-peft", "tiny-lora-kohya", "tiny-lora-sdxl-peft", "tiny-lora-sdxl-kohya"],
              "seconds": round(time.time() - t0, 1), "target": "RSS within 5% of its value at job 200 to the end",
              "verdict": verdict, "samples": samples}
    write_report(report, args.out, indent=1)
    ok = failed == 0 and all(v["within_5_percent"] for v in verdict.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
