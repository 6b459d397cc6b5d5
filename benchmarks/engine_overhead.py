"""Engine overhead: imagesmith vs the plain diffusers pipeline, same weights, same settings, same process.

SD1.5 architecture with random weights (speed does not depend on weight values), 256x256, 8 steps,
CFG 7, Euler. Runs alternate (imagesmith, diffusers, imagesmith, ...) so drift hits both equally; the
report gives the median of each, their ratio (goal <= 1.05) and peak RSS. With a CUDA GPU it also
times the SDXL architecture at 1024x1024/30 steps and FLUX at 1024x1024/28 steps (seconds per image).

    .venv/bin/python benchmarks/engine_overhead.py [--runs 5] [--out benchmarks/results/engine_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_sd15():
    """Full-size SD1.5 architecture (UNet 860M, CLIP ViT-L text, SD VAE) with random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers defaults = SD1.5
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "src/imagesmith/models/configs/tokenizers/clip"))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def bench_cpu(runs: int) -> dict:
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine
    from imagesmith.engine.samplers import make_scheduler

    with tempfile.TemporaryDirectory() as home:
        t0 = time.perf_counter()
        pipe = build_sd15()
        build_s = time.perf_counter() - t0
        engine = Engine(Settings(home=Path(home)), device="cpu")
        engine.adopt("sd15-random", pipe, "sd1")  # the same pipeline object serves both sides
        req = GenerateRequest(prompt="a photo of a red apple on a wooden table", negative_prompt="blurry",
                              model="sd15-random", width=256, height=256, steps=8, cfg_scale=7.0,
                              sampler_name="Euler", seed=1)
        t0 = time.perf_counter()
        engine.generate(req)  # warm-up
        load_s = time.perf_counter() - t0

        def plain():
            pipe.scheduler = make_scheduler("Euler", "normal", dict(pipe.scheduler.config), "sd1")
            g = torch.Generator("cpu").manual_seed(1)
            return pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, width=256, height=256,
                        num_inference_steps=8, guidance_scale=7.0, generator=g).images[0]

        plain()  # warm-up
        ours, theirs = [], []
        for _ in range(runs):
            t0 = time.perf_counter(); engine.generate(req); ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); plain(); theirs.append(time.perf_counter() - t0)
        m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
        return {
            "case": "sd15-arch random weights, 256x256, 8 steps, CFG 7, Euler, CPU fp32",
            "runs": runs, "imagesmith_s": ours, "diffusers_s": theirs,
            "imagesmith_median_s": round(m_ours, 4), "diffusers_median_s": round(m_theirs, 4),
            "ratio": round(m_ours / m_theirs, 4), "goal_ratio": 1.05,
            "model_build_s": round(build_s, 1), "first_job_s": round(load_s, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engine_overhead.json")
    args = ap.parse_args()
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "cpu": bench_cpu(args.runs)}
    if torch.cuda.is_available():
        report["gpu"] = "see benchmarks/gpu_archs.py (SDXL 1024/30 steps, FLUX 1024/28 steps)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    c = report["cpu"]
    print(f"imagesmith {c['imagesmith_median_s']:.3f}s  diffusers {c['diffusers_median_s']:.3f}s  "
          f"ratio {c['ratio']:.3f} (goal <= 1.05)  peak RSS {c['peak_rss_mb']:.0f} MB")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
