"""imagesmith command line: parse -> typed request -> engine -> files and a summary (or --json).

Bad input never shows a traceback: one line on stderr and exit code 2 (IMAGESMITH_DEBUG=1 shows it)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Self-hosted image generation: engine, models, tools.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
app.add_typer(models_app, name="models")
house_app = typer.Typer(no_args_is_help=True, help="House models: dataset, sample sheet, metrics.")
app.add_typer(house_app, name="house")
train_app = typer.Typer(no_args_is_help=True, help="Training.")
app.add_typer(train_app, name="train")
train_house_app = typer.Typer(no_args_is_help=True, help="Train the house models.")
train_app.add_typer(train_house_app, name="house")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluation: metrics of models and tools.")
app.add_typer(eval_app, name="eval")


class _Exit(Exception):
    def __init__(self, message: str, code: int = 2):
        self.message, self.code = message, code


def _validation_line(exc) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@contextmanager
def _progress_bar(enabled: bool, label: str):
    """Yields a callback for engine progress events; draws a rich bar on stderr when enabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def on_progress(event):
            bar.update(task, total=event.total, completed=event.step, description=f"{label} [{event.phase}]")
        yield on_progress


def _engine():
    # our own bar covers the job; the libraries' per-component loading bars would only clutter stderr
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    from .engine.generate import Engine
    return Engine()


def _checkpoint_ref(engine, model: Optional[str]) -> Optional[str]:
    """`--model` takes a registered name or a path to a checkpoint file or diffusers folder (a training
    export); a path is listed in the engine's registry and its resolved form returned as the name to use."""
    if not model:
        return model
    path = Path(model).expanduser()
    if not (model.startswith(("/", "./", "../", "~")) or path.exists()):
        return model
    return engine.registry.add_path(path, "checkpoint").rel_path


def _check_output(output: Optional[Path], count: int) -> None:
    from .core.imageio import output_paths
    if output is not None:
        output_paths(output, count, output, "image")


@app.command()
def generate(
    prompt: str = typer.Argument("", help="prompt in WebUI syntax: (word:1.2), [word], BREAK, <lora:name:0.7>"),
    negative: str = typer.Option("", "--negative", "-n", help="negative prompt"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (imagesmith models list) or path to a checkpoint file or diffusers folder"),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE override"),
    lora: List[str] = typer.Option([], "--lora", help="NAME:WEIGHT, repeatable"),
    clip_skip: int = typer.Option(1, "--clip-skip", help="1 = last layer, 2 = penultimate (WebUI meaning)"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale"),
    cfg_rescale: float = typer.Option(0.0, "--cfg-rescale", help="CFG rescale phi (0.7 for v-prediction models)"),
    performance: Optional[str] = typer.Option(None, "--performance", help="quality (lossless), fast (+ fp8 on "
                                              "Ada/Hopper, FLUX/SD3), turbo (+ step caching); default: "
                                              "IMAGESMITH_PERFORMANCE or quality. imagesmith info lists what each "
                                              "changes on this machine"),
    sampler: str = typer.Option("Euler a", "--sampler", "--sampler-name", help="A1111 or ComfyUI sampler name, e.g. "
                                "'DPM++ 2M' or dpmpp_2m (imagesmith samplers lists them)"),
    schedule: str = typer.Option("automatic", "--schedule", "--scheduler", help="schedule type, e.g. Karras, "
                                 "sgm_uniform, 'Align Your Steps'; automatic: the sampler's default"),
    noise: str = typer.Option("a1111-cpu", "--noise", help="a1111-cpu, a1111-gpu or comfy: whose noise to draw"),
    ensd: int = typer.Option(0, "--ensd", "--eta-noise-seed-delta", help="A1111's eta noise seed delta"),
    sgm_noise: bool = typer.Option(False, "--sgm-noise-multiplier", help="A1111's SGM noise multiplier"),
    seed: int = typer.Option(-1, "--seed", help="-1: random; 0 .. 2^64-1"),
    variation_seed: Optional[int] = typer.Option(None, "--variation-seed"),
    variation_strength: float = typer.Option(0.0, "--variation-strength"),
    batch_size: int = typer.Option(1, "--batch-size"),
    batch_count: int = typer.Option(1, "--batch-count"),
    width: Optional[int] = typer.Option(None, "--width", "-W"),
    height: Optional[int] = typer.Option(None, "--height", "-H"),
    init_image: Optional[str] = typer.Option(None, "--init-image", help="img2img input"),
    strength: float = typer.Option(0.75, "--strength", help="denoising strength for img2img/inpaint"),
    mask: Optional[str] = typer.Option(None, "--mask", help="inpainting mask (white = repaint)"),
    mask_blur: int = typer.Option(4, "--mask-blur"),
    outpaint: Optional[str] = typer.Option(None, "--outpaint", help="LEFT,TOP,RIGHT,BOTTOM pixels to add"),
    hires: Optional[float] = typer.Option(None, "--hires", help="hires fix scale, e.g. 2"),
    hires_steps: int = typer.Option(0, "--hires-steps"),
    hires_strength: float = typer.Option(0.5, "--hires-strength"),
    upscaler: str = typer.Option("Latent", "--upscaler", help="Latent, Lanczos, 'R-ESRGAN 4x+', 'R-ESRGAN 4x+ Anime6B'"),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="ControlNet model name"),
    control_image: Optional[str] = typer.Option(None, "--control-image"),
    control_preprocessor: str = typer.Option("canny", "--control-preprocessor", help="canny or none"),
    control_weight: float = typer.Option(1.0, "--control-weight"),
    from_image: Optional[str] = typer.Option(None, "--from", help="regenerate an imagesmith PNG from its metadata"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file, or folder for several images"),
    latents_out: Optional[Path] = typer.Option(None, "--latents", help="also write the final latents (before the "
                                               "VAE) to this .safetensors file, to compare with another tool's"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
    safety: bool = typer.Option(False, "--safety", help="check the prompt and the images (open_nsfw); flagged images are withheld or blurred "
                                "(IMAGESMITH_SAFETY_ACTION)"),
    detailer: Optional[str] = typer.Option(None, "--detailer", help="repaint detected faces at higher resolution "
                                           "(ADetailer-style): face"),
    detailer_strength: float = typer.Option(0.4, "--detailer-strength", help="denoising strength of the repaint"),
    detailer_prompt: str = typer.Option("", "--detailer-prompt", help="added to the prompt for the repaint"),
    ground: bool = typer.Option(True, "--ground/--no-ground", help="house models: draw the nearest known concept "
                                "for a subject the model was not trained on ('espresso' -> 'cup of coffee')"),
):
    """Generate images (txt2img, img2img with --init-image, inpainting with --mask)."""
    from .core.requests import ControlNetSpec, GenerateRequest, HiresSpec, LoraSpec

    pick = None
    if from_image:
        req, pick = _request_from_png(from_image)
    else:
        fields = dict(
            prompt=prompt, negative_prompt=negative, model=model, vae=vae,
            loras=[LoraSpec.parse(x) for x in lora], clip_skip=clip_skip, steps=steps, cfg_scale=cfg,
            cfg_rescale=cfg_rescale, sampler_name=sampler, scheduler=schedule, noise=noise, eta_noise_seed_delta=ensd,
            sgm_noise_multiplier=sgm_noise, seed=seed, variation_seed=variation_seed,
            variation_strength=variation_strength, batch_size=batch_size, batch_count=batch_count,
            width=width, height=height, init_image=init_image, denoising_strength=strength, mask=mask,
            mask_blur=mask_blur, ground_concepts=ground, performance=performance,
        )
        if outpaint:
            try:
                fields["outpaint"] = tuple(int(x) for x in outpaint.split(","))
                assert len(fields["outpaint"]) == 4
            except (ValueError, AssertionError):
                raise _Exit("--outpaint takes four integers: LEFT,TOP,RIGHT,BOTTOM") from None
        if hires:
            fields["hires"] = HiresSpec(hr_scale=hires, hr_upscaler=upscaler, hr_second_pass_steps=hires_steps,
                                        hr_denoising_strength=hires_strength)
        if controlnet:
            if not control_image:
                raise _Exit("--controlnet needs --control-image")
            fields["controlnet"] = ControlNetSpec(model=controlnet, image=control_image,
                                                  preprocessor=control_preprocessor, weight=control_weight)
        if detailer is not None:
            from .core.requests import DETAILERS, DetailerOptions
            if detailer not in DETAILERS:
                raise _Exit(f"--detailer takes {', '.join(DETAILERS)}, not {detailer!r}")
            fields["detailer"] = DetailerOptions(kind=detailer, strength=detailer_strength, prompt=detailer_prompt)
        req = GenerateRequest(**fields)

    _check_output(output, req.batch_size * req.batch_count)  # fail before the work, not after it
    if latents_out is not None and (latents_out.suffix != ".safetensors" or not latents_out.parent.is_dir()):
        raise _Exit(f"--latents needs a .safetensors file in an existing folder, got {latents_out}")
    gate = None
    if safety:
        from .core.settings import Settings
        from .vision.safety import SafetyGate
        gate = SafetyGate.from_settings(Settings.from_env())
        verdict = gate.check_prompt(req.prompt)
        if verdict.flagged:
            raise _Exit(f"prompt blocked by the safety policy: {verdict.reason}")
    engine = _engine()
    if req.model != (ref := _checkpoint_ref(engine, req.model)):
        req = req.model_copy(update={"model": ref})
    with _progress_bar(not as_json and sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1",
                       "generating") as on_progress:
        result = engine.generate(req, progress=on_progress)
    if pick is not None:  # --from: the run containing the image was redone; keep that one image
        result.images = [result.images[pick]]
        result.records = [result.records[pick].model_copy(update={"index": 0})]
    from .core.outputs import flagged, save_result
    from .core.settings import Settings
    saved = save_result(result, output, default_dir=Settings.from_env().home / "outputs", gate=gate)
    for s in saved:
        if s.flag is not None:
            what = "withheld" if s.path is None else "blurred"
            print(f"imagesmith: {what} the image of seed {s.seed}: {s.flag['reason']}", file=sys.stderr)
    withheld = flagged(saved)
    if latents_out is not None and result.latents is not None:
        from safetensors.torch import save_file
        rows = result.latents[pick:pick + 1] if pick is not None else result.latents
        tmp = latents_out.with_name(latents_out.name + ".part")
        save_file({"latents": rows.contiguous()}, str(tmp), metadata={
            "sampler": req.sampler_name, "scheduler": req.scheduler, "noise": req.noise,
            "seeds": ",".join(str(r.seed) for r in result.records)})
        tmp.replace(latents_out)  # never a half-written file
    summary = {
        "images": [{"path": str(s.path), "seed": r.seed, "variation_seed": r.variation_seed, "infotext": r.infotext}
                   for s, r in zip(saved, result.records) if s.path is not None],
        "model": result.model_name, "model_hash": result.model_hash, "seconds": round(result.seconds, 3),
    }
    if withheld:
        summary["withheld"] = withheld
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for item in summary["images"]:
            print(f"{item['path']}  seed={item['seed']}")
        print(f"{len(summary['images'])} image(s) in {result.seconds:.1f}s with {result.model_name}")


def _request_from_png(path: str):
    """The stored request of an imagesmith PNG, narrowed to the one run that made it."""
    from .core.metadata import read_png_metadata
    from .core.requests import GenerateRequest
    from .core.settings import Settings
    meta = read_png_metadata(path, settings=Settings.from_env())
    data = meta.get("imagesmith")
    if not data or "request" not in data:
        raise _Exit(f"{path} has no imagesmith metadata to regenerate from")
    req = GenerateRequest(**data["request"])
    pos = data.get("index", 0) % req.batch_size
    # A1111 noise: image i of a run has seed + i; ComfyUI noise: the whole run shares one seed
    first_seed = data["seed"] if req.noise == "comfy" else (data["seed"] - pos) % 2**64
    update = {"seed": first_seed, "batch_count": 1}
    if data.get("variation_seed") is not None:
        update["variation_seed"] = (data["variation_seed"] - pos) % 2**64
    return req.model_copy(update=update), pos


@app.command()
def samplers(as_json: bool = typer.Option(False, "--json", help="machine-readable list")):
    """Samplers and schedule types (A1111 and ComfyUI names), and which combine."""
    import json as _json

    from .core.sampling_names import SAMPLER_NAMES, SCHEDULE_NAMES
    from .engine.sampling.ksampler import available_samplers

    ready = set(available_samplers())
    rows = [{"name": s.name, "label": s.label, "aliases": list(s.aliases), "automatic_schedule": s.automatic,
             "noise": s.noise or "none", "flow_models": s.flow, "cfg_pp": s.cfg_pp, "comfyui": s.comfy,
             "implemented": s.name in ready,
             "schedules": [c.name for c in SCHEDULE_NAMES if s.flow or c.flow] } for s in SAMPLER_NAMES]
    schedules = [{"name": c.name, "label": c.label, "comfyui": c.comfy, "a1111": c.a1111,
                  "flow_models": c.flow} for c in SCHEDULE_NAMES]
    if as_json:
        typer.echo(_json.dumps({"samplers": rows, "schedules": schedules}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title="Samplers (any works with any schedule, on epsilon/v models; 'flow' = also SD3/FLUX)")
    for col in ("A1111 label", "ComfyUI name", "Automatic schedule", "noise", "flow"):
        t.add_column(col)
    for r in rows:
        if r["implemented"]:
            t.add_row(r["label"], r["name"], r["automatic_schedule"], r["noise"], "yes" if r["flow_models"] else "no")
    Console().print(t)
    t2 = Table(title="Schedule types")
    for col in ("A1111 label", "ComfyUI name", "in ComfyUI", "flow models"):
        t2.add_column(col)
    for c in schedules:
        t2.add_row(c["label"], c["name"], "yes" if c["comfyui"] else "no", "yes" if c["flow_models"] else "no")
    Console().print(t2)


def _machine_info(settings, as_json: bool) -> None:
    from .engine import performance as perf
    from .models.cache import pick_device
    caps = perf.Capabilities.detect(pick_device(settings.device))
    def planned(mode: str, arch: str) -> dict:
        p = perf.plan(mode, caps, compile_setting=settings.compile, cuda_graphs=settings.cuda_graphs,
                      compile_scope=settings.compile_scope,
                      hotswap=settings.lora_max_rank is not None, arch=arch)
        return {"runs": p.mode, "features": p.features(), "notes": list(p.notes)}

    modes = {mode: {"description": perf.DESCRIPTIONS[mode], "flux_sd3": planned(mode, "flux"),
                    "unet_models": planned(mode, "sdxl"), "default": mode == settings.performance}
             for mode in perf.MODES}
    report = {"capabilities": caps.describe(), "performance_modes": modes,
              "lora_hotswap_max_rank": settings.lora_max_rank, "warmup_sizes": [f"{w}x{h}" for w, h in settings.warmup_sizes]}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    c = report["capabilities"]
    print(f"device: {c['device']} ({c['name']}{', compute ' + c['compute_capability'] if c['compute_capability'] else ''})"
          f"  fp8: {'yes' if c['fp8'] else 'no'}  flash-attention 3: {'yes' if c['flash_attention_3'] else 'no'}"
          f"  torch.compile: {'yes' if c['torch_compile'] else 'no'}")
    for mode, m in modes.items():
        print(f"\n{mode}{' (default)' if m['default'] else ''}: {m['description']}")
        for label, key in (("FLUX/SD3", "flux_sd3"), ("SD1/SD2/SDXL", "unet_models")):
            x = m[key]
            print(f"  {label}: runs {x['runs']} with {', '.join(x['features'])}")
            for note in x["notes"]:
                print(f"    - {note}")
    print(f"\nLoRA hot-swap: {'slots of rank ' + str(settings.lora_max_rank) if settings.lora_max_rank else 'off (IMAGESMITH_LORA_MAX_RANK)'}"
          f"; warm-up sizes: {', '.join(report['warmup_sizes']) or 'none (IMAGESMITH_WARMUP_SIZES)'}")


@app.command()
def info(image: Optional[str] = typer.Argument(None, help="a PNG made by imagesmith or A1111; none: this machine"),
         as_json: bool = typer.Option(False, "--json")):
    """Print the generation parameters stored in an image; without one, this machine's device and what each
    performance mode changes on it."""
    from .core.metadata import read_png_metadata
    from .core.settings import Settings
    if image is None:
        _machine_info(Settings.from_env(), as_json)
        return
    meta = read_png_metadata(image, settings=Settings.from_env())
    if as_json:
        print(json.dumps(meta, indent=2, default=str))
        return
    if not meta.get("parameters") and not meta.get("imagesmith"):
        print(f"{image}: no generation metadata")
        return
    if meta.get("parameters"):
        print(meta["parameters"])
    if meta.get("imagesmith"):
        d = meta["imagesmith"]
        print(f"\nimagesmith {d.get('version')}  mode={d.get('mode')}  seed={d.get('seed')}  model={d.get('model')} [{d.get('model_hash')}]")


@app.command()
def upscale(image: str = typer.Argument(...),
            upscaler: str = typer.Option("R-ESRGAN 4x+", "--upscaler", help="Lanczos, 'R-ESRGAN 4x+', 'R-ESRGAN 4x+ Anime6B'"),
            scale: float = typer.Option(4.0, "--scale", help="2 or 4 (any factor works)"),
            output: Optional[Path] = typer.Option(None, "--output", "-o"),
            as_json: bool = typer.Option(False, "--json")):
    """Upscale an image on its own."""
    from .core.imageio import load_image, save_png_atomic
    from .core.settings import Settings
    from .engine.upscale import UpscalerSet
    if not 1 < scale <= 8:
        raise _Exit(f"--scale must be above 1 and at most 8, got {scale:g}")
    settings = Settings.from_env()
    src = load_image(image, settings=settings, mode=None, what="image")
    up = UpscalerSet(settings).get(upscaler)
    out_path = output or Path(image).with_name(Path(image).stem + f"-x{scale:g}.png")
    with _progress_bar(not as_json and sys.stderr.isatty(), f"upscaling with {upscaler}") as on_progress:
        def tiles(done, total):
            if on_progress:
                from .core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, "upscale"))
        result = up.upscale(src, scale, progress=tiles)
    save_png_atomic(result, out_path, text_chunks={})
    if as_json:
        print(json.dumps({"path": str(out_path), "width": result.width, "height": result.height}))
    else:
        print(f"{out_path}  {src.width}x{src.height} -> {result.width}x{result.height}")


@models_app.command("list")
def models_list(kind: Optional[str] = typer.Option(None, "--kind", help="checkpoint, vae, lora, embedding, upscaler, controlnet"),
                as_json: bool = typer.Option(False, "--json")):
    """List registered models: name, kind, architecture, path, size."""
    from .core.settings import Settings
    from .models.house import make_registry
    rows = make_registry(Settings.from_env()).to_table_rows(kind)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("name", "kind", "arch", "size", "path")
    for r in rows:
        size = r["size_bytes"]
        table.add_row(r["name"], r["kind"], r["arch"], f"{size / 1e6:.1f} MB" if size else "-", str(r["path"]))
    Console().print(table)


@house_app.command("data")
def house_data(cache: Optional[Path] = typer.Option(None, "--cache", help="default: ~/.cache/imagesmith"),
               seed: int = typer.Option(0, "--seed"),
               preview: Optional[Path] = typer.Option(None, "--preview", help="also write a sample sheet PNG here"),
               as_json: bool = typer.Option(False, "--json")):
    """Build the house dataset (fetches the Fluent Emoji 3D npm package into a cache outside git)."""
    from .train.house_data import build_house_dataset, default_cache_dir, save_preview_sheet
    cache_dir = cache or default_cache_dir()
    ds = build_house_dataset(cache_dir, seed=seed, progress=not as_json)
    counts: dict[str, int] = {}
    for obj in ds.objects:
        counts[obj.split] = counts.get(obj.split, 0) + 1
    if preview:
        save_preview_sheet(preview, cache_dir=cache_dir, seed=seed, progress=not as_json)
    summary = {"cache": str(cache_dir), "objects": len(ds.objects), "splits": counts,
               "preview": str(preview) if preview else None}
    print(json.dumps(summary, indent=2) if as_json else
          f"{len(ds.objects)} objects in {cache_dir} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


@train_house_app.command("ldm")
def train_house_ldm(config: Optional[Path] = typer.Option(None, "--config", help="HouseLdmConfig YAML"),
                    stage: str = typer.Option("all", "--stage", help="vae or all"),
                    export: Optional[Path] = typer.Option(None, "--export", help="where the house folder goes")):
    """Train house-ldm (VAE, then UNet); re-running the same command resumes from the last checkpoint."""
    from .train.house_ldm import HouseLdmConfig, house_dataset, run_training
    if stage not in ("vae", "all"):
        raise _Exit(f"--stage must be vae or all, not {stage!r}")
    cfg = HouseLdmConfig.from_yaml(config) if config else HouseLdmConfig()
    out = run_training(cfg, house_dataset(cfg), stage=stage, export=export)
    if out:
        print(f"house-ldm written to {out}")


@train_house_app.command("clip")
def train_house_clip(config: Optional[Path] = typer.Option(None, "--config", help="HouseClipConfig YAML"),
                     export: Optional[Path] = typer.Option(None, "--export", help="where the house-clip folder goes")):
    """Train house-clip (image tower + text head on the frozen MiniLM); re-run to resume."""
    from .train.house_clip import main as clip_main
    args = (["--config", str(config)] if config else []) + (["--export", str(export)] if export else [])
    raise typer.Exit(clip_main(args))


@train_house_app.command("cutout")
def train_house_cutout(config: Optional[Path] = typer.Option(None, "--config", help="HouseCutoutConfig YAML"),
                       export: Optional[Path] = typer.Option(None, "--export", help="where the house-cutout folder goes")):
    """Train house-cutout (salient-object matting U-Net); re-run to resume."""
    from .train.house_cutout import main as cutout_main
    args = (["--config", str(config)] if config else []) + (["--export", str(export)] if export else [])
    raise typer.Exit(cutout_main(args))


@train_app.command("lora")
def train_lora_cmd(config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="LoRA training config (see examples/lora/lora.yaml)"),
                   as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON")):
    """Train a LoRA on a registered checkpoint or house-ldm; re-run the same command to resume."""
    from .train.lora import train_lora
    summary = train_lora(config)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['lora']}  (registered: --lora {summary['name']}:1.0)")
        print(f"{summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}, "
              f"{summary['wall_seconds']} s; card: {summary['card']}")


dataset_app = typer.Typer(no_args_is_help=True, help="Training datasets: check and caption.")
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
def dataset_check(folder: Path = typer.Argument(..., help="kohya-style folder (image + .txt) or one with metadata.jsonl"),
                  min_side: int = typer.Option(256, "--min-side", help="flag images smaller than this on a side"),
                  as_json: bool = typer.Option(False, "--json")):
    """Find missing or empty captions, unreadable images and size outliers; exit 1 when a problem blocks training."""
    from .train.lora_data import scan_folder
    report = scan_folder(folder, min_side=min_side)
    data = report.to_dict()
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        print(f"{folder}: {data['images']} usable images ({data['with_repeats']} with repeats), "
              f"captions from {data['source']}; sides {data['min_side']}-{data['max_side']} px")
        for line in report.problems:
            print(f"  problem: {line}")
        for p, why in report.outliers:
            print(f"  outlier: {p}: {why}")
        for p in report.orphan_captions:
            print(f"  note: {p} has no image")
        if data["ok"]:
            print("ok")
    if not data["ok"]:
        raise _Exit(f"{len(report.problems)} problem(s) in {folder}: fix them before training", 1)


@app.command("classify")
def classify_cmd(images: List[str] = typer.Argument(..., help="image files; or: train FOLDER --name NAME"),
                 labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated labels (zero-shot, house-clip)"),
                 gate: Optional[str] = typer.Option(None, "--gate", help="a trained gate's name"),
                 name: Optional[str] = typer.Option(None, "--name", help="with train: the gate's name"),
                 imagenet: bool = typer.Option(False, "--imagenet", help="the 1,000 ImageNet classes (EfficientNet-Lite0)"),
                 top: int = typer.Option(5, "--top", min=1, max=1000, help="with --imagenet: how many classes"),
                 clip: Optional[str] = typer.Option(None, "--clip", help="zero-shot / gate training on this CLIP: "
                                                    "house-clip (default), a transformers CLIP folder under "
                                                    "models/clip/NAME, or a folder path"),
                 as_json: bool = typer.Option(False, "--json")):
    """Zero-shot classification (--labels), ImageNet classes (--imagenet) or a trained gate (--gate);
    `classify train FOLDER --name N` trains a gate from one sub-folder of images per class."""
    from .core.imageio import load_image
    from .core.settings import Settings
    from .vision.classify import Gate, classify_images, train_gate
    settings = Settings.from_env()
    if images[0] == "train":
        if len(images) != 2 or not name:
            raise _Exit("usage: imagesmith classify train FOLDER --name NAME")
        card = train_gate(images[1], name, settings=settings, clip=clip)
        if as_json:
            print(json.dumps(card, indent=1))
        else:
            print(f"gate {card['name']}: classes {', '.join(card['classes'])}; held-out accuracy "
                  f"{card['holdout_accuracy']:.3f} on {card['holdout_images']} images -> {card['path']}")
        return
    if (labels is not None) + (gate is not None) + imagenet != 1:
        raise _Exit("give one of --labels 'a,b,c', --imagenet or --gate NAME")
    if clip is not None and imagenet:
        raise _Exit("--clip is for zero-shot labels and gates, not --imagenet")
    g = Gate(gate, settings) if gate else None  # an unknown gate fails before any image is read
    loaded = [(p, load_image(p, settings=settings, mode="RGB", what="image")) for p in images]
    found = classify_images([im for _, im in loaded], labels=labels.split(",") if labels is not None else None,
                            imagenet=imagenet, gate=g, top=top, settings=settings, clip=clip)
    rows = [{"file": p, **r} for (p, _), r in zip(loaded, found)]
    if as_json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
    else:
        for r in rows:
            print(f"{r['file']}: {r['label']} ({r['score']:.3f})")


prompt_app = typer.Typer(no_args_is_help=True, help="Prompt helpers.")
app.add_typer(prompt_app, name="prompt")


@prompt_app.command("expand")
def prompt_expand(request: str = typer.Argument(..., help="a short request, e.g. 'a white cat, 3D'"),
                  n: int = typer.Option(5, "--n", min=1, max=20, help="how many prompts"),
                  seed: int = typer.Option(0, "--seed", help="same seed, same prompts"),
                  as_json: bool = typer.Option(False, "--json")):
    """Expand a short request into detailed prompts (style, composition, camera, lighting, palette), offline."""
    from .workflows.prompt_assist import PromptAssistant
    from .workflows.llm import LLMConfig
    results = PromptAssistant().expand(request, n=n, seed=seed, llm=LLMConfig.from_env())  # IMAGESMITH_LLM_URL
    if results and results[0].get("llm_error"):
        print(f"imagesmith: note: the LLM failed ({results[0]['llm_error']}); offline prompts instead", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        for i, r in enumerate(results, 1):
            print(f"{i}. {r['prompt']}")


@app.command("restyle")
def restyle_cmd(photo: str = typer.Argument(..., help="the input photo"),
                gate: Optional[str] = typer.Option(None, "--gate", help="a trained gate the photo must pass"),
                gate_class: Optional[str] = typer.Option(None, "--gate-class", help="the gate's accepting class "
                                                         "(default: yes/pass/ok/... when it has one)"),
                gate_threshold: float = typer.Option(0.5, "--gate-threshold", help="least score of the accepting class"),
                lora: List[str] = typer.Option([], "--lora", help="style LoRA NAME:WEIGHT, repeatable"),
                concept: Optional[str] = typer.Option(None, "--concept", help="the new scene, e.g. 'on a marble table'"),
                strength: Optional[float] = typer.Option(None, "--strength", help="img2img from the photo at this "
                                                         "denoising strength (default: txt2img)"),
                seed: int = typer.Option(-1, "--seed", help="-1: random"),
                model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint (default: house-ldm)"),
                steps: int = typer.Option(20, "--steps"),
                cfg: float = typer.Option(5.0, "--cfg", help="CFG scale"),
                clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that describes and labels: "
                                                   "house-clip (default) or a transformers CLIP under models/clip/NAME"),
                output: Path = typer.Option(..., "--output", "-o", help="output folder (restyled.png, boxes.png, "
                                            "restyle.json)"),
                as_json: bool = typer.Option(False, "--json", help="print restyle.json on stdout")):
    """Gate -> describe -> prompt -> generate -> boxes and labels of the main objects in the new image."""
    from .core.requests import LoraSpec
    from .workflows.restyle import RestyleRequest, restyle
    req = RestyleRequest(photo=photo, gate=gate, gate_class=gate_class, gate_threshold=gate_threshold,
                         loras=[LoraSpec.parse(x) for x in lora], concept=concept, strength=strength, seed=seed,
                         model=model, steps=steps, cfg_scale=cfg, clip=clip)
    if output.exists() and not output.is_dir():
        raise _Exit(f"output {output} exists and is not a folder")
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "restyle") as on_progress:
        result = restyle(req, engine=_engine(), output=output, progress=on_progress)
    rec = result.record
    if as_json:
        print(json.dumps(rec, indent=1, ensure_ascii=False))
        return
    if rec["gate"]:
        print(f"gate {rec['gate']['gate']}: {rec['gate']['class']} {rec['gate']['score']:.3f} (passed)")
    print(f"described: {rec['description']['caption']}\nprompt: {rec['prompt']}")
    for o in rec["objects"]:
        print(f"  {o['label']} {o['score']:.2f}  box {o['box']}")
    print(f"{output / 'restyled.png'}  seed={rec['seed']}  {len(rec['objects'])} object(s)\n"
          f"{output / 'boxes.png'}\n{output / 'restyle.json'}")


@app.command("describe")
def describe_cmd(images: List[Path] = typer.Argument(..., help="image files"),
                 top: int = typer.Option(5, "--top", help="how many tags"),
                 captioner: Optional[str] = typer.Option(None, "--captioner", help="a local BLIP or VLM (Qwen2-VL) "
                                                         "folder of safetensors, or a name under models/captioners"),
                 question: Optional[str] = typer.Option(None, "--question", help="with --captioner: BLIP's text prefix "
                                                        "(e.g. 'a photography of') or the VLM's instruction"),
                 clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that names the object and tags: "
                                                    "house-clip (default), a transformers CLIP under "
                                                    "models/clip/NAME, or a folder path"),
                 as_json: bool = typer.Option(False, "--json")):
    """Describe images offline: a caption usable as a prompt, tags with scores, ImageNet classes, dominant colours
    and tone; with --captioner, the caption comes from your BLIP/VLM weights."""
    from .core.imageio import load_image
    from .core.settings import Settings
    from .vision.caption import Captioner, describe
    settings = Settings.from_env()
    loaded = [(p, load_image(str(p), settings=settings, mode="RGB", what="image")) for p in images]  # all checked first
    from .vision.caption import TransformersCaptioner
    from .vision.imagenet import ImageNetClassifier
    if question and not captioner:
        raise _Exit("--question steers a model captioner: give --captioner PATH too")
    model_cap = TransformersCaptioner(captioner, settings=settings) if captioner else None
    cap, inet = Captioner(clip=clip, settings=settings), ImageNetClassifier(settings)
    results = [{"file": str(p), **describe(im, top_k=top, captioner=cap, imagenet=inet, model_captioner=model_cap,
                                           question=question)} for p, im in loaded]
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return
    for r in results:
        colours = ", ".join(f"{c['hex']} {c['share']:.0%}" for c in r["dominant_colors"][:3])
        tags = ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["tags"])
        by_imagenet = r.get("object_source") == "imagenet"  # then the CLIP's ranking is the other opinion
        other, other_name = (r["clip_tags"], r["clip"]) if by_imagenet else (r.get("imagenet", []), "imagenet")
        other_line = ", ".join(f"{t['label']} {t['score']:.2f}" for t in other)
        print(f"{r['file']}: {r['caption']}\n  tags ({r.get('object_source', r['clip'])}): {tags}\n"
              f"  {other_name}: {other_line}\n  colours: {colours}; tone {r['tone']}, brightness {r['brightness']}")


@dataset_app.command("caption")
def dataset_caption(folder: Path = typer.Argument(..., help="folder of images; captions go beside them as .txt"),
                    overwrite: bool = typer.Option(False, "--overwrite", help="re-caption images that have a caption"),
                    trigger: Optional[str] = typer.Option(None, "--trigger", help="put this word first in each caption"),
                    labels: Optional[Path] = typer.Option(None, "--labels", help="a text file of object names, one a line "
                                                          "(default: house-clip's 725 training objects)"),
                    clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that names the object "
                                                       "(default house-clip; or a transformers CLIP by name/folder)"),
                    as_json: bool = typer.Option(False, "--json")):
    """Write captions with imagesmith's own models (house-clip names the object, house-cutout finds the backdrop)."""
    from .vision.caption import caption_folder
    names = None
    if labels is not None:
        if not labels.is_file():
            raise _Exit(f"labels file {labels} does not exist")
        names = [x.strip() for x in labels.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not names:
            raise _Exit(f"labels file {labels} is empty")
    records = caption_folder(folder, overwrite=overwrite, trigger_word=trigger, labels=names, progress=not as_json,
                             clip=clip)
    if as_json:
        print(json.dumps(records, indent=1))
    else:
        for r in records:
            print(f"{'wrote' if r['written'] else 'kept '}  {r['file']}: {r.get('caption', r.get('error'))}")


@house_app.command("styles")
def house_styles(styles: Optional[List[str]] = typer.Argument(None, help="fluent-flat, noto, openmoji (default: all)"),
                 train: bool = typer.Option(False, "--train", help="also train each style's LoRA on house-ldm"),
                 ship: bool = typer.Option(False, "--ship", help="with --train: copy the LoRAs into the package (maintainers)"),
                 as_json: bool = typer.Option(False, "--json")):
    """Build the house style datasets from their npm icon sets (and train the style LoRAs)."""
    from .core.settings import Settings
    from .train.house_styles import STYLES, build_style_dataset, train_style
    chosen = styles or list(STYLES)
    unknown = [s for s in chosen if s not in STYLES]
    if unknown:
        raise _Exit(f"unknown style {unknown[0]!r}; known: {', '.join(STYLES)}")
    settings = Settings.from_env()
    results = {}
    for style in chosen:
        if train:
            results[style] = train_style(style, settings, ship=ship)
        else:
            results[style] = {"dataset": str(build_style_dataset(style, cache_dir=settings.home / "cache"))}
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        for style, r in results.items():
            print(f"{style}: " + (r.get("shipped") or r.get("lora") or r["dataset"]))


@house_app.command("sheet")
def house_sheet(output: Path = typer.Option(Path("docs/house-ldm-samples.png"), "-o", "--output"),
                model: Optional[str] = typer.Option(None, "--model", help="checkpoint name or folder path (default: house-ldm)"),
                steps: int = typer.Option(20, "--steps"), cfg_scale: float = typer.Option(5.0, "--cfg-scale"),
                sampler: str = typer.Option("DPM++ 2M", "--sampler"), schedule: str = typer.Option("karras", "--scheduler"),
                seed: int = typer.Option(1, "--seed")):
    """Draw the house-ldm sample sheet: 32 objects, outside wording, backdrops, colours, seeds."""
    from .train.house_eval import SheetSettings, render_sheet
    st = SheetSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, scheduler=schedule, seed=seed)
    engine = _engine()
    print(render_sheet(engine, output, settings=st, model=_checkpoint_ref(engine, model)))


@house_app.command("eval")
def house_eval(which: str = typer.Argument("ldm", help="ldm, clip, cutout or all"),
               n: int = typer.Option(64, "--n", help="held-out samples (ldm)"),
               model: Optional[str] = typer.Option(None, "--model", help="checkpoint for ldm name or folder path (default: house-ldm)"),
               steps: int = typer.Option(20, "--steps", min=1, max=150, help="ldm: sampling steps"),
               cfg: float = typer.Option(5.0, "--cfg", min=0.0, max=30.0, help="ldm: CFG scale"),
               sheet_seeds: int = typer.Option(4, "--sheet-seeds", min=0, max=16,
                                               help="ldm: seeds per bare sheet prompt for the 'sheet' metrics "
                                               "(recognition and seed variety); 0 skips them"),
               as_json: bool = typer.Option(False, "--json")):
    """Held-out metrics of the house models (val_views / val_objects splits of the house dataset); for ldm
    also the sample sheet's bare prompts ("a teapot") over several seeds."""
    from .train import house_eval as E
    if which not in ("ldm", "clip", "cutout", "all"):
        raise _Exit(f"which must be ldm, clip, cutout or all, not {which!r}")
    results: dict = {}
    if which in ("clip", "all"):
        from .models.house_clip import load_house_clip
        from .train.house_clip import HouseClipConfig, evaluate as evaluate_clip
        clip = load_house_clip()
        cfg = HouseClipConfig().model_copy(update={"image_size": clip.arch.image_size})
        results["house-clip"] = evaluate_clip(clip, config=cfg, progress=not as_json)
    if which in ("cutout", "all"):
        from .models.segment import HouseCutout, house_cutout_dir
        from .train.house_cutout import HouseCutoutConfig, evaluate as evaluate_cutout, house_eval_datasets
        seg = HouseCutout(house_cutout_dir())
        native, large = house_eval_datasets(HouseCutoutConfig(), None, seg.size)
        results["house-cutout"] = evaluate_cutout(seg, native, large_dataset=large)
    if which in ("ldm", "all"):
        from .models.house_clip import load_house_clip
        from .models.segment import load_segmenter
        engine, clip, st = _engine(), load_house_clip(), E.SheetSettings(steps=steps, cfg_scale=cfg)
        model = _checkpoint_ref(engine, model)
        results["house-ldm"] = E.evaluate_ldm(engine, clip, cutout=load_segmenter("house-cutout"), n=n, model=model,
                                              progress=not as_json, settings=st)
        if sheet_seeds:
            results["house-ldm"]["sheet"] = E.sheet_metrics(engine, clip, settings=st, model=model,
                                                            seeds=tuple(range(1, sheet_seeds + 1)),
                                                            progress=not as_json)
    print(json.dumps(results, indent=2))


@house_app.command("objects")
def house_objects(output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                        help="write the report (ranks per object) as JSON here"),
                  weights: Optional[Path] = typer.Option(None, "--weights", help="write hard-object visit weights "
                                                         "(the object_weights training key) as JSON here"),
                  model: Optional[str] = typer.Option(None, "--model", help="checkpoint name or folder path (default: house-ldm)"),
                  seeds: int = typer.Option(1, "--seeds", min=1, max=16, help="images per object (seeds 1..N)"),
                  steps: int = typer.Option(20, "--steps", min=1, max=150),
                  cfg: float = typer.Option(5.0, "--cfg", min=0.0, max=30.0),
                  as_json: bool = typer.Option(False, "--json")):
    """Draw every training object from its bare name and rank it with house-clip: which objects the model
    draws badly (and, with --weights, a curriculum that visits them more often in the next fine-tune)."""
    import numpy as np

    from .core.imageio import write_json_atomic
    from .models.house_clip import load_house_clip
    from .train import house_eval as E
    for path in (output, weights):
        if path is not None and not path.parent.is_dir():
            raise _Exit(f"{path.parent}: no such folder")
    st = E.SheetSettings(steps=steps, cfg_scale=cfg)
    engine = _engine()
    report = E.object_recognition(engine, load_house_clip(), settings=st, model=_checkpoint_ref(engine, model),
                                  seeds=tuple(range(1, seeds + 1)), progress=not as_json)
    if output is not None:
        write_json_atomic(output, report)
    summary = {k: v for k, v in report.items() if k != "ranks"}
    if weights is not None:
        w = E.hard_object_weights(report)
        write_json_atomic(weights, dict(sorted(w.items())))
        summary["weights"] = {str(k): sum(1 for v in w.values() if v == k) for k in sorted(set(w.values()))}
    worst = sorted(report["ranks"].items(), key=lambda kv: -float(np.mean(kv[1])))[:10]
    summary["worst"] = [name for name, _ in worst]
    print(json.dumps(summary) if as_json else json.dumps(summary, indent=2))


def _segmenter(name: Optional[str]):
    from .models.segment import resolve_segmenter
    return resolve_segmenter(name)


@app.command()
def cutout(image: str = typer.Argument(..., help="product photo (an RGBA image is used as it is)"),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="RGBA PNG (default: IMAGE-cutout.png)"),
           segmenter: Optional[str] = typer.Option(None, "--segmenter", help="house-cutout (default), a registered "
                                                   "segmenter or a .onnx file"),
           no_refine: bool = typer.Option(False, "--no-refine", help="skip edge feathering and decontamination"),
           as_json: bool = typer.Option(False, "--json")):
    """Cut the product out: soft alpha, refined edges, background spill removed."""
    import time
    from .core.imageio import load_image, save_png_atomic
    from .core.settings import Settings
    from .vision.cutout import cutout as run_cutout
    src = load_image(image, settings=Settings.from_env(), mode=None, what="image")
    out_path = output or Path(image).with_name(Path(image).stem + "-cutout.png")
    if out_path.suffix.lower() != ".png":
        raise _Exit(f"{out_path}: the cutout is written as PNG (it has an alpha channel); use a .png name")
    t = time.perf_counter()
    cut = run_cutout(src, _segmenter(segmenter), refine=not no_refine)
    seconds = time.perf_counter() - t
    save_png_atomic(cut.rgba, out_path, text_chunks={})
    summary = {"path": str(out_path), "width": cut.rgba.width, "height": cut.rgba.height, "box": list(cut.box),
               "coverage": round(float(cut.coverage), 4), "source": cut.source, "seconds": round(seconds, 3)}
    print(json.dumps(summary) if as_json else f"{out_path}  product box {list(cut.box)}  "
          f"coverage {cut.coverage:.1%}  ({cut.source}, {seconds:.2f}s)")


@app.command()
def analyze(image: str = typer.Argument(...),
            maps: Optional[Path] = typer.Option(None, "--maps", help="folder for saliency and free-space PNGs"),
            captioner: Optional[str] = typer.Option(None, "--captioner", help="add a free-text description by your "
                                                    "VLM (Qwen2-VL) or BLIP weights: a folder or a name under "
                                                    "models/captioners (never used for placement)"),
            question: Optional[str] = typer.Option(None, "--question", help="with --captioner: the instruction "
                                                   "or BLIP prefix"),
            as_json: bool = typer.Option(False, "--json")):
    """Measure an image: dominant colours, tone, brightness, saliency, free space, copy regions; with
    --captioner, a VLM's free-text description beside the measurements."""
    from .core.imageio import load_image
    from .core.settings import Settings
    from .vision.analyze import analyze as run_analyze, save_maps
    settings = Settings.from_env()
    if question and not captioner:
        raise _Exit("--question steers a model captioner: give --captioner PATH too")
    src = load_image(image, settings=settings, mode="RGB", what="image")
    describer = None
    if captioner:
        from .vision.caption import TransformersCaptioner
        describer = TransformersCaptioner(captioner, settings=settings)  # a bad folder fails before any work
    analysis, arrays = run_analyze(src)
    if describer is not None:  # prose rides along; copy regions and placement come from the measured maps only
        analysis.description = describer(src, question)
    data = analysis.model_dump()
    if maps is not None:
        data["maps"] = save_maps(arrays, maps)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(f"{image}: {analysis.width}x{analysis.height}, tone {analysis.tone}, brightness {analysis.brightness:.2f}")
    if analysis.description:
        print(f"description: {analysis.description}")
    print("colours: " + ", ".join(f"{c['hex']} {c['share']:.0%}" for c in analysis.dominant_colors))
    for r in analysis.copy_regions:
        print(f"copy region {r['box']} score {r['score']:.3f}")


@app.command()
def ad(products: List[str] = typer.Argument(..., help="product photos (files or folders)"),
       concept: str = typer.Option(..., "--concept", help="the scene around the product"),
       headline: str = typer.Option(..., "--headline"),
       subline: Optional[str] = typer.Option(None, "--subline"),
       cta: Optional[str] = typer.Option(None, "--cta", help="call-to-action button label"),
       brand_color: Optional[str] = typer.Option(None, "--brand-color", help="#rrggbb"),
       formats: str = typer.Option("1:1,4:5,9:16,1.91:1", "--formats",
                                   help="comma list: 1:1,4:5,9:16,1.91:1,300x250,728x90,300x600,320x50 or "
                                        "social, display, all"),
       variations: int = typer.Option(1, "--variations"),
       seed: int = typer.Option(-1, "--seed"),
       model: Optional[str] = typer.Option(None, "--model", help="checkpoint that paints the background"),
       negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt for the background"),
       steps: int = typer.Option(20, "--steps"),
       cfg: float = typer.Option(5.0, "--cfg"),
       sampler: str = typer.Option("DPM++ 2M", "--sampler"),
       schedule: str = typer.Option("karras", "--schedule", "--scheduler"),
       upscaler: str = typer.Option("R-ESRGAN 4x+", "--upscaler", help="brings the painted scene to format size"),
       position: str = typer.Option("auto", "--position", help="auto, center, bottom, left, right"),
       no_shadow: bool = typer.Option(False, "--no-shadow"),
       reflection: bool = typer.Option(False, "--reflection"),
       harmonize: bool = typer.Option(False, "--harmonize", help="colour-match the product to the scene "
                                      "(then its pixels may change; the manifest says so)"),
       harmonize_mode: str = typer.Option("edge", "--harmonize-mode", help="edge (edge band) or full (whole product)"),
       segmenter: Optional[str] = typer.Option(None, "--segmenter"),
       props: str = typer.Option("auto", "--props", help="objects painted away from the product: auto (cleared in "
                                 "banners and for house models), keep or clear"),
       output: Path = typer.Option(..., "--output", "-o", help="output folder (manifest.json goes here)"),
       as_json: bool = typer.Option(False, "--json", help="print the manifest on stdout")):
    """Product photos + a concept -> finished ads in every format (PNG + editable HTML + manifest.json)."""
    from .core.requests import AdRequest
    from .workflows.product_ad import ProductAdStudio
    files: list[str] = []
    for p in products:
        path = Path(p)
        if path.is_dir():
            files += sorted(str(f) for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        else:
            files.append(p)
    if not files:
        raise _Exit("no product photos found in " + ", ".join(products))
    if harmonize_mode not in ("edge", "full"):
        raise _Exit(f"--harmonize-mode takes edge or full, not {harmonize_mode!r}")
    fields = dict(products=files, concept=concept, headline=headline, subline=subline, cta=cta,
                  brand_color=brand_color, formats=[f.strip() for f in formats.split(",") if f.strip()],
                  variations=variations, seed=seed, model=model, steps=steps, cfg_scale=cfg, sampler_name=sampler,
                  scheduler=schedule, upscaler=upscaler, position=position, shadow=not no_shadow, reflection=reflection,
                  harmonize=harmonize_mode if harmonize else "off", segmenter=segmenter, props=props)
    if negative is not None:
        fields["negative_prompt"] = negative
    req = AdRequest(**fields)
    studio = ProductAdStudio(_engine())
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "ads") as on_progress:
        def batch_progress(done, total, label):
            if on_progress:
                from .core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, label))
        result = studio.make(req, output, progress=batch_progress)
    if as_json:
        print(Path(result.manifest_path).read_text())
    else:
        for o in result.outputs:
            print(f"{o.path}  {o.width}x{o.height}  seed={o.seed}  occ={o.occ:.3f}  "
                  f"min contrast={min(t['contrast_ratio'] for t in o.text):.1f}")
        for f in result.failures:
            print(f"FAILED {f.product}{' [' + f.format + ']' if f.format else ''}: {f.error}", file=sys.stderr)
        print(f"{len(result.outputs)} ad(s), {len(result.failures)} failure(s); manifest {result.manifest_path}")
    if result.failures and not result.outputs:
        raise _Exit(result.failures[0].error)
    if result.failures:
        raise SystemExit(1)


@eval_app.command("cutout")
def eval_cutout(segmenter: Optional[str] = typer.Option(None, "--segmenter", help="default house-cutout"),
                as_json: bool = typer.Option(False, "--json")):
    """Cutout MAE and IoU on held-out composites (house dataset's held-out objects on new backdrops)."""
    from .train.house_cutout import HouseCutoutConfig, evaluate as evaluate_cutout, house_eval_datasets
    seg = _segmenter(segmenter)
    native, large = house_eval_datasets(HouseCutoutConfig(), None, getattr(seg, "size", 128))
    metrics = evaluate_cutout(seg, native, large_dataset=large)
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k}: {v}")


@eval_app.command("report")
def eval_report(config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="prompts, seeds, configurations (see examples/report/house-styles.yaml)"),
                output: Optional[Path] = typer.Option(None, "-o", "--output", help="report folder (default: the config's output)"),
                as_json: bool = typer.Option(False, "--json", help="print report.json's summary part")):
    """Render prompts x seeds under several configurations; write report.html, report.md, report.json."""
    import time as _time

    from .core.settings import Settings
    from .eval.report import ReportConfig, run_report
    cfg = ReportConfig.from_yaml(config)
    cfg.requests()  # every request is valid: fail before loading anything
    out = output or cfg.output or Settings.from_env().home / "outputs" / "reports" / _time.strftime("%Y%m%d-%H%M%S")
    engine = _engine()
    with _progress_bar(not as_json and sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1",
                       "report") as on_progress:
        report = run_report(engine, cfg, out, progress=on_progress)
    if as_json:
        print(json.dumps({k: report[k] for k in ("title", "per_configuration", "winners", "summary")}, indent=1))
    else:
        print(report["summary"])
        print(f"{out / 'report.html'}\n{out / 'report.md'}")


@eval_app.command("ads")
def eval_ads(manifests: List[str] = typer.Argument(..., help="manifest.json files or folders holding them"),
             as_json: bool = typer.Option(False, "--json")):
    """Layout and legibility statistics over finished ads: mean Occ/Rea, contrast pass rate, file sizes."""
    from .eval.ads import summarize_ads
    stats = summarize_ads(manifests)
    if as_json:
        print(json.dumps(stats, indent=2))
    else:
        for k, v in stats.items():
            print(f"{k}: {v}")


@app.command()
def grid(
    prompt: str = typer.Argument(..., help="base prompt in WebUI syntax"),
    x: Optional[str] = typer.Option(None, "--x", help="x axis (columns): FIELD=V1,V2,... e.g. 'cfg_scale=3,5,7', "
                                    "'steps=10-30 (+10)', 'loras=a(1.0) | a(0.7)+b(0.5) | none', 'prompt_sr=red,blue'"),
    y: Optional[str] = typer.Option(None, "--y", help="y axis (rows), same syntax"),
    z: Optional[str] = typer.Option(None, "--z", help="z axis (one panel per value), same syntax"),
    negative: str = typer.Option("", "--negative", "-n", help="negative prompt"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (imagesmith models list)"),
    lora: List[str] = typer.Option([], "--lora", help="NAME:WEIGHT in every cell, repeatable"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale"),
    sampler: str = typer.Option("Euler a", "--sampler", help="WebUI sampler name, e.g. 'DPM++ 2M'"),
    schedule: str = typer.Option("normal", "--schedule", "--scheduler", help="normal, karras, exponential"),
    seed: int = typer.Option(-1, "--seed", help="-1: one random seed for every cell"),
    width: Optional[int] = typer.Option(None, "--width", "-W"),
    height: Optional[int] = typer.Option(None, "--height", "-H"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for the cells, grid.png, grid.json"),
    as_json: bool = typer.Option(False, "--json", help="print grid.json's summary on stdout"),
):
    """X/Y/Z plot: sweep request fields along up to three axes into one labelled grid (+ grid.json)."""
    import time as _time

    from .core.requests import GenerateRequest, LoraSpec
    from .core.settings import Settings
    from .eval.grid import AxisSpec, GridRequest, run_grid

    base = GenerateRequest(prompt=prompt, negative_prompt=negative, model=model,
                           loras=[LoraSpec.parse(v) for v in lora], steps=steps, cfg_scale=cfg,
                           sampler_name=sampler, scheduler=schedule, seed=seed, width=width, height=height)
    req = GridRequest(base=base, x=AxisSpec.parse(x) if x else None, y=AxisSpec.parse(y) if y else None,
                      z=AxisSpec.parse(z) if z else None)
    req.plan()  # every cell's request is valid: fail before loading anything
    out_dir = output or Settings.from_env().home / "outputs" / "grids" / _time.strftime("%Y%m%d-%H%M%S")
    engine = _engine()
    with _progress_bar(not as_json and sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1",
                       "grid") as on_progress:
        result = run_grid(engine, req, out_dir, progress=on_progress)
    if as_json:
        print(result.json_path.read_text(encoding="utf-8"))
    else:
        print(f"{result.grid_path}  ({len(result.cells)} cells in {result.seconds:.1f}s)")
        print(f"{result.json_path}")


@app.command("serve")
def serve(host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(7860, "--port"),
          workers: int = typer.Option(1, "--workers", help="worker threads in this process (0: API only; run `imagesmith worker`)"),
          ray_address: Optional[str] = typer.Option(None, "--ray", help="run the workers as Ray actors: 'auto', 'local' or a cluster address"),
          batch: Optional[int] = typer.Option(None, "--batch", min=1, max=64, help="most compatible txt2img jobs one "
                                              "pipeline call takes (default IMAGESMITH_WORKER_BATCH or 4; 1: off)")):
    """Start the HTTP API (/v1 jobs, A1111-compatible /sdapi/v1, OpenAPI at /docs) with its worker(s)."""
    import threading

    import uvicorn

    from .core.settings import Settings
    from .serve.app import create_app, default_store
    from .serve.worker import Worker
    settings = Settings.from_env()
    store = default_store(settings)
    loopback = host in ("127.0.0.1", "localhost", "::1")
    auth = not loopback or os.environ.get("IMAGESMITH_AUTH", "") in ("1", "true", "yes")
    if ray_address:
        from .serve.ray_workers import start_ray_workers
        actors = start_ray_workers(ray_address, store.url, str(settings.home), max(1, workers), batch=batch)
        print(f"{len(actors)} Ray worker actor(s) on {ray_address}", file=sys.stderr)
    from .models.cache import ModelCache
    cache = ModelCache(settings)  # one per process: the worker threads load each model once, together
    local = [Worker(store, settings, batch=batch, cache=cache) for _ in range(0 if ray_address else workers)]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in local]
    for t in threads:
        t.start()
    if auth:
        print("auth on: every route but /healthz and /readyz needs 'Authorization: Bearer <token>' "
              "(imagesmith users add NAME; imagesmith tokens create NAME)", file=sys.stderr)
    # uvicorn takes SIGTERM/SIGINT while it runs (stops accepting, answers what is in flight), then restores these
    # handlers and raises the signal again: so the workers hear it after the HTTP side has stopped
    _stop_gracefully_on_signals(local)
    uvicorn.run(create_app(settings, store, require_auth=auth), host=host, port=port, log_level="info")
    for w in local:
        w.shutdown()
    for t in threads:
        t.join(timeout=120)


users_app = typer.Typer(no_args_is_help=True, help="Service users.")
app.add_typer(users_app, name="users")
tokens_app = typer.Typer(no_args_is_help=True, help="Service API tokens (stored hashed).")
app.add_typer(tokens_app, name="tokens")


queue_app = typer.Typer(no_args_is_help=True, help="The service's job queue as a whole: pause, resume, export.")
app.add_typer(queue_app, name="queue")


def _queue_line(state: dict) -> str:
    depth = ", ".join(f"{k} {v}" for k, v in sorted(state["depth"].items())) or "empty"
    if not state["paused"]:
        return f"queue running ({depth})"
    why = f": {state['reason']}" if state.get("reason") else ""
    return f"queue PAUSED by {state['changed_by']}{why} ({depth}); workers claim nothing until 'imagesmith queue resume'"


@queue_app.command("status")
def queue_status(as_json: bool = typer.Option(False, "--json", help="print the state as JSON")):
    """Whether the queue is paused, and how many jobs are in each state."""
    from .core.settings import Settings
    from .serve.app import default_store
    state = default_store(Settings.from_env()).queue_state()
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("pause")
def queue_pause(reason: Optional[str] = typer.Option(None, "--reason", help="shown to whoever looks"),
                as_json: bool = typer.Option(False, "--json")):
    """Workers claim nothing until resumed; jobs are still accepted and wait; running jobs finish. Durable."""
    from .core.settings import Settings
    from .serve.app import default_store
    state = default_store(Settings.from_env()).set_paused(True, by=os.environ.get("USER") or "cli", reason=reason)
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("resume")
def queue_resume(as_json: bool = typer.Option(False, "--json")):
    """Let workers claim jobs again."""
    from .core.settings import Settings
    from .serve.app import default_store
    state = default_store(Settings.from_env()).set_paused(False, by=os.environ.get("USER") or "cli")
    print(json.dumps(state, indent=2) if as_json else _queue_line(state))


@queue_app.command("export")
def queue_export(output: Path = typer.Argument(..., help="JSON file to write ('-': stdout)"),
                 user: Optional[str] = typer.Option(None, "--user", help="only this user's jobs (default: all)")):
    """Every unfinished job as a JSON document that POST /v1/queue/import takes back (here or on another server)."""
    from .core.settings import Settings
    from .serve.app import default_store, export_queue_doc
    settings = Settings.from_env()
    doc = export_queue_doc(default_store(settings), settings, user=user)
    text = json.dumps(doc, indent=1)
    if str(output) == "-":
        print(text)
        return
    if not output.parent.is_dir() or output.is_dir():
        raise _Exit(f"cannot write {output}: give a file in an existing folder")
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(output)  # never a partial file
    print(f"{len(doc['jobs'])} unfinished jobs -> {output}", file=sys.stderr)


@users_app.command("add")
def users_add(name: str, admin: bool = typer.Option(False, "--admin", help="sees every user's jobs and files")):
    """Add a user to the service's job store."""
    from .core.settings import Settings
    from .serve.app import default_store
    user = default_store(Settings.from_env()).add_user(name, "admin" if admin else "user")
    print(f"user {user['name']} ({user['role']})")


@tokens_app.command("create")
def tokens_create(user: str):
    """Create an API token for USER; it is printed once and stored only as a hash."""
    from .core.settings import Settings
    from .serve.app import default_store
    print(default_store(Settings.from_env()).create_token(user))


@app.command("worker")
def worker_cmd(lease: float = typer.Option(30.0, "--lease", min=1.0, help="seconds a claimed job is leased for; a "
                                           "dead worker's job runs again after it (heartbeats renew it)"),
               batch: Optional[int] = typer.Option(None, "--batch", min=1, max=64, help="most compatible txt2img "
                                                   "jobs one pipeline call takes (default IMAGESMITH_WORKER_BATCH "
                                                   "or 4; 1: off)")):
    """Run a worker against the job store (IMAGESMITH_DATABASE_URL, default the home's SQLite)."""
    from .core.settings import Settings
    from .serve.app import default_store
    from .serve.worker import Worker
    settings = Settings.from_env()
    w = Worker(default_store(settings), settings, lease_s=lease, batch=batch)
    print(f"worker {w.id} on {w.store.url.split('://')[0]} (batches of up to {w.batch})", file=sys.stderr)
    _stop_gracefully_on_signals([w])
    w.run_forever()
    print(f"worker {w.id} stopped", file=sys.stderr)


def _stop_gracefully_on_signals(workers: list) -> None:
    """SIGTERM/SIGINT: each worker finishes its current step, hands its job back to the queue and stops."""
    import signal

    def stop(signum, frame) -> None:
        print(f"{signal.Signals(signum).name}: stopping after the current step; running jobs go back to the queue",
              file=sys.stderr)
        for w in workers:
            w.shutdown()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


@app.command("storyboard")
def storyboard_cmd(
    script: Path = typer.Argument(..., metavar="SCRIPT.txt", help="script: scene markers (INT./EXT./SCENE/#/씬/장면/1.), "
                                  "paragraphs or sentences; a first line 'Title: ...' names the sheet"),
    panels: Optional[int] = typer.Option(None, "--panels", help="merge/split the scenes into exactly N panels"),
    style: Optional[str] = typer.Option(None, "--style", help="style LoRA shared by every panel, e.g. style-noto"),
    style_weight: float = typer.Option(0.8, "--style-weight"),
    seed: int = typer.Option(-1, "--seed", help="-1: random; panel i (1-based) uses seed + i - 1"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (default house-ldm)"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(5.0, "--cfg", help="CFG scale"),
    title: Optional[str] = typer.Option(None, "--title", help="sheet title (default: the script's 'Title:' line)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (panels, storyboard.png/.pdf/.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest on stdout"),
):
    """Script -> storyboard: scenes, shots, consistent prompts, one panel each, sheet as PNG + PDF.

    An OpenAI-compatible LLM splits scenes and reviews the logic when IMAGESMITH_LLM_URL is set
    (IMAGESMITH_LLM_MODEL, IMAGESMITH_LLM_KEY); otherwise rules do it, offline."""
    from .workflows.storyboard import LLMConfig, StoryboardRequest, storyboard
    if not script.is_file():
        raise _Exit(f"script file not found: {script}")
    try:
        text = script.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _Exit(f"{script} is not UTF-8 text") from None
    except OSError as exc:
        raise _Exit(f"cannot read {script}: {exc.strerror or exc}") from None
    req = StoryboardRequest(script=text, title=title, panels=panels, style=style, style_weight=style_weight, seed=seed,
                            model=model, steps=steps, cfg_scale=cfg, output=str(output), llm=LLMConfig.from_env())
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "storyboard") as on_progress:
        def panel_progress(done, total, label):
            if on_progress:
                from .core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, label))
        result = storyboard(req, _engine(), progress=panel_progress)
    logic = result.manifest["review"].get("logic", {})
    if logic.get("ok") is False:
        print(f"imagesmith: note: the LLM review doubts the script's logic: {logic.get('notes', '')}", file=sys.stderr)
    if as_json:
        print(Path(result.manifest_path).read_text(encoding="utf-8"))
    else:
        for p in result.panels:
            print(f"{Path(result.out_dir) / p.file}  #{p.index} {p.shot}  seed={p.seed}  {p.prompt}")
        print(f"{result.sheet_png}\n{result.sheet_pdf} ({result.pages} page(s))\n{result.manifest_path}")


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from .core.errors import ImagesmithError
    try:
        app(args=argv, standalone_mode=False)
    except ImagesmithError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(_validation_line(exc))
    except _Exit as exc:
        _fail(exc.message, exc.code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:  # usage errors and anything unexpected: one line, no traceback
        # Typer vendors its own click (typer._click), so recognise click's usage errors by interface
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _fail(exc.format_message(), exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            _fail("aborted", 1)
        if os.environ.get("IMAGESMITH_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set IMAGESMITH_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int = 2) -> None:
    if os.environ.get("IMAGESMITH_DEBUG") and sys.exc_info()[0] is not None:
        import traceback
        traceback.print_exc()
    print(f"imagesmith: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
