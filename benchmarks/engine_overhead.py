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
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

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
    from diffusers_baseline import make_scheduler

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

        pipe.set_progress_bar_config(disable=True)
        plain()  # warm-up
        ours, theirs = [], []
        for run in range(runs):  # alternate which goes first, so neither always runs on a warmer cache
            pair = [(ours, lambda: engine.generate(req)), (theirs, plain)]
            for times, fn in (pair if run % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
        return {
            "case": "sd15-arch random weights, 256x256, 8 steps, CFG 7, Euler, CPU fp32",
            "runs": runs, "imagesmith_s": ours, "diffusers_s": theirs,
            "imagesmith_median_s": round(m_ours, 4), "diffusers_median_s": round(m_theirs, 4),
            "ratio": round(m_ours / m_theirs, 4), "goal_ratio": 1.05,
            "model_build_s": round(build_s, 1), "first_job_s": round(load_s, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def bench_sampling_loop(steps: int = 20, repeats: int = 5) -> dict:
    """What the sampling layer's loop itself costs per step, apart from the network: samplers run on the house
    model's latent shape (1x4x16x16) with a denoiser that does no work (returns 0.9 x), so the time is the
    sampler's arithmetic, its noise streams and the progress callback. Goal: < 2 ms per step."""
    from imagesmith.core.progress import StepCounter
    from imagesmith.engine.sampling import ksampler as K
    from imagesmith.engine.sampling.model_sampling import DiscreteModelSampling

    class Idle:
        last_uncond = None

        def __call__(self, x, sigma):
            return x * 0.9

    ms = DiscreteModelSampling.scaled_linear()
    out = {}
    for sampler, schedule in (("euler", "normal"), ("euler_ancestral", "normal"), ("dpmpp_2m", "karras"),
                              ("dpmpp_2m_sde", "exponential"), ("dpmpp_sde", "karras"), ("uni_pc", "karras"),
                              ("deis", "karras"), ("lms", "karras")):
        sigmas = K.plan_sigmas(ms, sampler, schedule, steps)
        noise = K.initial_noise("comfy", (1, 4, 16, 16), [1])
        times = []
        for _ in range(repeats):
            counter = StepCounter(steps, None, None)
            t0 = time.perf_counter()
            with torch.inference_mode():
                K.sample(Idle(), ms, sampler, sigmas, noise=noise, seed=1,
                         callback=lambda i, x, d, s: counter.step("txt2img", 0, x))
            times.append((time.perf_counter() - t0) / steps * 1000)
        out[sampler] = round(statistics.median(times), 3)
    return {"case": f"house latent 1x4x16x16, {steps} steps, idle denoiser, CPU", "ms_per_step": out,
            "goal_ms_per_step": 2.0}


def build_full_size(arch: str, device: str, dtype: torch.dtype, workdir: Path):
    """A full-size random-weight pipeline of `arch` ("sdxl" or "flux") from the shipped configs, built
    directly on `device` in `dtype`. FLUX's T5 tokenizer is a small sentencepiece model trained here
    (tokenizer size does not change the cost: prompts are padded to 512 tokens either way)."""
    import io

    import diffusers
    import transformers
    from transformers import CLIPTokenizer

    from imagesmith.models.loaders import assemble_config_folder, t5_tokenizer_from_spiece

    folder = assemble_config_folder(workdir / arch, arch)
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        lib, cls = spec
        sub = folder / name
        if cls is None:
            parts[name] = None
        elif cls.startswith("CLIPTokenizer"):
            parts[name] = CLIPTokenizer.from_pretrained(str(sub))
        elif "Tokenizer" in cls:  # T5
            import sentencepiece as spm
            buf = io.BytesIO()
            words = ["a photo of a red apple on a wooden table", "a teapot", "studio light, product shot"]
            spm.SentencePieceTrainer.train(sentence_iterator=iter(words * 5), model_writer=buf, vocab_size=40,
                                           model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                           hard_vocab_limit=False, minloglevel=2)
            (workdir / "spiece.model").write_bytes(buf.getvalue())
            parts[name] = t5_tokenizer_from_spiece(workdir / "spiece.model", extra_ids=4)
        elif lib == "diffusers" and "Scheduler" in cls:
            parts[name] = getattr(diffusers, cls).from_config(json.loads((sub / "scheduler_config.json").read_text()))
        else:
            parts[name] = _build_model(lib, cls, sub, device, dtype)
    return getattr(diffusers, index["_class_name"])(**parts)


def _build_model(lib: str, cls: str, sub: Path, device: str, dtype: torch.dtype):
    """Random-initialised weights created directly on the device in the target dtype (a 12B FLUX in
    fp32 first would not fit beside its T5)."""
    import diffusers
    import transformers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if lib == "diffusers":
                klass = getattr(diffusers, cls)
                return klass.from_config(klass.load_config(str(sub))).eval()
            klass = getattr(transformers, cls)
            return klass(klass.config_class.from_pretrained(str(sub))).eval()
    finally:
        torch.set_default_dtype(previous)


def bench_gpu(runs: int) -> dict:
    """SDXL 1024x1024/30 steps and FLUX 1024x1024/28 steps on the GPU: seconds per image, imagesmith
    and plain diffusers on the same pipeline object, plus peak VRAM."""
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    out = {}
    cases = [("sdxl", 30, 7.0, "Euler"), ("flux", 28, 3.5, "Euler")]
    for arch, steps, cfg, sampler in cases:
        with tempfile.TemporaryDirectory() as home:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            pipe = build_full_size(arch, "cuda", torch.bfloat16, Path(home))
            pipe.set_progress_bar_config(disable=True)
            engine = Engine(Settings(home=Path(home)), device="cuda")
            engine.adopt(f"{arch}-random", pipe, arch)
            req = GenerateRequest(prompt="a photo of a red apple on a wooden table", model=f"{arch}-random",
                                  width=1024, height=1024, steps=steps, cfg_scale=cfg, sampler_name=sampler, seed=1)

            def plain():
                g = torch.Generator("cpu").manual_seed(1)
                return pipe(prompt=req.prompt, width=1024, height=1024, num_inference_steps=steps,
                            guidance_scale=cfg, generator=g).images[0]

            engine.generate(req)
            plain()
            ours, theirs = [], []
            for _ in range(runs):
                torch.cuda.synchronize(); t0 = time.perf_counter(); engine.generate(req)
                torch.cuda.synchronize(); ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter(); plain(); torch.cuda.synchronize(); theirs.append(time.perf_counter() - t0)
            out[arch] = {
                "case": f"{arch} random weights, 1024x1024, {steps} steps, cfg {cfg}, {sampler}, bf16",
                "imagesmith_s_per_image": round(statistics.median(ours), 3),
                "diffusers_s_per_image": round(statistics.median(theirs), 3),
                "ratio": round(statistics.median(ours) / statistics.median(theirs), 4),
                "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
            del engine, pipe
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engine_overhead.json")
    args = ap.parse_args()
    report = {"machine": machine(),
              "cpu": None if args.gpu_only else bench_cpu(args.runs),
              "sampling_loop": None if args.gpu_only else bench_sampling_loop()}
    if torch.cuda.is_available():
        report["gpu"] = bench_gpu(max(2, args.runs // 2))
        for arch, r in report["gpu"].items():
            print(f"GPU {arch}: imagesmith {r['imagesmith_s_per_image']}s/image, diffusers "
                  f"{r['diffusers_s_per_image']}s/image, ratio {r['ratio']}, peak VRAM {r['peak_vram_gb']} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    c = report["cpu"] or {}
    if c:
        print(f"imagesmith {c['imagesmith_median_s']:.3f}s  diffusers {c['diffusers_median_s']:.3f}s  "
              f"ratio {c['ratio']:.3f} (goal <= 1.05)  peak RSS {c['peak_rss_mb']:.0f} MB")
    if report.get("sampling_loop"):
        print("sampling loop, ms per step:", report["sampling_loop"]["ms_per_step"])
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
