"""make load: open-loop load against a live `imagesmith serve` (auth on, one user and token per client).

CLIENTS clients each submit a fast job (``prompt_expand``) every INTERVAL seconds for DURATION seconds, on a fixed
schedule whatever the responses (open loop). Reported: the error rate (any non-2xx admission; must be 0),
admission latency p50/p95/p99 (POST /v1/jobs), queue wait p50/p95/p99 (started_at - created_at of the jobs that
started), jobs finished, and the server's RSS before and after. Results go to benchmarks/results/load_test.json.

    .venv/bin/python scripts/load_test.py [--clients 50] [--duration 60] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine, write_report  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


async def run(args, base: str, tokens: list[str], problems: list[str], retries: list[int]
              ) -> tuple[list[float], list[int], list[tuple[str, str]]]:
    """Submit on the open-loop schedule; ``problems`` collects the first few failed admissions, ``retries`` the
    submissions retried after a transport error."""
    import httpx
    latencies: list[float] = []
    statuses: list[int] = []
    jobs: list[tuple[str, str]] = []
    limits = httpx.Limits(max_connections=args.clients * 4, max_keepalive_connections=args.clients * 2)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as http:
        async def post(token: str, k: int):
            # a keep-alive connection the server closes as it is reused fails with a transport error; a real client
            # retries, and the Idempotency-Key makes the retry return the same job, never a second one
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"load-{k}"}
            body = {"type": "prompt_expand", "request": {"request": "a white cat, 3D", "n": 1, "seed": k}}
            try:
                return await http.post("/v1/jobs", headers=headers, json=body)
            except httpx.TransportError:
                retries.append(k)
                return await http.post("/v1/jobs", headers=headers, json=body)

        async def one(token: str, k: int) -> None:
            t = time.perf_counter()
            try:
                r = await post(token, k)
                statuses.append(r.status_code)
                if r.status_code < 300:
                    jobs.append((token, r.json()["job_id"]))
                elif len(problems) < 5:
                    problems.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                statuses.append(0)
                if len(problems) < 5:
                    problems.append(f"{type(exc).__name__}: {exc}"[:200])
            latencies.append(time.perf_counter() - t)

        tasks = []
        start = time.perf_counter()
        n_ticks = int(args.duration / args.interval)
        for tick in range(n_ticks):
            due = start + tick * args.interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            for c, token in enumerate(tokens):  # open loop: fire and go on, whatever the answers
                tasks.append(asyncio.create_task(one(token, tick * len(tokens) + c)))
        await asyncio.gather(*tasks)
    return latencies, statuses, jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between one client's submissions")
    ap.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the queue afterwards")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/load_test.json")
    args = ap.parse_args(argv)
    import httpx

    from imagesmith.serve.store import JobStore
    home = Path(tempfile.mkdtemp(prefix="imagesmith-load-"))
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    tokens = []
    for i in range(args.clients):
        store.add_user(f"client{i}")
        tokens.append(store.create_token(f"client{i}"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IMAGESMITH_HOME": str(home), "IMAGESMITH_AUTH": "1"}
    server = subprocess.Popen([str(ROOT / ".venv/bin/imagesmith"), "serve", "--port", str(port)], env=env,
                              stdout=open(home / "serve.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        # warm the worker (the sentence encoder loads on the first prompt_expand)
        warm = httpx.post(base + "/v1/jobs", headers={"Authorization": f"Bearer {tokens[0]}"},
                          json={"type": "prompt_expand", "request": {"request": "warm up"}}).json()["job_id"]
        auth = {"Authorization": f"Bearer {tokens[0]}"}
        while httpx.get(f"{base}/v1/jobs/{warm}", headers=auth).json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        rss_before = rss_mb(server.pid)
        t0 = time.perf_counter()
        problems: list[str] = []
        retries: list[int] = []
        latencies, statuses, jobs = asyncio.run(run(args, base, tokens, problems, retries))
        wall = time.perf_counter() - t0
        end = time.monotonic() + args.drain
        while time.monotonic() < end and store.depth().get("queued", 0) + store.depth().get("running", 0) > 0:
            time.sleep(1.0)
        rss_after = rss_mb(server.pid)
        waits, finished, failed = [], 0, 0
        for _, job_id in jobs:
            j = store.get(job_id)
            if j.get("started_at") and j.get("created_at"):
                waits.append(float(j["started_at"]) - float(j["created_at"]))
            finished += j["status"] == "succeeded"
            failed += j["status"] == "failed"
    finally:
        server.terminate()
        server.wait(30)
    errors = sum(1 for s in statuses if not 200 <= s < 300)
    report = {"machine": machine(), "command": f"python scripts/load_test.py --clients {args.clients} "
                                               f"--duration {args.duration:g} --interval {args.interval:g}",
              "job_type": "prompt_expand (n=1)", "clients": args.clients, "open_loop_rate_per_s":
                  round(args.clients / args.interval, 1),
              "submitted": len(statuses), "admission_wall_s": round(wall, 1), "errors": errors,
              "error_rate": round(errors / max(1, len(statuses)), 5),
              "status_counts": {str(k): statuses.count(k) for k in sorted(set(statuses))}, "errors_seen": problems,
              "retried_after_transport_error": len(retries), "distinct_jobs": len({j for _, j in jobs}),
              "admission_latency_s": {"p50": pct(latencies, 0.50), "p95": pct(latencies, 0.95),
                                      "p99": pct(latencies, 0.99)},
              "queue_wait_s": {"p50": pct(waits, 0.50), "p95": pct(waits, 0.95), "p99": pct(waits, 0.99),
                               "jobs_started": len(waits)},
              "jobs_succeeded": finished, "jobs_failed": failed,
              "server_rss_mb": {"before": rss_before, "after": rss_after}}
    write_report(report, args.out, indent=1)
    return 0 if errors == 0 and failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
