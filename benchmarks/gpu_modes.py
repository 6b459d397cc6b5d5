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


VARIANTS = {
    "default": {},  # the server's defaults (IMAGESMITH_COMPILE=auto, IMAGESMITH_COMPILE_SCOPE=auto, no CUDA graphs)
    "regional": {"compile_scope": "regional"},
    "regional-graphs": {"compile_scope": "regional", "cuda_graphs": True},
    "whole": {"compile_scope": "whole"},
    "whole-graphs": {"compile_scope": "whole", "cuda_graphs": True},
    "eager": {"compile": "off"},  # no torch.compile: a lossless reference that costs no compile time
}
"""Server settings a mode runs under (`--modes quality@whole-graphs`); each variant gets a freshly built model."""


def parse_entries(text: str) -> list[tuple[str, str]]:
    """`quality,fast@eager` -> [("quality", "default"), ("fast", "eager")]"""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        mode, _, variant = item.partition("@")
        if mode not in ("quality", "fast", "turbo") or (variant or "default") not in VARIANTS:
            sys.exit(f"gpu_modes: unknown mode entry {item!r} (modes quality|fast|turbo, variants "
                     f"{'|'.join(VARIANTS)})")
        out.append((mode, variant or "default"))
    return out


def label(mode: str, variant: str) -> str:
    return mode if variant == "default" else f"{mode}@{variant}"


def bench_arch(arch: str, args, clock: Clock, workdir: Path, save, out: dict):
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    case = (DRY if args.dry_run else CASES)[arch]
    device = "cpu" if args.dry_run else "cuda"
    runs = args.runs
    entries = parse_entries(getattr(args, f"{arch}_modes") or args.modes)
    out.update({"case": f"{arch} random weights, {case['size']}x{case['size']}, {case['steps']} steps, "
                         f"{'CFG' if arch == 'sdxl' else 'guidance'} {case['cfg']:g}, Euler, "
                         f"{'fp32 (dry run)' if args.dry_run else 'bf16'}", "modes": {}})
    name = f"bench-{arch}"
    req = GenerateRequest(prompt=PROMPT, model=name, width=case["size"], height=case["size"], steps=case["steps"],
                          cfg_scale=case["cfg"], sampler_name="Euler", scheduler="simple" if arch == "flux" else "normal",
                          seed=1)
    images: dict = {}
    need = {"quality": 20 if args.dry_run else 150, "fast": 20 if args.dry_run else 150, "turbo": 10 if args.dry_run else 40}
    engine = pipe = None
    current = None
    for mode, variant in entries:
        key = label(mode, variant)
        if clock.left() < need[mode] * (0.3 if variant == "eager" else 1):
            out["modes"][key] = {"skipped": f"{clock.left():.0f} s of the budget left"}
            continue
        if variant != current:  # a fresh model and engine per variant: compiled state is per model
            if engine is not None:
                _collect(out, engine, name, current)
                del engine, pipe
                torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            t_build = time.perf_counter()
            pipe = build(arch, args.dry_run, device, workdir / arch)
            sync()
            out.setdefault("build_s", round(time.perf_counter() - t_build, 2))
            engine = Engine(Settings(home=workdir / f"home-{arch}-{variant}", **VARIANTS[variant]), device=device)
            engine.adopt(name, pipe, arch)
            out["capabilities"] = engine.capabilities.describe()
            current = variant
            if args.baseline and "diffusers" not in out:
                out["diffusers"] = bench_diffusers(pipe, case, runs)
                print(f"[{arch}] diffusers {out['diffusers']['s_per_image']} s/image", flush=True)
                save()
        r = req.model_copy(update={"performance": mode})
        try:
            g0 = graphs()
            reset_peak()
            res, first = timed(lambda: engine.generate(r))
            results = [timed(lambda: engine.generate(r)) for _ in range(runs)]
            times = [t for _, t in results]
            image = results[-1][0].images[0]
            p = engine.plan_for(r, arch=arch)
            info = results[-1][0].records[0].infotext
            steady = statistics.median(times)
            row = out["modes"][key] = {
                "s_per_image": round(steady, 3), "first_call_s": round(first, 2),
                "warmup_overhead_s": round(first - steady, 2), "runs_s": [round(t, 3) for t in times],
                "peak_vram_gb": peak_gb(), "mode_run": p.mode, "features": p.features(), "notes": list(p.notes),
                "performance_infotext": (re.findall(r'Performance: ("[^"]*"|[^,]*)', info) or [None])[0],
                "graphs_compiled": graphs() - g0,
                "ratio_vs_diffusers": round(steady / out["diffusers"]["s_per_image"], 3) if "diffusers" in out else None,
            }
            if mode == "quality":
                # where the time goes: per-step cost from a half-length run (same shapes, no recompile) and the rest
                half = case["steps"] // 2
                t_half = statistics.median(timed(lambda: engine.generate(r.model_copy(update={"steps": half})))[1]
                                           for _ in range(runs))
                per_step = (steady - t_half) / (case["steps"] - half)
                row.update({"per_step_s": round(per_step, 4), "fixed_s": round(steady - per_step * case["steps"], 3),
                            "vae_decode_s": vae_decode_time(pipe, case, runs)})
                if per_step <= 0:  # tiny models on a busy CPU: the step count's effect is below the timing noise
                    row["notes"].append("per_step_s below timing noise (the half-length run was not faster)")
            ref = next((images[k] for k in images if k.startswith("quality")), None)
            if ref is not None and not key.startswith("quality"):
                row["psnr_vs_quality_db"] = psnr(ref, image)
                row["psnr_reference"] = next(k for k in images if k.startswith("quality"))
            images[key] = image
            if args.images:
                image.save(args.images / f"{arch}-{key}.png")
            print(f"[{arch}] {key}: {row['s_per_image']} s/image (first {row['first_call_s']} s)"
                  + (f", {row['per_step_s'] * 1000:.1f} ms/step, fixed {row['fixed_s']} s" if "per_step_s" in row else ""),
                  flush=True)
        except Exception as exc:  # a mode that breaks is a finding, not the end of the run
            out["modes"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}",
                                 "trace": traceback.format_exc()[-2000:]}
            print(f"[{arch}] {key} FAILED: {exc}", flush=True)
        save()
    if engine is not None:
        _collect(out, engine, name, current)
    return engine, pipe, req


def _collect(out: dict, engine, name: str, variant: str) -> None:
    events = model_entry(engine, name).state.get("performance", {}).get("events")
    if events:
        out.setdefault("prepare_events_s", {})[variant] = events


def bench_diffusers(pipe, case: dict, runs: int) -> dict:
    """Plain diffusers on the same pipeline object, before imagesmith has prepared it."""
    def plain():
        g = torch.Generator("cpu").manual_seed(1)
        return pipe(prompt=PROMPT, width=case["size"], height=case["size"], num_inference_steps=case["steps"],
                    guidance_scale=case["cfg"], generator=g).images[0]
    _, first = timed(plain)
    reset_peak()
    times = [timed(plain)[1] for _ in range(runs)]
    return {"s_per_image": round(statistics.median(times), 3), "first_call_s": round(first, 2),
            "runs_s": [round(t, 3) for t in times], "peak_vram_gb": peak_gb()}


def vae_decode_time(pipe, case: dict, runs: int) -> float:
    """One image's VAE decode at the case's size, as the engine runs it (the VAE is not compiled)."""
    vae = pipe.vae
    ch = vae.config.latent_channels
    lat = torch.randn(1, ch, case["size"] // 8, case["size"] // 8, device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        timed(lambda: vae.decode(lat))
        return round(statistics.median(timed(lambda: vae.decode(lat))[1] for _ in range(runs)), 4)


def bench_samplers_on_device(args, workdir: Path) -> dict:
    """Every sampler on the GPU against the same request on the CPU (tiny SDXL and, for flow samplers, tiny
    FLUX, fp32, 4 steps): the sampling layer runs beside the network, so each sampler's arithmetic meets CUDA
    tensors; the final latents must agree with the CPU's."""
    from fixtures import tiny

    from imagesmith.core.sampling_names import SAMPLER_NAMES
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    device = "cpu" if args.dry_run else "cuda"
    names = SAMPLER_NAMES[: 3 if args.dry_run else None]
    report: dict = {"device": device, "cases": {}}
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for arch in ("sdxl", "flux"):
            engines = {}
            for dev in ("cpu", device):
                pipe = tiny.build_sdxl(0) if arch == "sdxl" else tiny.build_flux(0, workdir / f"tiny-{arch}-{dev}")
                e = Engine(Settings(home=workdir / f"home-tiny-{dev}", compile="off"), device=dev)
                e.adopt(f"tiny-{arch}", pipe.to(dev), arch)
                engines[dev] = e
            cases = [(s.name, {}) for s in names if arch == "sdxl" or s.flow]
            if arch == "sdxl":
                cases += [("euler_ancestral", {"noise": "comfy"}), ("dpmpp_2m_sde", {"noise": "comfy"}),
                          ("euler", {"init_image": "grey", "denoising_strength": 0.6}),
                          ("euler_ancestral", {"init_image": "grey", "mask": "square", "denoising_strength": 0.8}),
                          ("euler", {"hires": True})]
            for sampler, extra in cases:
                key = f"{arch}/{sampler}" + "".join(f" {k}={v}" for k, v in extra.items() if k != "denoising_strength")
                try:
                    lat = {dev: engines[dev].generate(_sweep_request(f"tiny-{arch}", sampler, extra, workdir)).latents.float()
                           for dev in engines}
                    a, b = lat["cpu"], lat[device]
                    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-8))
                    report["cases"][key] = {"max_rel_diff": round(rel, 6), "agree": rel < 1e-2}
                except Exception as exc:
                    report["cases"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                            "trace": traceback.format_exc()[-1200:]}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.dry_run
    cases = report["cases"].values()
    report["summary"] = {"cases": len(cases), "agree": sum(bool(c.get("agree")) for c in cases),
                         "errors": sum("error" in c for c in cases)}
    return report


def _sweep_request(model: str, sampler: str, extra: dict, workdir: Path):
    from PIL import Image

    from imagesmith.core.requests import GenerateRequest, HiresSpec
    kw = dict(prompt=PROMPT, model=model, width=64, height=64, steps=4, cfg_scale=5.0, seed=3, sampler_name=sampler)
    for k, v in extra.items():
        if k == "init_image":
            path = workdir / "sweep-init.png"
            Image.new("RGB", (64, 64), (128, 120, 110)).save(path)
            kw["init_image"] = str(path)
        elif k == "mask":
            m = Image.new("L", (64, 64), 0)
            m.paste(255, (16, 16, 48, 48))
            m.save(workdir / "sweep-mask.png")
            kw["mask"] = str(workdir / "sweep-mask.png")
        elif k == "hires":
            kw["hires"] = HiresSpec(hr_scale=1.5, hr_upscaler="Latent", hr_denoising_strength=0.5)
        else:
            kw[k] = v
    return GenerateRequest(**kw)


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
    ap.add_argument("--modes", default="quality,fast,turbo",
                    help="mode[@variant],... for every arch; variants: " + ", ".join(VARIANTS))
    ap.add_argument("--sdxl-modes", default=None, help="SDXL's own --modes (e.g. quality@regional,quality@whole)")
    ap.add_argument("--flux-modes", default=None, help="FLUX's own --modes (e.g. quality@eager,fast)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false",
                    help="skip every sampler on the device against the CPU (tiny models)")
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
        workdir = Path(tmp)
        if args.images:
            args.images.mkdir(parents=True, exist_ok=True)
        if args.sweep:
            try:
                report["samplers_on_device"] = bench_samplers_on_device(args, workdir)
                print(f"[samplers] {report['samplers_on_device']['summary']}", flush=True)
            except Exception as exc:
                report["samplers_on_device"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}",
                                                "trace": traceback.format_exc()[-3000:]}
                print(f"[samplers] FAILED: {exc}", flush=True)
            save()
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
