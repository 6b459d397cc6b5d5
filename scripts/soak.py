"""make soak: kill -9 the worker mid-job KILL_WORKER times and the API server KILL_SERVER times while JOBS
generate jobs (house-ldm, 128 px) run; then check that no job was lost (every job reaches a final state), that
no job has more than one committed result, and that every committed result's files exist. Leftover files of
killed attempts are counted too (they are the only place a duplicate could appear on disk).
Results go to benchmarks/results/soak.json.

    .venv/bin/python scripts/soak.py [--jobs 40] [--kill-worker 20] [--kill-server 5]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine, write_report  # noqa: E402

BIN = ROOT / ".venv/bin/imagesmith"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--kill-worker", type=int, default=20)
    ap.add_argument("--kill-server", type=int, default=5)
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.json")
    args = ap.parse_args(argv)
    import httpx

    from imagesmith.serve.store import JobStore
    home = Path(tempfile.mkdtemp(prefix="imagesmith-soak-"))
    # the soak kills healthy workers on purpose (one job has taken 8 attempts): lift the poison-job cap
    env = {**os.environ, "IMAGESMITH_HOME": str(home), "IMAGESMITH_SAFETY": "0", "IMAGESMITH_MAX_ATTEMPTS": "1000"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    logs = open(home / "processes.log", "w")

    def start_server():
        p = subprocess.Popen([str(BIN), "serve", "--port", str(port), "--workers", "0"], env=env, stdout=logs,
                             stderr=subprocess.STDOUT)
        for _ in range(240):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    return p
            except httpx.HTTPError:
                time.sleep(0.25)
        raise RuntimeError("server did not start")

    def start_worker():
        return subprocess.Popen([str(BIN), "worker", "--lease", str(args.lease)], env=env, stdout=logs,
                                stderr=subprocess.STDOUT)

    rng = random.Random(0)
    server, worker = start_server(), start_worker()
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    ids = []
    for i in range(args.jobs):  # through the HTTP API: acknowledged means persisted
        r = httpx.post(base + "/v1/jobs", json={"type": "generate", "request": {
            "prompt": "a red apple on a wooden table", "steps": 20, "seed": i}})
        r.raise_for_status()
        ids.append(r.json()["job_id"])
    kills_w = kills_s = 0
    t0 = time.time()
    while kills_w < args.kill_worker or kills_s < args.kill_server:
        time.sleep(rng.uniform(0.5, 2.0))
        if kills_s < args.kill_server and rng.random() < args.kill_server / (args.kill_worker + args.kill_server):
            server.send_signal(signal.SIGKILL)
            server.wait()
            kills_s += 1
            server = start_server()
            continue
        if kills_w >= args.kill_worker:
            continue
        if store.depth().get("running", 0):
            worker.send_signal(signal.SIGKILL)  # mid-job: the worker holds a leased, running job
            worker.wait()
            kills_w += 1
            worker = start_worker()
        elif not store.depth().get("queued", 0):  # queue drained early: add work so every kill lands mid-job
            ids.append(httpx.post(base + "/v1/jobs", json={"type": "generate", "request": {
                "prompt": "a teapot", "steps": 20, "seed": 1000 + len(ids)}}).json()["job_id"])
    deadline = time.time() + 600
    while time.time() < deadline:
        states = [store.get(j)["status"] for j in ids]
        if all(s in ("succeeded", "failed", "canceled") for s in states):
            break
        time.sleep(1.0)
    worker.terminate()
    server.terminate()
    worker.wait(30)
    server.wait(30)
    final = {j: store.get(j) for j in ids}
    lost = [j for j, job in final.items() if job["status"] not in ("succeeded", "failed", "canceled")]
    missing_files, leftover_attempts = 0, 0
    for j, job in final.items():
        files = (job.get("result") or {}).get("files", [])
        missing_files += sum(not Path(f["path"]).is_file() for f in files)
        committed = {Path(f["path"]).parent for f in files}
        for attempt in (home / "outputs").glob(f"*/{j}/attempt-*"):
            if attempt not in committed and any(attempt.glob("*.png")):
                leftover_attempts += 1
    report = {"machine": machine(), "command": f"python scripts/soak.py --jobs {args.jobs} --kill-worker "
                                               f"{args.kill_worker} --kill-server {args.kill_server}",
              "jobs": len(ids), "worker_kills": kills_w, "server_kills": kills_s, "lease_s": args.lease,
              "seconds": round(time.time() - t0, 1),
              "final_states": {s: sum(1 for job in final.values() if job["status"] == s)
                               for s in ("succeeded", "failed", "canceled")},
              "lost": len(lost), "max_attempts": max(job["attempts"] for job in final.values()),
              "committed_result_files_missing": missing_files,
              "duplicate_outputs_left_by_killed_attempts": leftover_attempts}
    write_report(report, args.out, indent=1)
    ok = not lost and not missing_files and not leftover_attempts and report["final_states"]["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
