"""imagesmith's performance modes on a GPU, against plain diffusers in the same run.

On random weights of the real architectures (full-size SDXL and FLUX-dev built from the shipped configs, directly
on the GPU in bf16), per mode (quality, fast, turbo): seconds per 1024x1024 image (SDXL 30 steps CFG 7, FLUX-dev
28 steps guidance 3.5), the first call's extra time (compile and warm-up), peak VRAM, and the image's PSNR against
`quality`; plain diffusers on the same pipeline object with the same dtype is the baseline (ratio). On SDXL it
also times LoRA switches on the compiled model with and without hot-swap, and counts the graphs torch.compile
made for each.

    python benchmarks/gpu_modes.py --out benchmarks/results/gpu_modes.json     # on a CUDA machine
    python benchmarks/gpu_modes.py --dry-run --out /tmp/gpu_modes.json         # tiny models on the CPU (a test)

The device run is scripts/device/bench_gpu.sh. Sections are skipped, and say so, when --budget-s would be
exceeded; the JSON is rewritten after every section, so a run cut short still reports what it measured.
Dry-run figures come from tiny models on the CPU and are never GPU figures."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from _common import machine  # noqa: E402

PROMPT = "a photo of a red apple on a wooden table, studio light"
CASES = {"sdxl": dict(steps=30, cfg=7.0, size=1024), "flux": dict(steps=28, cfg=3.5, size=1024)}
DRY = {"sdxl": dict(steps=4, cfg=7.0, size=64), "flux": dict(steps=4, cfg=3.5, size=64)}


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def psnr(a, b) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return 100.0 if mse == 0 else round(min(100.0, 10 * np.log10(255.0 ** 2 / mse)), 2)  # 100: identical


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def graphs() -> int:
    """Graphs torch.compile has made so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def build(arch: str, dry: bool, device: str, workdir: Path):
    if dry:
        from fixtures import tiny
        pipe = tiny.build_sdxl(0) if arch == "sdxl" else tiny.build_flux(0, workdir)
        return pipe.to(device)
    from engine_overhead import build_full_size
    pipe = build_full_size("sdxl" if arch == "sdxl" else "flux", device, torch.bfloat16, workdir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_entry(engine, name: str):
    """The cache entry (pipeline and its per-model state) of an adopted model."""
    return engine._pipeline_entry(engine._adopted[name.lower()])


def write_lora(pipe, path: Path, seed: int, rank: int) -> Path:
    """A random LoRA of `rank` on the UNet's attention projections (diffusers/peft format)."""
    from diffusers import StableDiffusionXLPipeline
    from fixtures import tiny
    layers = tiny.lora_layers(pipe, seed, rank=rank, text_encoders=())
    with torch.no_grad():  # the fixture's B scale is for tiny models; full-size layers take a gentler one
        layers = {k: {n: (t * 0.02 if "lora_B" in n else t) for n, t in v.items()} for k, v in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return tiny.save_peft_lora(StableDiffusionXLPipeline, layers, path)


def bench_arch(arch: str, args, clock: Clock, workdir: Path, save, out: dict):
    from imagesmith.core.requests import GenerateRequest, LoraSpec
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    case = (DRY if args.dry_run else CASES)[arch]
    device = "cpu" if args.dry_run else "cuda"
    runs = args.runs
    out.update({"case": f"{arch} random weights, {case['size']}x{case['size']}, {case['steps']} steps, "
                         f"{'CFG' if arch == 'sdxl' else 'guidance'} {case['cfg']:g}, Euler, "
                         f"{'fp32 (dry run)' if args.dry_run else 'bf16'}", "modes": {}})
    t_build = time.perf_counter()
    reset_peak()
    pipe = build(arch, args.dry_run, device, workdir / arch)
    sync()
    out["build_s"] = round(time.perf_counter() - t_build, 2)
    home = workdir / f"home-{arch}"
    engine = Engine(Settings(home=home), device=device)
    name = f"bench-{arch}"
    engine.adopt(name, pipe, arch)
    req = GenerateRequest(prompt=PROMPT, model=name, width=case["size"], height=case["size"], steps=case["steps"],
                          cfg_scale=case["cfg"], sampler_name="Euler", scheduler="simple" if arch == "flux" else "normal",
                          seed=1)
    out["capabilities"] = engine.capabilities.describe()

    def plain():
        g = torch.Generator("cpu").manual_seed(1)
        return pipe(prompt=PROMPT, width=case["size"], height=case["size"], num_inference_steps=case["steps"],
                    guidance_scale=case["cfg"], generator=g).images[0]

    if args.baseline:
        _, first = timed(plain)
        reset_peak()
        times = [timed(plain)[1] for _ in range(runs)]
        out["diffusers"] = {"s_per_image": round(statistics.median(times), 3), "first_call_s": round(first, 2),
                            "runs_s": [round(t, 3) for t in times], "peak_vram_gb": peak_gb()}
        print(f"[{arch}] diffusers {out['diffusers']['s_per_image']} s/image", flush=True)
        save()

    images = {}
    need = {"quality": 20 if args.dry_run else 150, "fast": 20 if args.dry_run else 150, "turbo": 10 if args.dry_run else 40}
    for mode in args.modes.split(","):
        if clock.left() < need[mode]:
            out["modes"][mode] = {"skipped": f"{clock.left():.0f} s of the budget left"}
            continue
        r = req.model_copy(update={"performance": mode})
        try:
            g0 = graphs()
            reset_peak()
            res, first = timed(lambda: engine.generate(r))
            results = [timed(lambda: engine.generate(r)) for _ in range(runs)]
            times = [t for _, t in results]
            image = results[-1][0].images[0]
            images[mode] = image
            p = engine.plan_for(r)
            info = results[-1][0].records[0].infotext
            steady = statistics.median(times)
            out["modes"][mode] = {
                "s_per_image": round(steady, 3), "first_call_s": round(first, 2),
                "warmup_overhead_s": round(first - steady, 2), "runs_s": [round(t, 3) for t in times],
                "peak_vram_gb": peak_gb(), "mode_run": p.mode, "features": p.features(), "notes": list(p.notes),
                "performance_infotext": (re.findall(r'Performance: ("[^"]*"|[^,]*)', info) or [None])[0],
                "graphs_compiled": graphs() - g0,
                "ratio_vs_diffusers": round(steady / out["diffusers"]["s_per_image"], 3) if args.baseline else None,
            }
            if mode != "quality" and "quality" in images:
                out["modes"][mode]["psnr_vs_quality_db"] = psnr(images["quality"], image)
            if not args.dry_run:
                image.save(workdir / f"{arch}-{mode}.png")
            print(f"[{arch}] {mode}: {out['modes'][mode]['s_per_image']} s/image "
                  f"(first {out['modes'][mode]['first_call_s']} s)", flush=True)
        except Exception as exc:  # a mode that breaks is a finding, not the end of the run
            out["modes"][mode] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}",
                                  "trace": traceback.format_exc()[-2000:]}
            print(f"[{arch}] {mode} FAILED: {exc}", flush=True)
        save()

    events = model_entry(engine, name).state.get("performance", {}).get("events")
    if events:
        out["prepare_events_s"] = events
    return engine, pipe, req


def bench_lora_switch(engine, pipe, req, args, clock: Clock, workdir: Path, save, out) -> dict:
    """LoRA switches on the compiled quality-mode model: new adapters (what a server without
    IMAGESMITH_LORA_MAX_RANK does) against hot-swap slots."""
    from imagesmith.core.requests import LoraSpec

    if clock.left() < (15 if args.dry_run else 60):
        return {"skipped": f"{clock.left():.0f} s of the budget left"}
    rank = 16
    loras = engine.settings.models_dir / "loras"
    for i, n in enumerate("abc"):
        write_lora(pipe, loras / f"bench-{n}.safetensors", seed=10 + i, rank=rank)
    engine.registry.scan()
    q = req.model_copy(update={"performance": "quality"})
    with_lora = lambda n, w=1.0: q.model_copy(update={"loras": [LoraSpec(name=f"bench-{n}", weight=w)]})  # noqa: E731
    steady = out["modes"].get("quality", {}).get("s_per_image")
    result: dict = {"rank": rank}
    try:
        # 1. without hot-swap: each new LoRA is a new peft adapter; a compiled model recompiles
        g0 = graphs()
        _, first = timed(lambda: engine.generate(with_lora("a")))
        _, steady_a = timed(lambda: engine.generate(with_lora("a")))
        g1 = graphs()
        _, after_switch = timed(lambda: engine.generate(with_lora("b")))
        result["new_adapters"] = {"first_lora_s": round(first, 2), "steady_with_lora_s": round(steady_a, 3),
                                  "gen_after_switch_s": round(after_switch, 3),
                                  "switch_cost_s": round(after_switch - steady_a, 3),
                                  "graphs_first_lora": g1 - g0, "graphs_on_switch": graphs() - g1}
        save()
        # 2. hot-swap slots: the adapters go, the server declares a maximum rank, LoRAs swap into slot0
        entry = model_entry(engine, "bench-sdxl")
        with entry.use():
            pipe.delete_adapters(list(entry.state.get("lora_adapters", {})))
            entry.state["lora_adapters"] = {}
        engine.settings.lora_max_rank = rank
        g0 = graphs()
        _, first = timed(lambda: engine.generate(with_lora("a")))
        _, steady_a = timed(lambda: engine.generate(with_lora("a")))
        g1 = graphs()
        job = engine._resolve(with_lora("c"))
        with entry.use():
            _, switch = timed(lambda: engine._prepare_model(entry, job, []))
        g2 = graphs()
        _, after_switch = timed(lambda: engine.generate(with_lora("c")))
        g3 = graphs()
        _, reweight = timed(lambda: engine.generate(with_lora("c", 0.4)))
        _, none = timed(lambda: engine.generate(q))
        result["hotswap"] = {"first_lora_s": round(first, 2), "steady_with_lora_s": round(steady_a, 3),
                             "switch_s": round(switch, 4), "gen_after_switch_s": round(after_switch, 3),
                             "gen_after_reweight_s": round(reweight, 3), "gen_without_lora_s": round(none, 3),
                             "graphs_first_lora": g1 - g0, "graphs_on_switch": g3 - g1,
                             "new_adapters": len(getattr(pipe.unet, "peft_config", {}) or {}) - 1,
                             "steady_without_lora_s": steady}
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        result["trace"] = traceback.format_exc()[-2000:]
    return result


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "torchao", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda_runtime"] = torch.version.cuda
        try:
            import subprocess
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            out["driver"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_modes.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: tests the script, measures nothing")
    ap.add_argument("--archs", default="sdxl,flux")
    ap.add_argument("--modes", default="quality,fast,turbo")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip plain diffusers")
    ap.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA switch section")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per case (default 2 on a GPU, 1 dry)")
    ap.add_argument("--budget-s", type=float, default=440, help="skip sections that would run past this")
    ap.add_argument("--images", type=Path, default=None, help="keep each mode's image here (GPU runs)")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_modes: no CUDA device here; use --dry-run to test the script on the CPU")
    args.runs = args.runs or (1 if args.dry_run else 2)
    if not args.dry_run:
        torch._dynamo.config.recompile_limit = 64  # LoRA switches without hot-swap recompile: measure, not fall back
        torch.backends.cuda.matmul.allow_tf32 = True
    clock = Clock(args.budget_s)
    report = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "versions": versions(), "budget_s": args.budget_s, "archs": {}}

    def save():
        report["elapsed_s"] = round(time.monotonic() - clock.t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    kept: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.images or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for arch in args.archs.split(","):
            if clock.left() < (5 if args.dry_run else 90):
                report["archs"][arch] = {"skipped": f"{clock.left():.0f} s of the budget left"}
                continue
            report["archs"][arch] = out = {}
            try:
                kept[arch] = bench_arch(arch, args, clock, workdir, save, out)
            except Exception as exc:
                out.update({"error": f"{type(exc).__name__}: {str(exc)[:400]}", "trace": traceback.format_exc()[-3000:]})
                print(f"[{arch}] FAILED: {exc}", flush=True)
            save()
        if "sdxl" in kept and args.lora:  # last: LoRA switches recompile, and must not eat FLUX's share of the budget
            engine, pipe, req = kept["sdxl"]
            out = report["archs"]["sdxl"]
            out["lora_switch"] = bench_lora_switch(engine, pipe, req, args, clock, workdir, save, out)
    save()
    print(json.dumps({a: {m: v.get("s_per_image") for m, v in r.get("modes", {}).items()}
                      for a, r in report["archs"].items()}, indent=1))


if __name__ == "__main__":
    main()
