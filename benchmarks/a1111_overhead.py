"""A1111's synchronous txt2img through imagesmith against the same request on the native job API, on the shipped
house model, in the same server process: the A1111 layer (body mapping, the synchronous wait, base64 images, the
info JSON) should cost at most 5% (issue 'The A1111 API that real clients use'). Alternating order, medians.

    .venv/bin/python benchmarks/a1111_overhead.py [--runs 12] [--out benchmarks/results/a1111_overhead.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import house_server, machine, write_report  # noqa: E402

REQUEST = {"prompt": "a red apple on a wooden table", "steps": 8, "cfg_scale": 5, "seed": 7, "width": 128,
           "height": 128, "sampler_name": "Euler"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/a1111_overhead.json")
    args = ap.parse_args(argv)
    with house_server("imagesmith-a1111-bench-") as (c, port):

        def a1111() -> float:
            t0 = time.perf_counter()
            r = c.post("/sdapi/v1/txt2img", json=REQUEST)
            r.raise_for_status()
            assert len(r.json()["images"]) == 1
            return time.perf_counter() - t0

        def native() -> float:
            t0 = time.perf_counter()
            job_id = c.post("/v1/jobs", json={"type": "generate", "request": REQUEST}).json()["job_id"]
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as s:
                for line in s.iter_lines():
                    if line.startswith("event: done"):
                        break
            r = c.get(f"/v1/jobs/{job_id}/files/0")
            r.raise_for_status()
            return time.perf_counter() - t0

        a1111(), native()  # warm: model loaded, prompt encoded
        times: dict[str, list[float]] = {"a1111": [], "native": []}
        for i in range(args.runs):
            for name, fn in ((("a1111", a1111), ("native", native)) if i % 2 == 0 else (("native", native), ("a1111", a1111))):
                times[name].append(fn())
        med = {k: statistics.median(v) for k, v in times.items()}
        report = {"machine": machine(), "command": f"python benchmarks/a1111_overhead.py --runs {args.runs}",
                  "date": time.strftime("%Y-%m-%d"), "case": "house-ldm 128x128, 8 steps, Euler, CFG 5, one image",
                  "median_s": {k: round(v, 4) for k, v in med.items()},
                  "ratio_a1111_over_native": round(med["a1111"] / med["native"], 4), "target_ratio": 1.05,
                  "runs_s": {k: [round(t, 4) for t in v] for k, v in times.items()}}
        report["met"] = report["ratio_a1111_over_native"] <= 1.05
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
