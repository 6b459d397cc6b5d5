"""Generation: generate, upscale, samplers, info (a PNG's parameters, or this machine's performance modes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import app, _Exit, _check_output, _checkpoint_ref, _engine, _progress_bar


@app.command()
def generate(
    prompt: str = typer.Argument("", help="prompt in WebUI syntax: (word:1.2), [word], BREAK, <lora:name:0.7>"),
    negative: str = typer.Option("", "--negative-prompt", "--negative", "-n", help="negative prompt"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (imagesmith models list) or path to a checkpoint file or diffusers folder"),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE override"),
    lora: List[str] = typer.Option([], "--lora", "--loras", help="NAME:WEIGHT, repeatable"),
    clip_skip: int = typer.Option(1, "--clip-skip", help="1 = last layer, 2 = penultimate (WebUI meaning)"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(7.0, "--cfg-scale", "--cfg", help="CFG scale"),
    cfg_rescale: float = typer.Option(0.0, "--cfg-rescale", help="CFG rescale phi (0.7 for v-prediction models)"),
    performance: Optional[str] = typer.Option(None, "--performance", help="quality (lossless), fast (+ fp8 on "
                                              "Ada/Hopper, FLUX/SD3), turbo (+ step caching); default: "
                                              "IMAGESMITH_PERFORMANCE or quality. imagesmith info lists what each "
                                              "changes on this machine"),
    sampler: str = typer.Option("Euler a", "--sampler-name", "--sampler", help="A1111 or ComfyUI sampler name, e.g. "
                                "'DPM++ 2M' or dpmpp_2m (imagesmith samplers lists them)"),
    schedule: str = typer.Option("automatic", "--scheduler", "--schedule", help="schedule type, e.g. Karras, "
                                 "sgm_uniform, 'Align Your Steps'; automatic: the sampler's default"),
    noise: str = typer.Option("a1111-cpu", "--noise", help="a1111-cpu, a1111-gpu or comfy: whose noise to draw"),
    malformed_prompt: str = typer.Option("error", "--malformed-prompt", help="error (default): a malformed "
                                         "[from:to:when] is an error naming it; text: read as plain text, as A1111"),
    ensd: int = typer.Option(0, "--eta-noise-seed-delta", "--ensd", help="A1111's eta noise seed delta"),
    sgm_noise: bool = typer.Option(False, "--sgm-noise-multiplier", help="A1111's SGM noise multiplier"),
    seed: int = typer.Option(-1, "--seed", help="-1: random; 0 .. 2^64-1"),
    variation_seed: Optional[int] = typer.Option(None, "--variation-seed"),
    variation_strength: float = typer.Option(0.0, "--variation-strength"),
    seed_resize_from_w: int = typer.Option(0, "--seed-resize-from-w", help="A1111's resize seed from: draw the "
                                           "seed's noise as for this width (keeps a composition across sizes)"),
    seed_resize_from_h: int = typer.Option(0, "--seed-resize-from-h", help="... and this height"),
    batch_size: int = typer.Option(1, "--batch-size"),
    batch_count: int = typer.Option(1, "--batch-count"),
    width: Optional[int] = typer.Option(None, "--width", "-W"),
    height: Optional[int] = typer.Option(None, "--height", "-H"),
    init_image: Optional[str] = typer.Option(None, "--init-image", help="img2img input"),
    strength: float = typer.Option(0.75, "--denoising-strength", "--strength", help="denoising strength for img2img/inpaint"),
    mask: Optional[str] = typer.Option(None, "--mask", help="inpainting mask (white = repaint)"),
    mask_blur: int = typer.Option(4, "--mask-blur"),
    inpainting_fill: str = typer.Option("original", "--inpainting-fill", help="what the masked area starts from: "
                                        "original, fill (surrounding colours), 'latent noise', 'latent nothing'"),
    mask_invert: bool = typer.Option(False, "--inpainting-mask-invert", help="repaint the black part of the mask"),
    full_res: bool = typer.Option(False, "--inpaint-full-res", help="A1111's 'only masked': repaint a crop around "
                                  "the mask at the full working size"),
    full_res_padding: int = typer.Option(32, "--inpaint-full-res-padding", help="context pixels around the mask"),
    outpaint: Optional[str] = typer.Option(None, "--outpaint", help="LEFT,TOP,RIGHT,BOTTOM pixels to add"),
    hires: Optional[float] = typer.Option(None, "--hr-scale", "--hires", help="hires fix scale, e.g. 2"),
    hires_steps: int = typer.Option(0, "--hr-second-pass-steps", "--hires-steps"),
    hires_strength: float = typer.Option(0.5, "--hr-denoising-strength", "--hires-strength"),
    upscaler: str = typer.Option("Latent", "--hr-upscaler", "--upscaler", help="Latent, Lanczos, 'R-ESRGAN 4x+', 'R-ESRGAN 4x+ Anime6B' or an upscaler file's name"),
    controlnet: Optional[List[str]] = typer.Option(None, "--controlnet", help="ControlNet model name (controlnet.model); "
                                                   "repeat for several units (each --control-* option then given "
                                                   "once for all units, or once per unit in order)"),
    control_image: Optional[List[str]] = typer.Option(None, "--control-image", help="one per --controlnet, or one for all"),
    control_mode: Optional[List[str]] = typer.Option(None, "--control-mode", "--union-mode", help="a union ControlNet's "
                                                     "control type, by name (openpose, depth, softedge, hardedge, "
                                                     "normal, segment, tile, inpaint, blur, gray: mapped to the "
                                                     "model's own index) or by index (FLUX InstantX/Shakker union: 0 "
                                                     "canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low "
                                                     "quality); default: what the preprocessor draws"),
    control_preprocessor: Optional[List[str]] = typer.Option(None, "--control-preprocessor", "-p", help="canny (default), scribble_xdog, lineart_standard, invert, threshold, tile_resample, openpose, openpose_hand, openpose_face, openpose_faceonly, openpose_full, depth_anything, depth_midas, depth_zoe, lineart_realistic, lineart_coarse, lineart_anime, softedge_hed, softedge_hedsafe, scribble_hed, inpaint_only, inpaint_global_harmonious or none (imagesmith controlnet preprocessors)"),
    control_processor_res: Optional[List[int]] = typer.Option(None, "--control-processor-res", min=64, max=4096, help="a network preprocessor's working resolution (default 512)"),
    control_mask: Optional[List[str]] = typer.Option(None, "--control-mask", help="where to repaint (white) for the inpaint preprocessors and inpainting ControlNets; default the request's --mask"),
    control_weight: Optional[List[float]] = typer.Option(None, "--control-weight", help="default 1"),
    control_start: Optional[List[float]] = typer.Option(None, "--control-start", help="the fraction of the steps a unit starts at (guidance_start, default 0)"),
    control_end: Optional[List[float]] = typer.Option(None, "--control-end", help="the fraction of the steps a unit ends at (guidance_end, default 1)"),
    control_priority: Optional[List[str]] = typer.Option(None, "--control-priority", help="A1111's Control Mode "
                                                         "(SD1/SDXL ControlNets): balanced (default), prompt (my "
                                                         "prompt is more important) or controlnet (ControlNet is "
                                                         "more important)"),
    ip_adapter: Optional[str] = typer.Option(None, "--ip-adapter", help="IP-Adapter name (models/ipadapter): the "
                                             "--ref images guide the picture"),
    refs: Optional[List[str]] = typer.Option(None, "--ref", help="a reference image for --ip-adapter, "
                                             "'IMG[:weight]'; repeatable"),
    ref_masks: Optional[List[str]] = typer.Option(None, "--ref-mask", help="where the --ref of the same place "
                                                  "applies (white), one per --ref in order ('-' for everywhere)"),
    ref_start: Optional[List[float]] = typer.Option(None, "--ref-start", min=0.0, max=1.0, help="from this fraction "
                                                    "of the steps the references guide (once for all, or once per "
                                                    "--ref in order)"),
    ref_end: Optional[List[float]] = typer.Option(None, "--ref-end", min=0.0, max=1.0, help="to this fraction of "
                                                  "the steps (once for all, or once per --ref)"),
    face_model: Optional[str] = typer.Option(None, "--face-model", help="IP-Adapter FaceID: the InsightFace "
                                             "recognition model in models/insightface (default: w600k_r50 or "
                                             "glintr100, whichever is there)"),
    edit_images: Optional[List[str]] = typer.Option(None, "--edit-images", "--edit-image", help="another picture for a "
                                                    "multi-picture edit model (Qwen-Image-Edit-Plus): 'Picture 2', "
                                                    "'Picture 3' after --init-image; on Qwen-Image 2.1 a condition "
                                                    "picture of its own (Picture 1-3, RGBA kept); repeatable"),
    regions: Optional[List[str]] = typer.Option(None, "--regions", "--region", help="a prompt for part of the picture: "
                                                "'x0,y0,x1,y1:prompt[:weight]' (fractions 0-1), or "
                                                "'MASK.png:prompt[:weight]'; repeatable"),
    from_image: Optional[str] = typer.Option(None, "--from", help="regenerate an imagesmith PNG from its metadata"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file, or folder for several images"),
    latents_out: Optional[Path] = typer.Option(None, "--latents", help="also write the final latents (before the "
                                               "VAE) to this .safetensors file, to compare with another tool's"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
    safety: bool = typer.Option(False, "--safety", help="check the prompt and the images (open_nsfw); flagged images are withheld or blurred "
                                "(IMAGESMITH_SAFETY_ACTION)"),
    detailer: Optional[list[str]] = typer.Option(None, "--detailer", help="repaint what mediapipe detects at "
                                                 "higher resolution (ADetailer-style): face, hand or person; "
                                                 "repeat for several units, run in turn"),
    detailer_strength: float = typer.Option(0.4, "--detailer-strength", help="denoising strength of the repaint"),
    detailer_prompt: str = typer.Option("", "--detailer-prompt", help="added to the prompt for the repaint"),
    refiner: Optional[str] = typer.Option(None, "--refiner", "--refiner-checkpoint", help="SDXL refiner (or another "
                                          "model of the base's family) that takes over at --refiner-switch"),
    refiner_pass: str = typer.Option("second pass", "--refiner-pass", help="with --hr-scale's second pass: which "
                                     "pass the refiner takes the last steps of: 'first pass', 'second pass' or "
                                     "'both passes' (A1111's setting)"),
    refiner_switch: float = typer.Option(0.8, "--refiner-switch", "--refiner-switch-at", help="fraction of the "
                                         "steps the base model runs before the refiner takes over"),
    restore_faces: Optional[str] = typer.Option(None, "--restore-faces", help="restore faces with this GFPGAN/"
                                                "RestoreFormer file (models list --kind restorer), or 'auto' for "
                                                "the first installed"),
    restore_visibility: float = typer.Option(1.0, "--restore-visibility", help="0..1: how much of the restored "
                                             "faces shows"),
    ground: bool = typer.Option(True, "--ground-concepts/--no-ground-concepts", "--ground/--no-ground", help="house models: draw the nearest known concept "
                                "for a subject the model was not trained on ('espresso' -> 'cup of coffee')"),
):
    """Generate images (txt2img, img2img with --init-image, inpainting with --mask)."""
    from ..core.requests import ControlNetSpec, GenerateRequest, HiresSpec, LoraSpec

    pick = None
    if from_image:
        req, pick = _request_from_png(from_image)
    else:
        fields = dict(
            prompt=prompt, negative_prompt=negative, model=model, vae=vae,
            loras=[LoraSpec.parse(x) for x in lora], clip_skip=clip_skip, steps=steps, cfg_scale=cfg,
            cfg_rescale=cfg_rescale, sampler_name=sampler, scheduler=schedule, noise=noise, eta_noise_seed_delta=ensd,
            malformed_prompt=malformed_prompt, sgm_noise_multiplier=sgm_noise, seed=seed, variation_seed=variation_seed,
            variation_strength=variation_strength, seed_resize_from_w=seed_resize_from_w,
            seed_resize_from_h=seed_resize_from_h, batch_size=batch_size, batch_count=batch_count,
            width=width, height=height, init_image=init_image, denoising_strength=strength, mask=mask,
            mask_blur=mask_blur, inpainting_fill=inpainting_fill, inpainting_mask_invert=mask_invert,
            inpaint_full_res=full_res, inpaint_full_res_padding=full_res_padding, ground_concepts=ground,
            performance=performance,
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
            n = len(controlnet)
            per = {name: _per_unit(values, n, flag) for name, values, flag in (
                ("image", control_image, "--control-image"), ("union", control_mode, "--control-mode"),
                ("preprocessor", control_preprocessor, "--control-preprocessor"),
                ("processor_res", control_processor_res, "--control-processor-res"),
                ("mask", control_mask, "--control-mask"), ("weight", control_weight, "--control-weight"),
                ("guidance_start", control_start, "--control-start"), ("guidance_end", control_end, "--control-end"),
                ("control_mode", control_priority, "--control-priority"))}
            units = []
            for i, model_name in enumerate(controlnet):
                unit = {k: v[i] for k, v in per.items() if v[i] is not None and k != "union"}
                mode = per["union"][i]
                if mode is not None:
                    unit["union_mode" if str(mode).isdigit() else "union_type"] = int(mode) if str(mode).isdigit() \
                        else mode
                units.append(ControlNetSpec(model=model_name, **{"preprocessor": "canny", **unit}))
            fields["controlnet"] = units[0] if n == 1 else units
        if regions:
            fields["regions"] = [_region(r) for r in regions]
        if edit_images:
            fields["edit_images"] = list(edit_images)
        if bool(ip_adapter) != bool(refs):
            raise _Exit("--ip-adapter and --ref go together: the adapter, and the reference image(s) it reads")
        if ip_adapter:
            from ..core.requests import IPAdapterSpec
            masks = list(ref_masks or [])
            if masks and len(masks) != len(refs):
                raise _Exit(f"--ref-mask: give one per --ref ({len(refs)}), '-' where a reference applies everywhere")
            starts = _per_unit(ref_start, len(refs), "--ref-start", "references", "--ref")
            ends = _per_unit(ref_end, len(refs), "--ref-end", "references", "--ref")
            window = [{k: v for k, v in (("guidance_start", a), ("guidance_end", b)) if v is not None}
                      for a, b in zip(starts, ends)]
            units = [IPAdapterSpec(model=ip_adapter, **_reference(r), face_model=face_model, **window[i],
                                   mask=None if not masks or masks[i] == "-" else masks[i]) for i, r in enumerate(refs)]
            fields["ip_adapter"] = units[0] if len(units) == 1 else units
        if detailer:
            from ..core.requests import DETAILERS, DetailerOptions
            for kind in detailer:
                if kind not in DETAILERS:
                    raise _Exit(f"--detailer takes {', '.join(DETAILERS)}, not {kind!r}")
            units = [DetailerOptions(kind=k, strength=detailer_strength, prompt=detailer_prompt) for k in detailer]
            fields["detailer"] = units[0] if len(units) == 1 else units
        if restore_faces:
            fields["restore_faces"] = _restore_spec(restore_faces, restore_visibility)
        if refiner:
            if not 0 < refiner_switch <= 1:
                raise _Exit(f"--refiner-switch must be above 0 and at most 1, got {refiner_switch:g}")
            fields["refiner_checkpoint"], fields["refiner_switch_at"] = refiner, refiner_switch
            if refiner_pass not in ("first pass", "second pass", "both passes"):
                raise _Exit(f"--refiner-pass takes 'first pass', 'second pass' or 'both passes', not {refiner_pass!r}")
            fields["refiner_pass"] = refiner_pass
        req = GenerateRequest(**fields)

    _check_output(output, req.batch_size * req.batch_count)  # fail before the work, not after it
    if latents_out is not None and (latents_out.suffix != ".safetensors" or not latents_out.parent.is_dir()):
        raise _Exit(f"--latents needs a .safetensors file in an existing folder, got {latents_out}")
    gate = None
    if safety:
        from ..core.settings import Settings
        from ..vision.safety import SafetyGate
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
    from ..core.outputs import flagged, save_control_maps, save_result
    from ..core.settings import Settings
    saved = save_result(result, output, default_dir=Settings.from_env().home / "outputs", gate=gate)
    maps = save_control_maps(result, next((s.path for s in saved if s.path is not None), None))
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
    if maps:
        summary["control_maps"] = maps
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for item in summary["images"]:
            print(f"{item['path']}  seed={item['seed']}")
        for item in maps:
            print(f"{item['path']}  (detected map of ControlNet unit {item['unit']}, {item['preprocessor']})")
        print(f"{len(summary['images'])} image(s) in {result.seconds:.1f}s with {result.model_name}")


def _per_unit(values, n: int, flag: str, what: str = "ControlNet units", each: str = "--controlnet") -> list:
    """A --control-* (or --ref-*) option's value for each of ``n`` units: none given (each unit's default), one
    (every unit), or one per unit in order."""
    values = list(values or [])
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise _Exit(f"{flag} is given {len(values)} times for {n} {what}: give it once (every one) or "
                    f"once per {each}, in order")
    return values


def _request_from_png(path: str):
    """The stored request of an imagesmith PNG, narrowed to the one run that made it."""
    from ..core.metadata import read_png_metadata
    from ..core.requests import GenerateRequest
    from ..core.settings import Settings
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

    from ..core.sampling_names import SAMPLER_NAMES, SCHEDULE_NAMES
    from ..engine.sampling.ksampler import available_samplers

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
    from ..engine import performance as perf
    from ..models.cache import pick_device
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
    from ..core.metadata import read_png_metadata
    from ..core.settings import Settings
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
            upscaler: str = typer.Option("R-ESRGAN 4x+", "--upscaler", help="Lanczos, 'R-ESRGAN 4x+', 'R-ESRGAN 4x+ Anime6B' or an upscaler file's name (models list --kind upscaler)"),
            scale: float = typer.Option(4.0, "--scale", help="2 or 4 (any factor works)"),
            refine: bool = typer.Option(False, "--refine", help="then repaint tile by tile with img2img "
                                        "(Ultimate SD Upscale): adds detail at any size"),
            model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint for --refine"),
            prompt: str = typer.Option("", "--prompt", "-p", help="what the picture shows (for --refine)"),
            strength: float = typer.Option(0.3, "--strength", help="each tile's denoising strength"),
            steps: int = typer.Option(20, "--steps"),
            seed: int = typer.Option(-1, "--seed"),
            tile: int = typer.Option(512, "--tile", help="tile side in output pixels"),
            padding: int = typer.Option(32, "--padding", help="context around each tile"),
            mask_blur: int = typer.Option(16, "--mask-blur", help="width of each tile's feathered edge"),
            restore_faces: Optional[str] = typer.Option(None, "--restore-faces", help="then restore faces with this "
                                                        "GFPGAN/RestoreFormer file, or 'auto' for the first installed"),
            restore_visibility: float = typer.Option(1.0, "--restore-visibility", help="0..1"),
            output: Optional[Path] = typer.Option(None, "--output", "-o"),
            as_json: bool = typer.Option(False, "--json")):
    """Upscale an image on its own, optionally adding detail tile by tile (--refine)."""
    from ..core.imageio import load_image, save_png_atomic
    from ..core.requests import TiledRefine
    from ..core.settings import Settings
    from ..engine.upscale import UpscalerSet
    if not 1 < scale <= 8:
        raise _Exit(f"--scale must be above 1 and at most 8, got {scale:g}")
    spec = TiledRefine(model=model, prompt=prompt, strength=strength, steps=steps, seed=seed, tile=tile,
                       padding=padding, mask_blur=mask_blur) if refine else None
    restore = _restore_spec(restore_faces, restore_visibility) if restore_faces else None
    settings = Settings.from_env()
    src = load_image(image, settings=settings, mode=None, what="image")
    up = UpscalerSet(settings).get(upscaler)
    out_path = output or Path(image).with_name(Path(image).stem + f"-x{scale:g}.png")
    report = None
    with _progress_bar(not as_json and sys.stderr.isatty(), f"upscaling with {upscaler}") as on_progress:
        def tiles(done, total):
            if on_progress:
                from ..core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, "upscale"))
        result = up.upscale(src, scale, progress=tiles)
        if spec is not None:
            from ..engine.tiled import refine_tiles
            result, report = refine_tiles(_engine(), result, spec, progress=on_progress)
        restored = None
        if restore is not None:
            (result,), (restored,) = _engine().restore_faces([result], restore, progress=on_progress)
    save_png_atomic(result, out_path, text_chunks={})
    if as_json:
        print(json.dumps({"path": str(out_path), "width": result.width, "height": result.height, "tiled": report,
                          "face_restoration": restored}))
    else:
        print(f"{out_path}  {src.width}x{src.height} -> {result.width}x{result.height}"
              + (f", {report['tiles']} tiles repainted" if report else "")
              + (f", {len(restored['faces'])} face(s) restored with {restored['model']}" if restored else ""))


def _restore_spec(name: str, visibility: float):
    from ..core.requests import RestoreFaces
    if not 0 <= visibility <= 1:
        raise _Exit(f"--restore-visibility must be within 0..1, got {visibility:g}")
    return RestoreFaces(model=None if name.strip().lower() == "auto" else name, visibility=visibility)


def _reference(text: str) -> dict:
    """'IMG' or 'IMG:weight' -> {image, weight}."""
    image, sep, weight = text.rpartition(":")
    if sep and image:
        try:
            return {"image": image, "weight": float(weight)}
        except ValueError:
            pass
    return {"image": text, "weight": 1.0}


def _region(text: str):
    """--region 'x0,y0,x1,y1:prompt[:weight]' or 'mask.png:prompt[:weight]'."""
    from ..core.requests import RegionSpec
    where, sep, rest = text.partition(":")
    if not sep or not rest.strip():
        raise _Exit(f"--region {text!r}: write 'x0,y0,x1,y1:prompt' or 'mask.png:prompt' (optionally ':weight')")
    prompt, weight = rest, 1.0
    head, _, tail = rest.rpartition(":")
    if head and tail.strip().replace(".", "", 1).isdigit():
        prompt, weight = head, float(tail)
    try:
        box = tuple(float(v) for v in where.split(","))
    except ValueError:
        return RegionSpec(prompt=prompt.strip(), mask=where, weight=weight)
    if len(box) != 4:
        raise _Exit(f"--region {text!r}: a box is four numbers x0,y0,x1,y1 (fractions of the width and height)")
    return RegionSpec(prompt=prompt.strip(), box=box, weight=weight)
