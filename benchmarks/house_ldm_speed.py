"""house-ldm speed on this machine, after load: imagesmith's engine vs the plain diffusers pipeline.

The shipped house-ldm (src/imagesmith/house/checkpoints/house-ldm), 128x128, 20 steps, CFG 5, DPM++ 2M
Karras. Runs alternate (imagesmith, diffusers, ...) so drift hits both equally; the report gives load time,
the median seconds per image of each (goal: imagesmith <= 2 s on the 2-core CPU), their ratio, the
512x512 documented default (hires x4 with R-ESRGAN 4x+, no second pass) and peak RSS.

    .venv/bin/python benchmarks/house_ldm_speed.py [--runs 7] [--out benchmarks/results/house_ldm_speed.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import machine, write_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/house_ldm_speed.json")
    args = ap.parse_args(argv)

    from imagesmith.core.requests import GenerateRequest, HiresSpec
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine
    from imagesmith.engine.prompts import encode_pair_sd
    from diffusers_baseline import make_scheduler
    from imagesmith.models.house import HOUSE_NAME, SHIPPED_DIR, load_house_pipeline

    prompt = "a teapot on a wooden table"
    with tempfile.TemporaryDirectory() as home:
        engine = Engine(Settings(home=Path(home)), device="cpu")
        req = GenerateRequest(prompt=prompt, model=HOUSE_NAME, width=128, height=128, steps=20, cfg_scale=5.0,
                              sampler_name="DPM++ 2M", scheduler="karras", seed=1)
        t0 = time.perf_counter()
        engine.generate(req)  # load + first image
        first_s = time.perf_counter() - t0

        plain = load_house_pipeline(SHIPPED_DIR / "checkpoints" / HOUSE_NAME)
        plain.scheduler = make_scheduler("DPM++ 2M", "karras", plain.scheduler.config, "sd1")
        plain.set_progress_bar_config(disable=True)

        def run_plain() -> None:
            cond, uncond = encode_pair_sd(prompt, "", plain.tokenizer, plain.text_encoder, device="cpu",
                                          dtype=torch.float32)
            plain(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=20, guidance_scale=5.0,
                  height=128, width=128, generator=torch.Generator().manual_seed(1))

        ours, theirs = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            engine.generate(req)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_plain()
            theirs.append(time.perf_counter() - t)
        big = req.model_copy(update={"hires": HiresSpec(hr_scale=4, hr_upscaler="R-ESRGAN 4x+",
                                                        hr_denoising_strength=0.0)})
        engine.generate(big)
        t = time.perf_counter()
        engine.generate(big)
        big_s = time.perf_counter() - t

    result = {
        "benchmark": "house_ldm_speed",
        "machine": machine(),
        "settings": "house-ldm 128x128, 20 steps DPM++ 2M Karras, CFG 5, batch 1, fp32 CPU",
        "load_and_first_image_s": round(first_s, 3),
        "imagesmith_s": [round(x, 3) for x in ours],
        "diffusers_s": [round(x, 3) for x in theirs],
        "imagesmith_median_s": round(statistics.median(ours), 3),
        "diffusers_median_s": round(statistics.median(theirs), 3),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        "goal_s": 2.0,
        "default_512_hires_x4_resrgan_s": round(big_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "command": "make bench-house  (.venv/bin/python benchmarks/house_ldm_speed.py)",
    }
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
