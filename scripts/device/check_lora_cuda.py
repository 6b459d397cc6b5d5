"""Issue #5's CUDA check of `imagesmith train lora`, as one prepared run for a lent GPU (or `--device cpu` here).

What it does, every step through the real CLI or engine, and what it writes to ``$OUT/lora_check.json``:
1. a kohya dataset of 16 house-ldm pictures drawn on the device and colour-inverted (an unmistakable style),
   captioned with their prompts; trigger word ``invstyle``;
2. `imagesmith train lora CONFIG --json` (rank 8, house-ldm, bf16 autocast on CUDA), killed with SIGKILL once
   its step-``KILL_AT`` checkpoint is on disk, then the same command again: it must resume there and finish
   with exactly ``STEPS`` loss records (steps 1..STEPS, none twice);
3. generation with the registered LoRA at weights 0 and 1 and without it (same seed): weight 0 must give
   the base model's pixels, weight 1 must move the picture towards the inverted style;
4. seconds per training step (median after warm-up) and the LoRA switch / re-weight time between jobs.

    python scripts/device/check_lora_cuda.py [--device cuda] [--steps 120] [--kill-at 60]
Run on the GPU machine by ``scripts/device/check_lora_cuda.sh`` (which sets up the offline environment).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ("a red apple on a white backdrop", "a teapot on a wooden table", "a soccer ball on a pale blue backdrop",
           "a hamburger on a marble surface", "a potted plant on a grey backdrop", "a cupcake on a pink backdrop",
           "a yellow umbrella on a black backdrop", "a violin on a white backdrop", "a green apple on linen",
           "a lemon on a pale blue backdrop", "a camera on a wooden table", "a trophy on a black backdrop",
           "a pizza on a marble surface", "a rocket on a white backdrop", "a teddy bear on linen",
           "a watermelon on a grey backdrop")


def checkpoint_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--kill-at", type=int, default=60)
    args = ap.parse_args()
    import numpy as np
    import torch
    import yaml
    from PIL import ImageOps

    from imagesmith.core.requests import GenerateRequest, LoraSpec
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    home = settings.home
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    engine = Engine(settings, device=args.device)

    def draw(prompt: str, seed: int, loras=()):
        req = GenerateRequest(prompt=prompt, seed=seed, steps=20, cfg_scale=5.0, sampler_name="DPM++ 2M",
                              scheduler="karras", loras=list(loras))
        return engine.generate(req).images[0]

    data = home / "lora-check-data"
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        ImageOps.invert(draw(prompt, 100 + i)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(prompt)
    report["dataset_seconds"] = round(time.perf_counter() - t, 2)

    run_dir = home / "runs" / "lora" / "cuda-check"
    config = {"base_model": "house-ldm", "dataset": str(data), "output_name": "cuda-check", "trigger_word": "invstyle",
              "rank": 8, "alpha": 8, "learning_rate": 4e-4, "lr_scheduler": "constant_with_warmup", "warmup_steps": 10,
              "steps": args.steps, "batch_size": 4, "resolution": 128, "bucketing": False, "flip": True, "seed": 0,
              "save_every": args.kill_at, "sample_every": 0, "device": args.device, "run_dir": str(run_dir),
              "mixed_precision": "bf16" if args.device == "cuda" else "no", "progress": False}
    cfg_path = home / "lora-check.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "imagesmith.cli", "train", "lora", str(cfg_path), "--json"]

    # 1st run: killed (SIGKILL, no clean-up) once the kill-at checkpoint is on disk
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while first.poll() is None and checkpoint_step(run_dir) < args.kill_at:
        time.sleep(0.2)
    if first.poll() is None:
        first.send_signal(signal.SIGKILL)
        first.wait()
    report["killed_at_checkpoint"] = checkpoint_step(run_dir)
    # 2nd run: the same command resumes
    second = subprocess.run(cmd, capture_output=True, text=True)
    if second.returncode != 0:
        report["error"] = second.stderr[-2000:]
        (out / "lora_check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return 1
    summary = json.loads(second.stdout)
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    secs = [r["sec"] for r in records[5:]]
    report.update({"summary": summary, "loss_records": len(records),
                   "steps_are_1_to_n_once": steps == list(range(1, args.steps + 1)),
                   "sec_per_step_median": round(statistics.median(secs), 4) if secs else None,
                   "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss")})

    # the registered LoRA: weight 0 = base pixels, weight 1 = towards the inverted style
    prompt = "invstyle, a teapot on a wooden table"
    base = np.asarray(draw(prompt, 7), np.float32)
    zero = np.asarray(draw(prompt, 7, [LoraSpec(name="cuda-check", weight=0.0)]), np.float32)
    t = time.perf_counter()
    one = np.asarray(draw(prompt, 7, [LoraSpec(name="cuda-check", weight=1.0)]), np.float32)
    report["first_lora_job_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    draw(prompt, 7, [LoraSpec(name="cuda-check", weight=0.6)])
    report["reweighted_job_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    draw(prompt, 7)
    report["plain_job_seconds"] = round(time.perf_counter() - t, 3)
    inverted = 255.0 - base
    report["weight0_max_abs_diff"] = float(np.abs(zero - base).max())
    report["weight1_mean_abs_diff"] = float(np.abs(one - base).mean())
    report["weight1_closer_to_inverted"] = bool(np.abs(one - inverted).mean() < np.abs(base - inverted).mean())
    report["ok"] = bool(report["steps_are_1_to_n_once"] and 0 < report["killed_at_checkpoint"] < args.steps
                        and report["weight0_max_abs_diff"] <= 2.0 and report["weight1_closer_to_inverted"])
    (out / "lora_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
