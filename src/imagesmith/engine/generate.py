"""The engine: one typed request in, images plus everything needed to reproduce them out.

Flow: resolve models in the registry -> get the pipeline from the cache (loaded just in time) ->
under the model's lock: per-request view of the pipeline (scheduler, VAE, ControlNet), LoRA adapters
switched on at their weights -> per-image CPU noise from the seeds -> diffusers pipeline call with a
per-step callback (progress, cancel) -> optional hires fix -> result with infotext per image."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Sequence
from typing import Any
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .. import __version__
from ..core.errors import BadRequest, ImagesmithError, ModelNotFound, UnsupportedModel
from ..core.imageio import load_image
from ..core.metadata import build_infotext
from ..core.progress import CancelToken, ProgressCallback, ProgressEvent, StepCounter
from ..core.requests import GenerateRequest, GenerationResult, ImageRecord, LoraSpec
from ..core.settings import Settings
from ..models.cache import ModelCache, pick_device, pick_dtype
from ..models.house import ensure_placeholder, make_registry
from ..models.registry import ModelEntry, Registry
from . import prompts as P
from .grounding import ConceptVocabulary, Grounding, mean_pooled
from .wildcards import expand_prompt, has_dynamic
from .loras import ResolvedLora, adapter_name, apply_loras
from . import performance as perf
from ..core.sampling_names import (SAMPLERS_BY_NAME, canonical_schedule, resolve_sampling, sampler_label,
                                    schedule_label)
from .sampling import ksampler as K
from .prompt_editing import check_request, has_editing, prompt_schedule, split_and, text_at
from . import qwen_image as Q
from .qwen_image import is_qwen_edit
from .sampling.denoisers import (Composed, Conditioning, ControlSpec, FluxDenoiser, Qwen21Denoiser, Qwen21Text,
                                 QwenDenoiser, SD3Denoiser,
                                 StepScheduled, shared_uncond_call, UNetDenoiser)
from .sampling.model_sampling import FlowModelSampling, from_scheduler_config
from .sampling.step_cache import StepCache

log = logging.getLogger("imagesmith.engine")

FLOW_ARCHS = ("sd3", "flux", "qwen", "qwen21")
NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024, "qwen": 1328, "qwen21": 1024}
PACKED_ARCHS = ("flux", "qwen", "qwen21")  # latent tokens of 16x16 px; the time shift grows with their count
SIDE_MULTIPLE = {"flux": 16, "qwen": 16, "qwen21": 32}
"""sides the model's tokens tile: FLUX and Qwen-Image pack 2x2 latents of an 8x VAE; Qwen-Image 2.1's VAE is 16x
and its picture slots take 2x2 latents"""
FAMILY = {"flux": "FLUX", "qwen": "Qwen-Image", "qwen21": "Qwen-Image 2.1"}


@dataclass
class _Job:
    """Everything resolved for one request, before any pixels are made."""
    req: GenerateRequest
    entry: ModelEntry
    arch: str
    width: int
    height: int
    prompt: str
    negative: str
    loras: list[ResolvedLora]
    init_image: Image.Image | None
    mask: Image.Image | None
    control_images: list[Image.Image]
    """one per ControlNet unit (empty without ControlNet)"""
    seeds: list[int]
    variation_seeds: list[int | None]
    grounding: Grounding | None = None
    """The prompt as the model reads it, when concept grounding rewrote its subject (house models)."""
    latents: list = field(default_factory=list)
    """The final latents of each run (before the VAE), in image order."""
    plan: perf.Plan | None = None
    """The performance plan the job runs with (set under the model's lock)."""
    net: Any = None
    """The denoiser network the job runs: the pipeline's own, or its fp8 copy."""
    cache_stats: list = field(default_factory=list)
    """(reused, calls) of each sampling run under turbo's step cache."""
    template: tuple[str, str] | None = None
    """(prompt, negative) as written, when wildcards or choices were drawn into `prompt` / `negative`."""
    inversions: Any = None
    """The textual inversions that fit the job's model (``engine.embeddings.TextualInversions``), once encoded."""
    ip_images: list = field(default_factory=list)
    """one reference image per IP-Adapter unit"""
    ip_masks: list = field(default_factory=list)
    """one mask (L) or None per IP-Adapter unit"""
    edit_images: list = field(default_factory=list)
    """a multi-picture edit's pictures after the init image (Qwen-Image-Edit-Plus)"""
    author_sigmas: list[float] | None = None
    """the model author's sampling grid (Qwen-Image 2.1's ``sample_sigmas``) when the request leaves the schedule to
    the model; its length is the job's steps"""
    crop: tuple[int, int, int, int] | None = None
    """A1111's 'only masked' inpainting: the box (in the picture at the working size) that is repainted at the full
    working size; the ControlNet units' images and masks are cropped to it too"""
    detected: dict = field(default_factory=dict)
    """ControlNet unit index -> the control image its preprocessor made, as the ControlNet saw it (A1111's
    'detected map'); units whose preprocessor is 'none' are not listed"""


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (WebUI's variation seed)."""
    low_n = low / low.norm()
    high_n = high / high.norm()
    dot = (low_n * high_n).sum().clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high


def image_noise(shape: tuple[int, ...], seed: int, variation_seed: int | None, variation_strength: float,
                resize_from: tuple[int, int] | None = None) -> torch.Tensor:
    """Noise for one image, always drawn on the CPU so the same seed gives the same image on any device.

    `resize_from` (latent height, width): A1111's 'resize seed from'. The seed's (and variation seed's) noise is
    drawn at that latent size, then its middle is laid over the middle of the image's own noise of the same seed:
    cropped where the drawn field is larger, surrounded by the full-size draw where it is smaller."""
    def draw(s: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
    size = shape if resize_from is None else (shape[0], *resize_from)
    noise = draw(seed, size)
    if variation_seed is not None and variation_strength > 0:
        noise = slerp(variation_strength, noise, draw(variation_seed, size))
    if size == shape:
        return noise
    out = draw(seed, shape)
    (h, w), (hs, ws) = shape[1:], size[1:]
    ch, cw = min(h, hs), min(w, ws)  # the overlap, centred in both
    top, left = (h - ch) // 2, (w - cw) // 2
    stop, sleft = (hs - ch) // 2, (ws - cw) // 2
    out[:, top:top + ch, left:left + cw] = noise[:, stop:stop + ch, sleft:sleft + cw]
    return out


class Engine:
    """`Engine().generate(GenerateRequest(...)) -> GenerationResult`. One per process is plenty; it
    owns the model cache. Thread-safe per model: jobs on the same model run one at a time."""

    def __init__(self, settings: Settings | None = None, *, registry: Registry | None = None,
                 cache: ModelCache | None = None, device: str | None = None):
        self.settings = settings or Settings.from_env()
        self.registry = registry or make_registry(self.settings)
        self.cache = cache or ModelCache(self.settings)
        self.device = pick_device(device or self.settings.device)
        self.dtype = pick_dtype(self.device)
        self.capabilities = perf.Capabilities.detect(self.device)
        self._upscalers = None
        self._restorers: dict = {}
        self._restorer_lock = threading.Lock()
        self._adopted: dict[str, ModelEntry] = {}
        # encodings are reused across batch runs, hires passes and jobs with the same prompt, model and LoRAs
        self.prompt_encoder = P.PromptEncoder(max_entries=64)
        self._vocabularies: dict[str, ConceptVocabulary | None] = {}  # model folder -> what it knows
        self._embeddings: dict[Any, Any] = {}  # (file, mtime) -> its loaded Embedding; "folders" -> their mtimes
        self._ip_states: dict[str, dict] = {}  # IP-Adapter file@mtime -> its state dict

    # ------------------------------------------------------------------ public
    def adopt(self, name: str, pipe, arch: str) -> ModelEntry:
        """Serve an already-built diffusers pipeline under `name` (for Python users who build or load
        their own; also how benchmarks run full-size random-weight models without writing them out)."""
        entry = ModelEntry(name=name, kind="checkpoint", arch=arch, path=Path(f"memory://{name}"),
                           size_bytes=0, format="diffusers")
        self._adopted[name.lower()] = entry
        self.cache.get(self._pipeline_key(entry), lambda: pipe, device=self.device, pin=True)
        return entry

    def generate(self, req: GenerateRequest, *, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        if req.batch_size * req.batch_count > 1 and req.noise != "comfy" and (
                has_dynamic(req.prompt) or has_dynamic(req.negative_prompt)):
            return self._generate_each_drawn(req, progress=progress, cancel=cancel)
        start = time.perf_counter()
        job = self._resolve(req)
        if req.refiner_checkpoint and req.refiner_switch_at < 1:
            self.refiner_entry(job)  # a missing or mismatched refiner fails before any work
        counter = StepCounter(self._total_steps(job), progress, cancel)
        if progress is not None and self._pipeline_key(job.entry) not in self.cache:
            progress(ProgressEvent(0, counter.total, f"loading {job.entry.name}"))
        entry = self._pipeline_entry(job.entry)
        images: list[Image.Image] = []
        with entry.use():
            self._ground(entry.value, job)
            self._prepare_model(entry, job, [])
            for run in range(req.batch_count):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                lo = run * req.batch_size
                images.extend(self._run_batch(entry, job, lo, counter))
        details: list[dict | None] = [None] * len(images)
        if req.detailer is not None:  # after the model lock: the detailer's img2img passes take it again
            from .detailer import detail_images
            base = job.req.model_copy(update={"model": job.entry.name})
            images, details = detail_images(self, base, images, job.seeds, progress=progress, cancel=cancel)
        restored: list[dict | None] = [None] * len(images)
        if req.restore_faces is not None:  # A1111's order: after the picture (and its detailer) is made
            images, restored = self.restore_faces(images, req.restore_faces, progress=progress, cancel=cancel)
        result = GenerationResult(
            images=images, request=req, model_name=job.entry.name,
            model_hash=self._hash(job.entry), vae_name=req.vae, version=__version__,
            lora_hashes={l.name: self._hash_path(l.path, lora=True) for l in job.loras},
            latents=torch.cat(job.latents) if job.latents else None,
            control_maps=[{"unit": i, "preprocessor": req.controlnet_units[i].preprocessor, "image": im}
                          for i, im in sorted(job.detected.items())],
        )
        for i, _ in enumerate(images):
            result.records.append(ImageRecord(seed=job.seeds[i], variation_seed=job.variation_seeds[i], index=i,
                                              infotext=self.infotext(job, result, i, detailer=details[i],
                                                                     restored=restored[i]),
                                              detailer=details[i], face_restoration=restored[i]))
        result.seconds = time.perf_counter() - start
        return result

    def _generate_each_drawn(self, req: GenerateRequest, *, progress: ProgressCallback | None = None,
                             cancel: CancelToken | None = None) -> GenerationResult:
        """Wildcards in a batch: every image draws its prompt from its own seed (as A1111's dynamic prompts do),
        so one image made again alone with its seed has its prompt again. The images still share one pipeline
        call where they can (:meth:`generate_many`); their noise is each seed's own, as in the batch."""
        start = time.perf_counter()
        seeds, var_seeds = self._seeds(req)
        subs = [req.model_copy(update={"seed": s, "batch_size": 1, "batch_count": 1,
                                       **({"variation_seed": v} if v is not None else {})})
                for s, v in zip(seeds, var_seeds)]
        try:
            parts = self.generate_many(subs, progress=progress, cancel=cancel)
        except BadRequest:  # cannot share a call (img2img, ControlNet, detailer...): one call each
            parts = [self.generate(sub, progress=progress, cancel=cancel) for sub in subs]
        first = parts[0]
        latents = [p.latents for p in parts]
        result = GenerationResult(
            images=[im for p in parts for im in p.images], request=req, model_name=first.model_name,
            model_hash=first.model_hash, vae_name=first.vae_name, version=first.version,
            lora_hashes={k: v for p in parts for k, v in p.lora_hashes.items()},
            latents=torch.cat(latents) if all(x is not None for x in latents) else None,
            control_maps=first.control_maps)
        for i, part in enumerate(parts):
            result.records.extend(r.model_copy(update={"index": i}) for r in part.records)
        result.seconds = time.perf_counter() - start
        return result

    def generate_many(self, reqs: Sequence[GenerateRequest], *, progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> list[GenerationResult]:
        """Several txt2img requests in one pipeline call: they may differ in prompt, negative prompt, seed,
        variation seed and batch size, and must agree on everything else (:meth:`batch_key`). Each request gets
        its own conditioning, noise and generators per image, so its images are the ones :meth:`generate` makes
        for it alone (up to float rounding in batched kernels; the service's tests measure it), with its own
        seeds, records and infotext. Requests that cannot share a call (other settings, or prompts of another
        number of 75-token chunks) run in as few calls as their differences allow; results keep the order."""
        start = time.perf_counter()
        jobs = [self._resolve(r) for r in reqs]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = self.batch_key(job)
            if key is None:
                raise BadRequest("only txt2img requests with batch_count 1 and no ControlNet or detailer can be "
                                 "batched")
            groups.setdefault(key, []).append(i)
        counter = StepCounter(sum(self._total_steps(jobs[m[0]]) for m in groups.values()), progress, cancel)
        images: list[list[Image.Image]] = [[] for _ in jobs]
        for members in groups.values():
            head = jobs[members[0]]
            if progress is not None and self._pipeline_key(head.entry) not in self.cache:
                progress(ProgressEvent(0, counter.total, f"loading {head.entry.name}"))
            entry = self._pipeline_entry(head.entry)
            with entry.use():
                for i in members:
                    self._ground(entry.value, jobs[i])
                self._prepare_model(entry, head, [jobs[i] for i in members])
                encoded = {i: self._encode(entry.value, jobs[i], for_arch=head.arch) for i in members}
                shapes: dict[tuple, list[int]] = {}  # conditioning of equal length can share a call
                for i in members:
                    shapes.setdefault(_shape_key(encoded[i]), []).append(i)
                counter.total += self._total_steps(head) * (len(shapes) - 1)
                for rows in shapes.values():
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    for i, out in zip(rows, self._run_rows(entry, [jobs[i] for i in rows],
                                                           [encoded[i] for i in rows], counter)):
                        images[i] = out
        results = []
        hashes: dict[str, str | None] = {}
        for req, job, imgs in zip(reqs, jobs, images):
            model_hash = hashes.setdefault(str(job.entry.path), self._hash(job.entry))
            result = GenerationResult(
                images=imgs, request=req, model_name=job.entry.name, model_hash=model_hash, vae_name=req.vae,
                version=__version__, lora_hashes={l.name: self._hash_path(l.path, lora=True) for l in job.loras},
                latents=torch.cat(job.latents) if job.latents else None)
            for i, _ in enumerate(imgs):
                result.records.append(ImageRecord(seed=job.seeds[i], variation_seed=job.variation_seeds[i], index=i,
                                                  infotext=self.infotext(job, result, i)))
            results.append(result)
        seconds = time.perf_counter() - start
        for result in results:
            result.seconds = seconds
        return results

    def batch_key(self, job: _Job) -> tuple | None:
        """What resolved requests must share to run in one pipeline call (None: this one runs on its own):
        model, size, LoRAs and their weights, VAE, sampler, schedule, steps, CFG, clip skip, hires fix."""
        req = job.req
        if (req.mode != "txt2img" or req.controlnet or req.detailer or req.ip_adapter or req.restore_faces
                or req.refiner_checkpoint or req.batch_count != 1):
            return None
        if has_editing(job.prompt) or has_editing(job.negative) or req.regions:
            return None  # its conditioning changes by step or by place: a call of its own
        sampler, schedule = resolve_sampling(req.sampler_name, req.scheduler)
        if req.noise == "comfy" and SAMPLERS_BY_NAME[sampler].noise is not None:
            return None  # ComfyUI's sampler noise is one stream over the batch: another batch, other images
        return (str(job.entry.path), job.arch, job.width, job.height,
                tuple((adapter_name(l), l.path, l.weight) for l in job.loras), req.vae, req.clip_skip, req.steps,
                req.cfg_scale, req.cfg_rescale, sampler, schedule, req.noise, req.eta_noise_seed_delta,
                req.sgm_noise_multiplier, req.performance or self.settings.performance,
                req.hires.model_dump_json() if req.hires else None)

    def infotext(self, job: _Job, result: GenerationResult, index: int, *, detailer: dict | None = None,
                 restored: dict | None = None) -> str:
        req = job.req
        sampler, schedule = resolve_sampling(req.sampler_name, req.scheduler)
        params: dict = {
            "Steps": req.steps,
            "Sampler": sampler_label(sampler),
            "Schedule type": schedule_label(schedule),
            "CFG scale": _num(req.cfg_scale),
            "Seed": job.seeds[index],
            "Size": f"{job.width}x{job.height}",
            "Model hash": result.model_hash,
            "Model": job.entry.name,
            "VAE": req.vae,
            "Variation seed": job.variation_seeds[index] if req.variation_strength > 0 else None,
            "Variation seed strength": _num(req.variation_strength) if req.variation_strength > 0 else None,
            "Seed resize from": "{}x{}".format(*req.seed_resize) if req.seed_resize else None,
            "Denoising strength": _num(req.denoising_strength) if req.init_image else None,
            "Mask blur": req.mask_blur if req.mask or req.outpaint else None,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "Batch size": req.batch_size if req.batch_size > 1 else None,
            "Batch pos": index % req.batch_size if req.batch_size > 1 else None,
        }
        if req.cfg_rescale:
            params["CFG rescale"] = _num(req.cfg_rescale)
        if req.noise == "a1111-cpu":
            params["RNG"] = "CPU"  # A1111 writes its RNG source when it is not its default (GPU)
        elif req.noise == "comfy":
            params["Noise"] = "comfy"  # imagesmith's key: ComfyUI's one-draw batch noise
        if req.eta_noise_seed_delta:
            params["ENSD"] = req.eta_noise_seed_delta
        if req.sgm_noise_multiplier:
            params["SGM noise multiplier"] = "True"
        if req.hires:
            params.update({"Hires upscale": _num(req.hires.hr_scale), "Hires upscaler": req.hires.hr_upscaler,
                           "Hires steps": req.hires.hr_second_pass_steps or None,
                           "Denoising strength": _num(req.hires.hr_denoising_strength)})
        if req.refiner_checkpoint and req.refiner_switch_at < 1:  # A1111's keys
            refiner = self.refiner_entry(job)
            short = (self._hash(refiner) or "")[:10]
            params["Refiner"] = f"{refiner.name} [{short}]" if short else refiner.name
            params["Refiner switch at"] = _num(req.refiner_switch_at)
            if self._two_passes(req) and req.refiner_pass != "second pass":  # A1111 writes the non-default only
                params["Hires refiner"] = req.refiner_pass
        if job.grounding is not None:
            params["Concept"] = job.grounding.note
        if req.regions:
            params["Regions"] = "; ".join(
                f"{r.prompt} ({'box ' + ' '.join(_num(v) for v in r.box) if r.box else 'mask'}, {_num(r.weight)})"
                for r in req.regions)
        if req.controlnet_units:
            params["ControlNet"] = "; ".join(
                f"{u.model} ({u.preprocessor}, {_num(u.weight)}"
                + (f", {CONTROL_MODE_NAMES[u.control_mode]}" if u.control_mode != "balanced" else "") + ")"
                for u in req.controlnet_units)
        if req.ip_adapter_units:
            params["IP-Adapter"] = "; ".join(
                f"{u.model} ({_num(u.weight)}, {_num(u.guidance_start)}-{_num(u.guidance_end)})"
                for u in req.ip_adapter_units)
        if job.plan is not None:
            reused = sum(r for r, _ in job.cache_stats)
            calls = sum(c for _, c in job.cache_stats)
            params["Performance"] = job.plan.infotext(reused=reused if job.cache_stats else None, calls=calls)
        if result.lora_hashes:
            params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in result.lora_hashes.items())
        if job.inversions:
            used = job.inversions.used([job.prompt, job.negative])
            params["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in used) or None
        if detailer is not None:
            from .detailer import infotext_params
            params.update(infotext_params(detailer))
        if restored is not None:  # A1111 writes the restorer's name; the visibility when it is not 1
            params["Face restoration"] = restored["model"]
            if restored["visibility"] != 1:
                params["Face restoration visibility"] = _num(restored["visibility"])
        if job.template is not None:  # the dynamic-prompts extension's keys: what was written, before the draw
            params["Template"] = job.template[0] or None
            params["Negative Template"] = job.template[1] or None
        params["Version"] = f"imagesmith {__version__}"
        prompt = job.prompt + "".join(f" <lora:{l.name}:{_num(l.weight)}>" for l in job.loras)
        return build_infotext(prompt, job.negative, {k: v for k, v in params.items() if v is not None})

    # ------------------------------------------------------------------ resolution
    def _resolve(self, req: GenerateRequest) -> _Job:
        text, params = P.extract_prompt_params(req.prompt)  # --ar / --seed / --no at the end of the prompt
        if text != req.prompt:
            update: dict[str, Any] = {"prompt": text}
            if params.seed is not None and req.seed < 0:
                update["seed"] = params.seed
            if params.no:
                update["negative_prompt"] = ", ".join(x for x in (req.negative_prompt.strip(), params.no) if x)
            req = req.model_copy(update=update)
        seeds, var_seeds = self._seeds(req)
        template = None
        if any(has_dynamic(t) for t in (req.prompt, req.negative_prompt, *(r.prompt for r in req.regions))):
            template = (req.prompt, req.negative_prompt)  # drawn before LoRA tags: a draw may add one
            folder = self.settings.home / "wildcards"
            regions = [r.model_copy(update={"prompt": expand_prompt(r.prompt, seed=seeds[0] + 2 + i, folder=folder)})
                       for i, r in enumerate(req.regions)]  # each region's prompt draws from its own seed
            req = req.model_copy(update={"prompt": expand_prompt(req.prompt, seed=seeds[0], folder=folder),
                                         "negative_prompt": expand_prompt(req.negative_prompt, seed=seeds[0] + 1,
                                                                          folder=folder), "regions": regions})
        prompt, tag_loras = P.extract_lora_tags(req.prompt)
        negative, _ = P.extract_lora_tags(req.negative_prompt)
        check_request(req)  # a malformed [from:to:when], before any work (the drawn wildcards included)
        if req.model and req.model.lower() in self._adopted:
            entry = self._adopted[req.model.lower()]
        else:
            entry = self.registry.get(req.model, "checkpoint") if req.model else self._default_checkpoint()
        arch = entry.arch
        if arch not in NATIVE_SIZE and arch != "house":
            why = next((n for n in entry.notes if "layout not recognised" not in n and "because of its folder" not in n),
                       None)
            raise UnsupportedModel(f"model {entry.name!r} has architecture {arch!r}, which the engine cannot run"
                                   + (f" ({why})" if why else ""))
        # LoRAs: request list first, then <lora:> tags; the last mention of a name wins
        merged: dict[str, LoraSpec] = {}
        for spec in [*req.loras, *tag_loras]:
            merged[spec.name] = spec
        loras = []
        for spec in merged.values():
            le = self.registry.get(spec.name, "lora")
            loras.append(ResolvedLora(le.name, str(le.path), spec.weight, le.arch, Path(le.path).stat().st_mtime_ns))
        init = mask = None
        if req.init_image:
            init = load_image(req.init_image, settings=self.settings, mode="RGB", what="init image")
        if req.mask:
            mask = load_image(req.mask, settings=self.settings, mode="L", what="mask")
            if mask.size != init.size:
                raise BadRequest(f"mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                                 f"{init.size[0]}x{init.size[1]}: they must match")
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        if req.outpaint:
            init, mask = outpaint_canvas(init, req.outpaint)
        control = [load_image(u.image, settings=self.settings, mode="RGB", what="control image")
                   for u in req.controlnet_units]
        for i, u in enumerate(req.ip_adapter_units):  # SD1/SDXL: IP-Adapters; FLUX: Redux
            unit = self.registry.get(u.model, "ipadapter")
            if arch == "flux" and unit.arch == "flux":
                if u.mask:
                    raise BadRequest(f"ip_adapter[{i}]: FLUX Redux adds its tokens to the whole prompt; it takes no mask")
            elif arch not in ("sd1", "sd2", "sdxl") or unit.arch == "flux":
                raise UnsupportedModel(f"ip_adapter[{i}]: {unit.name} is a{' FLUX Redux' if unit.arch == 'flux' else 'n SD'}"
                                       f" reference model; {entry.name} is {arch} (IP-Adapters run on SD1/SD2/SDXL, "
                                       "Redux on FLUX)")
        references = [load_image(u.image, settings=self.settings, mode="RGB", what=f"ip_adapter[{i}].image")
                      for i, u in enumerate(req.ip_adapter_units)]
        reference_masks = [load_image(u.mask, settings=self.settings, mode="L", what=f"ip_adapter[{i}].mask")
                           if u.mask else None for i, u in enumerate(req.ip_adapter_units)]
        edit_images = [load_image(path, settings=self.settings, mode="RGBA" if arch == "qwen21" else "RGB",
                                  what=f"edit_images[{i}]") for i, path in enumerate(req.edit_images)]
        if arch != "qwen21":  # Qwen-Image 2.1 takes up to three of its own; init_image keeps its img2img meaning
            if len(edit_images) > 2:
                raise BadRequest(f"edit_images: a multi-picture edit takes init_image and up to two more, got "
                                 f"{len(edit_images)}")
            if edit_images and (init is None or not Q.is_qwen_edit_plus(entry)):
                raise BadRequest(f"edit_images are more pictures for a multi-picture edit model (Qwen-Image-Edit-"
                                 f"Plus) with an init_image; {entry.name} is not one" if init is not None else
                                 "edit_images need the first picture as init_image")
        if params.aspect is not None and req.width is None and req.height is None and init is None:
            w, h = P.aspect_size(self._native_size(entry), params.aspect)
            req = req.model_copy(update={"width": w, "height": h})
        width, height = self._size(req, entry, init)
        grid = _author_grid(entry) if canonical_schedule(req.scheduler) == "automatic" else None
        if grid:  # the model's own steps (see _author_sigmas)
            req = req.model_copy(update={"steps": len(grid)})
        return _Job(req, entry, arch, width, height, prompt, negative, loras, init, mask, control, seeds, var_seeds,
                    template=template, ip_images=references, ip_masks=reference_masks, edit_images=edit_images,
                    author_sigmas=grid)

    def _default_checkpoint(self) -> ModelEntry:
        if not any(e.builtin for e in self.registry.list("checkpoint")):
            ensure_placeholder(self.settings)  # built once, on first need (~10 s)
            self.registry.scan()
        return self.registry.default_checkpoint()

    def _size(self, req: GenerateRequest, entry: ModelEntry, init: Image.Image | None) -> tuple[int, int]:
        if init is not None and req.width is None and req.height is None:
            w, h = init.size
            width, height = max(8, w // 8 * 8), max(8, h // 8 * 8)
        else:
            native = self._native_size(entry)
            width, height = req.width or native, req.height or native
        final = (width * (req.hires.hr_scale if req.hires else 1), height * (req.hires.hr_scale if req.hires else 1))
        if final[0] * final[1] > self.settings.max_pixels:
            raise BadRequest(f"{int(final[0])}x{int(final[1])} is over the pixel cap of "
                             f"{self.settings.max_pixels} (IMAGESMITH_MAX_PIXELS)")
        side = SIDE_MULTIPLE.get(entry.arch)
        if side and (width % side or height % side):
            raise BadRequest(f"{FAMILY[entry.arch]} needs width and height in multiples of {side}, got "
                             f"{width}x{height}")
        return width, height

    def _native_size(self, entry: ModelEntry) -> int:
        native = getattr(entry, "native_size", None)
        return native or NATIVE_SIZE.get(entry.arch, 512)

    @staticmethod
    def _seeds(req: GenerateRequest) -> tuple[list[int], list[int | None]]:
        n = req.batch_size * req.batch_count
        seed = req.seed if req.seed >= 0 else random.randrange(2**32)
        if req.noise == "comfy":  # ComfyUI: one seed per run (one noise draw over its batch), + 1 per run
            seeds = [(seed + i // req.batch_size) % 2**64 for i in range(n)]
        else:  # A1111: seed + i per image
            seeds = [(seed + i) % 2**64 for i in range(n)]
        if req.variation_strength > 0:
            vs = req.variation_seed if req.variation_seed is not None and req.variation_seed >= 0 else random.randrange(2**32)
            var = [(vs + i) % 2**64 for i in range(n)]
        else:
            var = [None] * n
        return seeds, var

    def _total_steps(self, job: _Job) -> int:
        """Sampler steps the job will report: txt2img runs `steps`; img2img A1111's int(strength x steps) + 1, or
        ComfyUI's `steps` (noise comfy); the hires pass likewise at its own strength."""
        req = job.req

        def partial(steps: int, strength: float) -> int:
            return steps if req.noise == "comfy" else int(min(strength, 0.999) * steps) + 1

        per_image = partial(req.steps, req.denoising_strength) if req.init_image else req.steps
        if req.hires and req.hires.hr_denoising_strength > 0:
            per_image += partial(req.hires.hr_second_pass_steps or req.steps, req.hires.hr_denoising_strength)
        return per_image * req.batch_count

    # ------------------------------------------------------------------ performance
    def plan_for(self, req: GenerateRequest, *, has_loras: bool = False, arch: str | None = None) -> perf.Plan:
        """The performance plan of a request on this engine's device (``engine.performance``)."""
        offload = self.settings.cpu_offload and self.device.type == "cuda"
        return perf.plan(req.performance or self.settings.performance, self.capabilities,
                         compile_setting="off" if offload else self.settings.compile,
                         cuda_graphs=self.settings.cuda_graphs, compile_scope=self.settings.compile_scope,
                         has_loras=has_loras,
                         hotswap=self.settings.lora_max_rank is not None, arch=arch)

    def _prepare_model(self, entry, head: _Job, members: list[_Job]) -> None:
        """Under the model's lock: the request's LoRAs made active, then its performance plan applied; every
        job of the call runs the same network."""
        pipe = entry.value
        p = self.plan_for(head.req, has_loras=bool(head.loras), arch=head.arch)
        for note in p.notes:
            log.warning("performance %s: %s", p.requested, note)
        if head.loras:
            perf.unfuse_for_lora(pipe, entry.state)
        apply_loras(pipe, entry.state, head.loras, head.arch, hotswap_rank=self.settings.lora_max_rank)
        if getattr(pipe, "unet", None) is not None and (head.req.ip_adapter_units or entry.state.get("ip_adapters")):
            from .ip_adapter import ensure_loaded
            ensure_loaded(pipe.unet, entry.state, [self._ip_adapter_state(u.model) for u in head.req.ip_adapter_units])
        net = perf.prepare(pipe, entry.state, p)
        for job in members or [head]:
            job.plan, job.net = p, net

    def warm_up(self, model: str | None = None, sizes: Sequence[tuple[int, int]] | None = None, *,
                performance: str | None = None, steps: int = 2, cfg_scale: float = 5.0) -> list[dict]:
        """Run a short generation at each resolution bucket (default: IMAGESMITH_WARMUP_SIZES) so that
        torch.compile's graphs for those shapes exist before the first real request. Returns the seconds each
        took."""
        out = []
        for width, height in (sizes if sizes is not None else self.settings.warmup_sizes):
            t0 = time.perf_counter()
            self.generate(GenerateRequest(prompt="warm-up", model=model, width=width, height=height, steps=steps,
                                          cfg_scale=cfg_scale, seed=0, performance=performance))
            out.append({"size": f"{width}x{height}", "seconds": round(time.perf_counter() - t0, 3)})
            log.info("warmed up %sx%s in %.1f s", width, height, out[-1]["seconds"])
        return out

    # ------------------------------------------------------------------ pieces (the node graph's building blocks)
    def checkpoint(self, name: str | None) -> ModelEntry:
        """A checkpoint's registry entry by name (or an adopted pipeline's); None: the default."""
        if name and name.lower() in self._adopted:
            return self._adopted[name.lower()]
        return self.registry.get(name, "checkpoint") if name else self._default_checkpoint()

    def pipeline(self, entry: ModelEntry):
        """The cache entry holding `entry`'s pipeline (loaded just in time); ``with it.use():`` while running it."""
        return self._pipeline_entry(entry)

    def component(self, kind: str, name: str):
        """A VAE or ControlNet by registry name, loaded once into the model cache."""
        return self._component(kind, name)

    def model_sampling(self, pipe, arch: str, width: int, height: int):
        """The model's sampling (sigmas, prediction type; FLUX's shift for this size)."""
        return self._model_sampling(pipe, _ArchOnly(arch), width, height)

    def vae_encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> scaled latents (the posterior's mode)."""
        return self._vae_encode_tensor(vae, pixels)

    def vae_decode_tensor(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, 3, H, W] in [0, 1] (float32, CPU)."""
        with torch.inference_mode(), _vae_precision(vae):
            if _is_frame_vae(vae):  # Qwen-Image's VAE: per-channel mean/std, one-frame video latents
                mean, std = _channel_stats(vae, latents.ndim)
                z = (latents.float() * std + mean).unsqueeze(2)
                pixels = vae.decode(z.to(vae.device, vae.dtype)).sample[:, :, 0]
            else:
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                pixels = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)).sample
        return (pixels.float().cpu() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ models
    def _pipeline_entry(self, entry: ModelEntry):
        from ..models.loaders import load_pipeline
        key = self._pipeline_key(entry)

        def loader():
            offload = self.settings.cpu_offload and self.device.type == "cuda"
            pipe = load_pipeline(entry, torch_dtype=self.dtype, device="cpu" if offload else str(self.device))
            if offload and self.settings.sequential_offload:  # each layer visits the GPU only while it runs
                pipe.enable_sequential_cpu_offload(device=self.device)
            elif offload:  # weights stay in RAM; each component visits the GPU only while it runs
                pipe.enable_model_cpu_offload(device=self.device)
            if self.settings.vae_tiling and hasattr(pipe, "vae"):
                pipe.vae.enable_tiling()
            return pipe
        return self.cache.get(key, loader, device=self.device)

    def _pipeline_key(self, entry: ModelEntry) -> tuple:
        return ("pipeline", str(entry.path), str(self.dtype), self.device.type)

    def _component(self, kind: str, name: str):
        from ..models import loaders
        entry = self.registry.get(name, kind)
        key = (kind, str(entry.path), str(self.dtype))
        fn = loaders.load_vae if kind == "vae" else loaders.load_controlnet

        def load():
            if entry.format != "torch-file":
                return fn(entry, torch_dtype=self.dtype).to(self.device)
            # a .pth ControlNet (lllyasviel's 1.1 releases): its tensors read as data, kept as safetensors in the
            # cache; a config.json beside it is its diffusers config (else the family's shipped one)
            import json

            from ..models.image_models import safetensors_path
            converted = entry.model_copy(update={"path": safetensors_path(
                entry.path, self.settings.home / "cache" / "models"), "format": "single-file"})
            beside = Path(entry.path).with_name("config.json")
            config = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else None
            return loaders.load_controlnet(converted, torch_dtype=self.dtype, config=config).to(self.device)
        return self.cache.get(key, load, device=self.device).value

    def _hash(self, entry: ModelEntry) -> str | None:
        if str(entry.path).startswith("memory://"):
            return None
        try:
            return self.registry.hash(entry)
        except Exception:  # hashing is best effort; never fail a job over metadata
            return None

    def _hash_path(self, path: str, *, lora: bool = False) -> str:
        entry = next((e for e in self.registry.list("lora") if str(e.path) == path), None)
        return (self._hash(entry) or "")[: 12 if lora else 10] if entry else ""

    def upscalers(self):
        if self._upscalers is None:
            from .upscale import UpscalerSet
            self._upscalers = UpscalerSet(self.settings, device=str(self.device), cache=self.cache)
        return self._upscalers

    def face_restorer(self, name: str | None = None):
        """The face restorer called ``name`` (models list --kind restorer), or the first one installed; loaded
        once per file (and again when the file changes)."""
        from .restore import FaceRestorer
        if name:
            entry = self.registry.get(name, "restorer")
        else:
            found = sorted(self.registry.list("restorer"), key=lambda e: e.name.lower())
            if not found:
                self.registry.scan()
                found = sorted(self.registry.list("restorer"), key=lambda e: e.name.lower())
            if not found:
                raise ModelNotFound("no face restorer installed: put a GFPGAN or RestoreFormer file (.safetensors "
                                    f"or .pth) in {self.settings.models_dir / 'restorers'}")
            entry = found[0]
        path = Path(entry.path)
        key = f"{path}@{path.stat().st_mtime_ns}"
        with self._restorer_lock:
            restorer = self._restorers.get(key)
            if restorer is None:
                restorer = FaceRestorer(path, cache_dir=self.settings.home / "cache" / "models", name=entry.name,
                                        device=str(self.device), cache=self.cache)
                self._restorers = {k: v for k, v in self._restorers.items() if not k.startswith(f"{path}@")}
                self._restorers[key] = restorer
        return restorer

    def restore_faces(self, images: list[Image.Image], spec, *, progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> tuple[list[Image.Image], list[dict]]:
        """Each image with its faces restored (:class:`RestoreFaces`), and what was done to each."""
        restorer = self.face_restorer(spec.model)
        out, reports = [], []
        for i, image in enumerate(images):
            if cancel is not None:
                cancel.raise_if_cancelled()
            if progress is not None:
                progress(ProgressEvent(i, len(images), f"restoring faces with {restorer.name}"))
            done, report = restorer.restore(image, visibility=spec.visibility, confidence=spec.confidence,
                                            fidelity=spec.codeformer_weight)
            out.append(done)
            reports.append(report.as_dict())
        if progress is not None:
            progress(ProgressEvent(len(images), len(images), f"restoring faces with {restorer.name}"))
        return out, reports

    # ------------------------------------------------------------------ running
    def _text_key(self, job: _Job, pipe=None) -> dict:
        """What identifies the text encoder's weights: the model file (and its mtime) plus active LoRAs; and the
        textual inversions the prompts may name."""
        path = Path(job.entry.path)
        stamp = path.stat().st_mtime_ns if path.exists() else id(self._adopted.get(job.entry.name.lower()))
        if job.inversions is None and pipe is not None:
            job.inversions = self.textual_inversions(pipe, job.arch)
        return {"model_key": f"{path}@{stamp}",
                "loras": [(adapter_name(l), l.weight) for l in job.loras if l.weight != 0],
                "embeddings": job.inversions or None}

    def textual_inversions(self, pipe, arch: str):
        """The registry's embeddings that fit this pipeline's text encoders (``engine.embeddings``); None for
        architectures that take none (SD3, FLUX, the house model's BERT encoder)."""
        from .embeddings import TextualInversions, load_embedding
        if arch in ("sd1", "sd2"):
            encoders, kinds = [pipe.text_encoder], ("clip",)
        elif arch == "sdxl":
            encoders, kinds = [pipe.text_encoder, pipe.text_encoder_2], ("clip_l", "clip_g")
            if pipe.text_encoder is None:  # the refiner: the second encoder only
                encoders, kinds = [pipe.text_encoder_2], ("clip_g",)
        else:
            return None
        found = TextualInversions(kinds, tuple(int(e.get_input_embeddings().weight.shape[1]) for e in encoders))
        stamp = tuple(d.stat().st_mtime_ns for d in self.settings.model_dirs("embeddings") if d.is_dir())
        if stamp != self._embeddings.get("folders"):  # a file added or removed since: WebUI picks it up too
            self.registry.scan()
            self._embeddings["folders"] = stamp
        for entry in self.registry.list("embedding"):
            path = Path(entry.path)
            try:
                key = (str(path), path.stat().st_mtime_ns)
                if key not in self._embeddings:
                    self._embeddings[key] = load_embedding(path, entry.name, (self.registry.sha256(entry) or "")[:12])
                found.add(self._embeddings[key])
            except (OSError, ImagesmithError) as exc:  # one bad file never stops a job; it is named in the log
                log.warning("embedding %s skipped: %s", entry.name, exc)
        return found

    def _ground(self, pipe, job: _Job) -> None:
        """Concept grounding (``engine.grounding``) for models whose folder ships a concept list (concepts.json):
        the house models."""
        if not job.req.ground_concepts or job.arch not in ("sd1", "sd2", "house"):
            return
        folder = str(job.entry.path)
        if folder not in self._vocabularies:
            self._vocabularies[folder] = ConceptVocabulary.load(folder) if Path(folder).is_dir() else None
        vocab = self._vocabularies[folder]
        if vocab is not None:
            job.grounding = vocab.ground(job.prompt, mean_pooled(pipe.tokenizer, pipe.text_encoder))

    def _encode(self, pipe, job: _Job, *, for_arch: str) -> dict:
        req = job.req
        if for_arch in ("sd1", "sd2", "house"):
            cond, uncond = self.prompt_encoder.encode_pair_sd(
                job.grounding.prompt if job.grounding else job.prompt, job.negative, pipe.tokenizer, pipe.text_encoder, clip_skip=req.clip_skip,
                device=self.device, dtype=self.dtype, **self._text_key(job, pipe))
            return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        if for_arch == "sdxl":
            cond, uncond, pooled, neg_pooled = self.prompt_encoder.encode_pair_sdxl(
                job.prompt, job.negative, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                clip_skip=req.clip_skip, device=self.device, dtype=self.dtype, **self._text_key(job, pipe))
            return {"prompt_embeds": cond, "negative_prompt_embeds": uncond,
                    "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
        # SD3 and FLUX pipelines encode raw text themselves (T5 + CLIP); WebUI weights do not apply.
        out = {"prompt": P.plain_prompt(job.prompt)}
        if for_arch in ("sd3", "qwen", "qwen21"):
            out["negative_prompt"] = P.plain_prompt(job.negative)
        if req.clip_skip > 1:
            out["clip_skip"] = req.clip_skip - 1
        return out

    def _run_batch(self, entry, job: _Job, lo: int, counter: StepCounter) -> list[Image.Image]:
        return self._ksample_rows(entry, [(job, lo, job.req.batch_size)],
                                  [self._encode(entry.value, job, for_arch=job.arch)], counter)

    def _run_rows(self, entry, jobs: list[_Job], encoded: list[dict], counter: StepCounter) -> list[list[Image.Image]]:
        """One sampling run for several requests that share a :meth:`batch_key`: per-image conditioning (each
        request's own, repeated for its images), per-image noise; the images split back per request."""
        sizes = [j.req.batch_size for j in jobs]
        images = self._ksample_rows(entry, [(j, 0, n) for j, n in zip(jobs, sizes)], encoded, counter)
        split, lo = [], 0
        for n in sizes:
            split.append(images[lo:lo + n])
            lo += n
        return split

    # ------------------------------------------------------------------ the sampling layer (SD1/SD2/SDXL/house)
    def _ksample_rows(self, entry, rows: list[tuple[_Job, int, int]], encoded: list[dict],
                      counter: StepCounter) -> list[Image.Image]:
        """txt2img / img2img / inpainting (and the hires fix) of one or more requests that share a batch key, on
        imagesmith's sampling layer: the request's sampler over its schedule, with the noise it names."""
        job = rows[0][0]
        req = job.req
        pipe = entry.value
        if req.controlnet and job.arch not in ("sd1", "sd2", "sdxl", "house", "flux", "sd3", "qwen"):
            raise UnsupportedModel(f"ControlNet is supported on SD1/SD2/SDXL, SD3, FLUX and Qwen-Image models, not "
                                   f"{job.arch}")
        if req.controlnet and is_qwen_edit(job.entry):
            raise BadRequest(f"{job.entry.name} is a Qwen-Image-Edit model: its ControlNets are for Qwen-Image; "
                             "the edit model takes the picture and the instruction")
        if job.arch == "flux" and is_flux_control(pipe) and len(req.controlnet_units) != 1:
            raise BadRequest(f"{job.entry.name} is a FLUX Canny/Depth dev model: it reads a control picture beside "
                             "its latent; give one controlnet unit with that picture (its model: this checkpoint, "
                             "the preprocessor that draws the map: canny, depth_anything...)")
        if req.cfg_rescale and job.arch in FLOW_ARCHS:
            raise BadRequest(f"cfg_rescale works on epsilon/v-prediction models (SD1/SD2/SDXL), not {job.arch}")
        vae = self._component("vae", req.vae) if req.vae else pipe.vae
        mode = req.mode
        if (is_kontext(job.entry) or is_qwen_edit(job.entry)) and mode != "txt2img":
            if mode == "inpaint":
                family = "FLUX Kontext" if is_kontext(job.entry) else "Qwen-Image-Edit"
                raise BadRequest(f"{job.entry.name} is a {family} model: give it the picture to edit and an "
                                 "instruction, without a mask")
            mode = "txt2img"  # an instruction edit starts from noise, reading the picture as reference tokens
        init_latent = mask = concat = None
        crop = None
        if mode != "txt2img":
            init = job.init_image.resize((job.width, job.height), Image.LANCZOS) \
                if job.init_image.size != (job.width, job.height) else job.init_image
            n = sum(k for _, _, k in rows)
            if mode == "inpaint":
                m = job.mask.resize(init.size, Image.NEAREST) if job.mask.size != init.size else job.mask
                full_init, full_blurred = init, (m.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur
                                                 else m)
                if req.inpaint_full_res:  # 'only masked': work on a crop around the mask at the full working size
                    crop = masked_crop(full_blurred, req.inpaint_full_res_padding, (job.width, job.height))
                    for j, _, _ in rows:
                        j.crop = crop
                    if crop is not None:
                        init = init.crop(crop).resize((job.width, job.height), Image.LANCZOS)
                        m = m.crop(crop).resize((job.width, job.height), Image.NEAREST)
                if req.inpainting_fill == "fill":
                    init = fill_masked(init, m)
            init_latent = self._vae_encode(vae, [init]).repeat(n, 1, 1, 1)  # one encode, every image of the batch
            if mode == "inpaint":
                blurred = full_blurred if crop is None else (  # the crop's own mask, blurred at its own scale
                    m.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur else m)
                pixel_mask = torch.from_numpy(np.asarray(blurred.convert("L"), dtype=np.float32) / 255.0)[None, None]
                mask = torch.nn.functional.interpolate(pixel_mask, size=init_latent.shape[-2:], mode="bilinear")
                mask = mask.repeat(n, 1, 1, 1)
                if req.inpainting_fill in ("latent noise", "latent nothing"):  # A1111's masked-content choices
                    seeds = [j.seeds[i] for j, lo, k in rows for i in range(lo, lo + k)]
                    fresh = torch.stack([image_noise(init_latent.shape[1:], s, None, 0.0) for s in seeds]) \
                        if req.inpainting_fill == "latent noise" else torch.zeros_like(init_latent)
                    init_latent = init_latent * (1 - mask) + fresh * mask
                if getattr(pipe, "unet", None) is not None and pipe.unet.config.in_channels == 9:  # inpainting UNet: mask and masked image as extra inputs
                    keep = torch.from_numpy(np.asarray(init.convert("RGB"), dtype=np.float32) / 255.0)
                    # the hole mid-grey (0 in [-1, 1]), as diffusers' inpainting pipeline and A1111 give it
                    keep = (keep.permute(2, 0, 1)[None] * 2 - 1) * (pixel_mask[0] < 0.5)
                    masked = self._vae_encode_tensor(vae, keep).repeat(n, 1, 1, 1)
                    concat = torch.cat([mask, masked], dim=1)
                    mask = None
                elif is_flux_fill(pipe):  # FLUX Fill: the masked picture's latent and the mask, 8x8 pixels a latent
                    hard = (pixel_mask >= 0.5).float()
                    keep = torch.from_numpy(np.asarray(init.convert("RGB"), dtype=np.float32) / 255.0)
                    # the hole mid-grey (0 in [-1, 1]), as diffusers' FluxFillPipeline and ComfyUI give it
                    masked = self._vae_encode_tensor(vae, (keep.permute(2, 0, 1)[None] * 2 - 1) * (1 - hard[0]))
                    f = getattr(pipe, "vae_scale_factor", 8)
                    _, _, hh, ww = hard.shape
                    cells = hard.view(1, hh // f, f, ww // f, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, hh // f, ww // f)
                    concat = torch.cat([masked, cells], dim=1).repeat(n, 1, 1, 1)
                    mask = None
        strength = req.denoising_strength if mode != "txt2img" else None
        latents = self._ksample(pipe, rows, encoded, counter, mode, job.width, job.height, req.steps,
                                latent=init_latent, strength=strength, mask=mask, concat=concat)
        hires = req.hires if mode == "txt2img" else None
        if hires:
            return self._ksample_hires(entry, pipe, vae, rows, encoded, counter, latents)
        _keep_latents(rows, latents)
        images = self._vae_decode(vae, latents)
        if mode == "inpaint":
            if crop is not None:  # the repainted crop back at its place in the whole picture
                images = [paste_crop(full_init, im, crop) for im in images]
            images = [keep_unmasked(full_init, im, full_blurred) for im in images]
        return images

    def _ksample_hires(self, entry, pipe, vae, rows, encoded, counter, latents) -> list[Image.Image]:
        """A1111's hires fix on the sampling layer: upscale the first pass (in latent space, or decoded and
        upscaled in pixels), then img2img at the hires strength."""
        job = rows[0][0]
        hr = job.req.hires
        width = int(job.width * hr.hr_scale) // 8 * 8
        height = int(job.height * hr.hr_scale) // 8 * 8
        vae_sf = getattr(pipe, "vae_scale_factor", 8)
        if job.arch in SIDE_MULTIPLE:
            side = SIDE_MULTIPLE[job.arch]
            width, height = width // side * side, height // side * side
        if hr.hr_upscaler == "Latent":
            if hr.hr_denoising_strength == 0:
                raise BadRequest("the Latent hires upscaler needs a denoising strength above 0")
            if job.arch in FLOW_ARCHS:
                raise BadRequest("the Latent hires upscaler works with SD1/SD2/SDXL; use Lanczos or R-ESRGAN 4x+ for this model")
            up = torch.nn.functional.interpolate(latents, size=(height // vae_sf, width // vae_sf), mode="bilinear")
        else:
            upscaler = self.upscalers().get(hr.hr_upscaler)
            images = [upscaler.upscale(im, hr.hr_scale).resize((width, height), Image.LANCZOS)
                      for im in self._vae_decode(vae, latents)]
            if hr.hr_denoising_strength == 0:  # upscale only: no second diffusion pass
                return images
            up = self._vae_encode(vae, images)
        out = self._ksample(pipe, rows, encoded, counter, "hires", width, height,
                            hr.hr_second_pass_steps or job.req.steps, latent=up,
                            strength=hr.hr_denoising_strength)
        _keep_latents(rows, out)
        return self._vae_decode(vae, out)

    def _ksample(self, pipe, rows, encoded, counter: StepCounter, phase: str, width: int, height: int, steps: int, *,
                 latent: torch.Tensor | None = None, strength: float | None = None, mask: torch.Tensor | None = None,
                 concat: torch.Tensor | None = None) -> torch.Tensor:
        job = rows[0][0]
        req = job.req
        ms = self._model_sampling(pipe, job, width, height)
        sampler, schedule = resolve_sampling(req.sampler_name, req.scheduler, flow=ms.is_flow)
        family = "sdxl" if job.arch == "sdxl" else "sd1"
        comfy = req.noise == "comfy"
        grid = self._author_sigmas(ms, job.author_sigmas)
        if grid is not None:  # the model's own sigmas (Qwen-Image 2.1's sample_sigmas), their length its steps
            n = len(grid) - 1
            sigmas = grid if strength is None else grid[n - int(min(strength, 0.999) * n) - 1:]
        elif strength is None:
            sigmas = K.plan_sigmas(ms, sampler, schedule, steps, family=family)
        elif comfy:
            sigmas = K.plan_sigmas(ms, sampler, schedule, steps, denoise=max(strength, 1e-4), family=family)
        else:
            sigmas = K.a1111_img2img_sigmas(ms, sampler, schedule, steps, strength, family=family)
        shape = self._latent_shape(pipe, job, width, height)
        seeds = [j.seeds[i] for j, lo, n in rows for i in range(lo, lo + n)]
        if comfy:  # one draw per request over its images (ComfyUI's batch noise)
            noise = torch.cat([K.initial_noise("comfy", (n,) + shape, [j.seeds[lo]]) for j, lo, n in rows])
        elif req.variation_strength > 0 or req.noise == "a1111-cpu":
            noise = torch.stack([image_noise(shape, j.seeds[i], j.variation_seeds[i], j.req.variation_strength,
                                             _resize_from(j.req, shape, width, height))
                                 for j, lo, n in rows for i in range(lo, lo + n)])
        else:
            noise = K.initial_noise(req.noise, (len(seeds),) + shape, seeds, device=self.device)
        if self.device.type != "cpu":  # the sampler's arithmetic runs beside the network: no copy, no sync per step
            noise, latent, mask, concat = (None if t is None else t.to(self.device) for t in (noise, latent, mask, concat))
        if req.regions:
            denoiser = self._regional_denoiser(pipe, job, rows, encoded, ms, width, height, len(seeds), concat,
                                               sigmas)
        else:
            denoiser = (self._scheduled_denoiser(pipe, job, rows, ms, width, height, len(seeds), concat, sigmas)
                        or self._denoiser(pipe, job, rows, encoded, ms, width, height, len(seeds), concat))
        held = contextlib.ExitStack()
        # the refiner's pass: with the hires fix's second diffusion pass, the one(s) refiner_pass names (A1111's
        # "Hires fix: which pass to enable refiner for", default the second); else the only one
        if req.refiner_checkpoint and req.refiner_switch_at < 1 and self._refiner_in(req, phase):
            steps_run = len(sigmas) - 1
            switch = min(steps_run - 1, max(1, round(steps_run * req.refiner_switch_at)))
            refiner = self._refiner_denoiser(job, rows, ms, width, height, len(seeds), concat, held)
            denoiser = StepScheduled([(switch, denoiser), (steps_run, refiner)], sigmas)
        if job.plan is not None and job.plan.step_cache is not None:
            denoiser = StepCache(denoiser, sigmas, threshold=job.plan.step_cache)
        first = rows[0][1]

        def on_step(i, x, denoised, sigma):
            counter.step(phase, first, denoised)  # previews show the current x0 estimate (as A1111's and ComfyUI's)

        with held, torch.inference_mode():
            out = K.sample(denoiser, ms, sampler, sigmas.to(torch.float32), noise=noise, latent=latent,
                           seed=job.seeds[first], noise_mode=req.noise, seeds=seeds,
                           eta_noise_seed_delta=req.eta_noise_seed_delta, denoise_mask=mask, callback=on_step,
                           sgm_noise_multiplier=req.sgm_noise_multiplier)
        if isinstance(denoiser, StepCache):
            job.cache_stats.append((denoiser.reused, denoiser.calls))
        return out

    @staticmethod
    def _author_sigmas(ms, grid: list[float] | None) -> torch.Tensor | None:
        """A model author's sampling grid (the job's ``author_sigmas``: QwenImage21Pipeline's ``sample_sigmas``,
        taken when the request leaves the schedule to the model), shifted by the model's e^mu for this size and
        stretched to its terminal as diffusers' scheduler does, then 0. None without one."""
        if not grid:
            return None
        shifted = ms._shifted(torch.tensor(grid, dtype=torch.float64)).float()
        return ms.stretch_to_terminal(torch.cat([shifted, shifted.new_zeros(1)]))

    @staticmethod
    def _two_passes(req: GenerateRequest) -> bool:
        """Whether the hires fix runs a second diffusion pass (the refiner then follows refiner_pass)."""
        return req.hires is not None and req.hires.hr_denoising_strength > 0 and req.mode == "txt2img"

    def _refiner_in(self, req: GenerateRequest, phase: str) -> bool:
        if not self._two_passes(req):
            return True
        return req.refiner_pass == "both passes" or (req.refiner_pass == "second pass") == (phase == "hires")

    def refiner_entry(self, job: _Job) -> ModelEntry:
        """The refiner a request names, checked against its base: it continues the base's latents, so it must be of
        the same family (an SDXL refiner, or another SDXL model, for an SDXL base)."""
        entry = self.registry.get(job.req.refiner_checkpoint, "checkpoint")
        if entry.arch != job.arch:
            raise BadRequest(f"refiner {entry.name} is a {entry.arch} model but the base {job.entry.name} is "
                             f"{job.arch}: a refiner continues the base's latents, so both must be of one family")
        return entry

    def _refiner_denoiser(self, job: _Job, rows, ms, width: int, height: int, n: int, concat,
                          held: contextlib.ExitStack):
        """The refiner's denoiser for the last steps: its own pipeline (held for the sampling), its own text
        encoders and, for a true SDXL refiner, its aesthetic-score conditioning; none of the base's LoRAs,
        ControlNets or references."""
        entry = self.refiner_entry(job)
        holder = self._pipeline_entry(entry)
        held.enter_context(holder.use())
        pipe = holder.value
        view = replace(job, entry=entry, net=None, loras=[], inversions=None, control_images=[], ip_images=[],
                       ip_masks=[], grounding=None, plan=None)
        view.req = job.req.model_copy(update={"controlnet": None, "ip_adapter": None, "regions": []})
        return self._denoiser(pipe, view, rows, [self._encode(pipe, view, for_arch=job.arch)], ms, width, height, n,
                              concat)

    def _regional_denoiser(self, pipe, job: _Job, rows, encoded, ms, width: int, height: int, n: int, concat,
                           sigmas):
        """Regional prompting with ComfyUI's mask semantics: the base prompt everywhere with weight 1, each
        region's prompt inside its (feathered) mask with its weight; the guided estimates are averaged by weight.
        The base and each region may use prompt editing, alternation and AND, each scheduled on its own."""
        base = (self._scheduled_denoiser(pipe, job, rows, ms, width, height, n, concat, sigmas)
                or self._denoiser(pipe, job, rows, encoded, ms, width, height, n, concat))
        parts = [(None, base)]
        vae_sf = getattr(pipe, "vae_scale_factor", 8)
        for i, region in enumerate(job.req.regions):
            view = replace(job, prompt=region.prompt, grounding=None)
            d = (self._scheduled_denoiser(pipe, view, rows, ms, width, height, n, concat, sigmas)
                 or self._denoiser(pipe, view, rows, [self._encode(pipe, view, for_arch=job.arch)], ms, width,
                                   height, n, concat))
            mask = region_mask(region, width, height, settings=self.settings, what=f"regions[{i}].mask")
            latent_mask = torch.nn.functional.interpolate(mask, size=(height // vae_sf, width // vae_sf),
                                                          mode="area")
            parts.append((latent_mask * region.weight, d))
        return RegionMix(parts)

    def _scheduled_denoiser(self, pipe, job: _Job, rows, ms, width: int, height: int, n: int, concat, sigmas):
        """A1111's prompt editing / alternation / AND (engine.prompt_editing): one denoiser per stretch of steps
        with the same texts, switched by step; AND parts composed. None when the prompts schedule nothing."""
        if len(rows) != 1 or not (has_editing(job.prompt) or has_editing(job.negative)):
            return None
        steps = len(sigmas) - 1
        pos, neg = prompt_schedule(job.prompt, steps), prompt_schedule(job.negative, steps)
        if len(pos) == 1 and len(neg) == 1 and pos[0][1] == job.prompt and neg[0][1] == job.negative and \
                len(split_and(job.prompt)) == 1:
            return None  # (one stretch with other text, "[a:b:0]", still reads the resolved text)
        def denoiser_for(prompt: str, negative: str):
            view = replace(job, prompt=prompt, negative=negative, grounding=None)
            return self._denoiser(pipe, view, rows, [self._encode(pipe, view, for_arch=job.arch)], ms, width,
                                  height, n, concat)

        parts = []
        for end in sorted({e for e, _ in pos} | {e for e, _ in neg}):
            negative = text_at(neg, end)
            composed = split_and(text_at(pos, end))
            if len(composed) == 1 and composed[0][1] == 1.0:
                parts.append((end, denoiser_for(composed[0][0], negative)))
            else:  # AND: composable diffusion over the parts
                parts.append((end, Composed([(w, denoiser_for(t, negative)) for t, w in composed])))
        return parts[0][1] if len(parts) == 1 else StepScheduled(parts, sigmas)

    def _model_sampling(self, pipe, job: _Job, width: int, height: int):
        config = dict(pipe.scheduler.config)
        if job.arch in PACKED_ARCHS:  # FLUX and Qwen-Image shift time by e^mu, mu growing with the token count (diffusers')
            if not config.get("use_dynamic_shifting"):
                return FlowModelSampling(shift=float(config.get("shift", 1.0)), multiplier=1.0, timesteps=10000,
                                         shift_terminal=config.get("shift_terminal") or None)
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift
            tokens = (height // 16) * (width // 16)
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            return FlowModelSampling(mu=float(mu), multiplier=1.0, timesteps=10000,
                                     shift_terminal=config.get("shift_terminal") or None)
        return from_scheduler_config(config, arch=job.arch)

    @staticmethod
    def _latent_shape(pipe, job: _Job, width: int, height: int) -> tuple[int, int, int]:
        vae_sf = getattr(pipe, "vae_scale_factor", 8)
        if job.arch == "flux":  # FLUX Fill reads more features than it writes: its latent is its output's
            cfg = pipe.transformer.config
            return ((cfg.out_channels or cfg.in_channels) // 4, height // vae_sf, width // vae_sf)
        net = getattr(pipe, "unet", None) or pipe.transformer
        return (getattr(net.config, "out_channels", None) or net.config.in_channels, height // vae_sf, width // vae_sf)

    def _denoiser(self, pipe, job: _Job, rows, encoded, ms, width: int, height: int, n: int, concat):
        req = job.req
        if job.arch == "qwen":
            return self._qwen_denoiser(pipe, job, rows, encoded, ms, width, height)
        if job.arch == "qwen21":
            return self._qwen21_denoiser(pipe, job, rows, encoded, ms, width, height)
        if job.arch == "sd3":
            conds, unconds = [], []
            for (j, _, k), e in zip(rows, encoded):
                pe, ne, pp, npool = pipe.encode_prompt(e["prompt"], None, None, device=self.device,
                                                       do_classifier_free_guidance=True,
                                                       negative_prompt=e.get("negative_prompt", ""),
                                                       clip_skip=e.get("clip_skip"))
                conds.append(Conditioning(pe.repeat(k, 1, 1), {"pooled": pp.repeat(k, 1)}))
                unconds.append(Conditioning(ne.repeat(k, 1, 1), {"pooled": npool.repeat(k, 1)}))
            cond, uncond = _cat_conditioning(conds), _cat_conditioning(unconds)
            control = self._dit_control(pipe, job, ms, n, lambda t: t, (width, height)) if job.control_images else None
            return SD3Denoiser(job.net or pipe.transformer, ms, cond, uncond if req.cfg_scale != 1 else None,
                               req.cfg_scale, control=control)
        if job.arch == "flux":
            conds = []
            for (j, _, k), e in zip(rows, encoded):
                pe, pp, txt_ids = pipe.encode_prompt(e["prompt"], None, device=self.device)
                conds.append(Conditioning(pe.repeat(k, 1, 1), {"pooled": pp.repeat(k, 1), "txt_ids": txt_ids}))
            cond = _cat_conditioning(conds, keep=("txt_ids",))
            vae_sf = pipe.vae_scale_factor
            h, w = height // vae_sf, width // vae_sf
            img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)
            guidance = req.cfg_scale if pipe.transformer.config.guidance_embeds else None
            pack = lambda x: pipe._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])  # noqa: E731
            extra = pack(concat) if concat is not None else None  # FLUX Fill: masked picture + mask
            context = None
            extra_text = self._redux_tokens(job, ms, n) if req.ip_adapter_units else None
            if is_flux_control(pipe):  # FLUX Canny/Depth dev: the control map's latent beside the latent
                extra, control = pack(self._control_latent(pipe, job, width, height).repeat(n, 1, 1, 1)), None
            else:
                control = self._dit_control(pipe, job, ms, n, pack, (width, height)) if job.control_images else None
            if is_kontext(job.entry) and job.init_image is not None:  # the picture to edit, as reference tokens
                ref = job.init_image.convert("RGB").resize((width, height), Image.LANCZOS)
                tokens = pack(self._vae_encode(pipe.vae, [ref]).repeat(n, 1, 1, 1))
                ref_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)
                ref_ids[..., 0] = 1
                context = (tokens, ref_ids)
            return FluxDenoiser(job.net or pipe.transformer, ms, cond, guidance, pack=pack,
                                unpack=lambda y: pipe._unpack_latents(y, height, width, vae_sf), img_ids=img_ids,
                                extra=extra, context=context, extra_text=extra_text, control=control)
        cond, uncond = self._conditioning(pipe, rows, encoded, width, height)
        control = self._control_specs(job, ms, n, (width, height), pipe.unet) if job.control_images else None
        net, windows, masks = job.net or pipe.unet, None, None
        if req.ip_adapter_units:  # the references' embeddings on both sides of CFG, each with its weight window
            cond.ip, uncond.ip, windows = self._ip_conditioning(pipe, job, ms, n)
            net = pipe.unet  # the IP attention processors live on the pipeline's own UNet
            if any(m is not None for m in job.ip_masks):
                masks = [None if m is None else torch.from_numpy(np.asarray(
                    m.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0)[None, None]
                    for m in job.ip_masks]
        return UNetDenoiser(net, ms, cond, uncond if req.cfg_scale != 1 else None, req.cfg_scale,
                            control=control, concat=concat, cfg_rescale=req.cfg_rescale, ip_windows=windows,
                            ip_masks=masks)

    def _qwen_denoiser(self, pipe, job: _Job, rows, encoded, ms, width: int, height: int):
        """Qwen-Image: the pipeline's own Qwen2.5-VL conditioning for each request (and its negative when CFG is
        on); Qwen-Image-Edit also gives the encoder the picture to edit and appends its latent as tokens."""
        req = job.req
        picture = context = None
        if is_qwen_edit(job.entry):
            if job.init_image is None:
                raise BadRequest(f"{job.entry.name} is a Qwen-Image-Edit model: give it the picture to edit "
                                 "(init_image) and an instruction")
            n = sum(k for _, _, k in rows)
            pictures, tokens, shapes = [], [], []
            for source in [job.init_image, *job.edit_images]:  # each: for the text encoder, and as reference tokens
                (rw, rh), (cw, ch) = Q.reference_sizes(pipe, source)
                pictures.append(source.convert("RGB").resize((cw, ch), Image.LANCZOS))
                ref = self._vae_encode(pipe.vae, [source.convert("RGB").resize((rw, rh), Image.LANCZOS)])
                tokens.append(Q.pack(pipe, ref).repeat(n, 1, 1))
                shapes.append((1, rh // pipe.vae_scale_factor // 2, rw // pipe.vae_scale_factor // 2))
            picture = pictures if len(pictures) > 1 else pictures[0]
            context = (torch.cat(tokens, dim=1), shapes)
        guided = req.cfg_scale != 1
        conds, unconds = [], []
        for (j, _, k), e in zip(rows, encoded):
            conds.append((*Q.encode_text(pipe, e["prompt"], self.device, picture), k))
            if guided:  # diffusers' true CFG needs a negative text; an empty one is a single space there
                unconds.append((*Q.encode_text(pipe, e.get("negative_prompt") or " ", self.device, picture), k))
        vae_sf = pipe.vae_scale_factor
        n = sum(k for _, _, k in rows)
        control = self._dit_control(pipe, job, ms, n, lambda t: Q.pack(pipe, t), (width, height)) \
            if job.control_images else None
        return QwenDenoiser(job.net or pipe.transformer, ms, Q.stack_conditioning(conds),
                            Q.stack_conditioning(unconds) if guided else None, req.cfg_scale,
                            pack=lambda x: Q.pack(pipe, x), unpack=lambda y: Q.unpack(pipe, y, width, height),
                            shape=(1, height // vae_sf // 2, width // vae_sf // 2), context=context, control=control)

    def _qwen21_denoiser(self, pipe, job: _Job, rows, encoded, ms, width: int, height: int):
        """Qwen-Image 2.1: each request's text (and negative, when CFG is on) through the pipeline's Qwen3-VL, with
        the condition pictures (``edit_images``) both read by the encoder and VAE-encoded as tokens before the
        target's, each at about the output's area in its own aspect (QwenImage21Pipeline's ``output_resolution``);
        the transformer's text and picture keys and values computed once for the run."""
        req = job.req
        pictures = tokens = None
        if job.edit_images:
            area = width * height
            sized, latents, shapes = [], [], []
            for source in job.edit_images:
                cw, ch = Q.condition_size(pipe, source, area)
                picture = source.convert("RGBA").resize((cw, ch), Image.LANCZOS)
                sized.append(picture)
                latents.append(Qwen21Denoiser.pack(self._vae_encode(pipe.vae, [picture])))
                shapes.append((1, ch // pipe.vae_scale_factor, cw // pipe.vae_scale_factor))
            pictures, tokens = sized, (torch.cat(latents, dim=1), shapes)

        def texts(key: str, default: str) -> list[Qwen21Text]:
            out = []
            for (_, _, k), e in zip(rows, encoded):
                embeds, _, slots = pipe.encode_prompt(e.get(key) or default, image=pictures, device=self.device)
                out.append(Qwen21Text(embeds, slots, k))
            return out
        guided = req.cfg_scale != 1
        vae_sf = pipe.vae_scale_factor
        return Qwen21Denoiser(job.net or pipe.transformer, ms, texts("prompt", ""),
                              texts("negative_prompt", " ") if guided else None, req.cfg_scale,
                              shape=(1, height // vae_sf, width // vae_sf), pictures=tokens)

    def _control_latent(self, pipe, job: _Job, width: int, height: int) -> torch.Tensor:
        """FLUX Canny/Depth dev's control picture: the one unit's image through its preprocessor, at the output size,
        VAE-encoded (what diffusers' FluxControlPipeline and ComfyUI's InstructPixToPixConditioning give it). The
        unit names the checkpoint itself (these models are their own ControlNet); its weight and window do not
        apply."""
        from .controlnet import preprocess
        cn, control = job.req.controlnet_units[0], job.control_images[0]
        if cn.control_mode != "balanced":
            raise BadRequest(f"controlnet[0]: control_mode {cn.control_mode} is A1111's, for SD1/SDXL ControlNets; "
                             f"{job.entry.name} is a FLUX Canny/Depth dev model: use balanced")
        own = {job.entry.name.lower(), (job.entry.rel_path or "").lower(), Path(job.entry.path).name.lower()}
        if cn.model.strip().lower() not in own:
            raise BadRequest(f"controlnet[0]: {job.entry.name} is a FLUX Canny/Depth dev model, its own ControlNet: "
                             f"name it as the unit's model, not {cn.model}")
        image = preprocess(self._cropped(job, control), cn, settings=self.settings,
                           cache=self.cache).convert("RGB").resize(
            (width, height), Image.LANCZOS)
        self._detected(job, 0, cn, image)
        return self._vae_encode(pipe.vae, [image])

    @staticmethod
    def _detected(job: _Job, i: int, cn, image: Image.Image) -> None:
        """Keep unit ``i``'s control image as its detected map (the first one made, when a job runs several)."""
        if cn.preprocessor != "none":
            job.detected.setdefault(i, image)

    def _dit_control(self, pipe, job: _Job, ms, n: int, pack, size: tuple[int, int]) -> list[ControlSpec]:
        """FLUX, SD3 and Qwen-Image ControlNet units: each control image preprocessed and VAE-encoded (for FLUX and
        Qwen-Image packed as the transformer's tokens: the ``controlnet_cond`` of diffusers' FluxControlNetPipeline,
        StableDiffusion3ControlNetPipeline and QwenImageControlNetPipeline), with its union mode, weight and
        window; the control image at ``size``, the pass's own (the hires fix's second pass is larger)."""
        from .controlnet import INPAINT_PREPROCESSORS, preprocess, union_index
        specs = []
        for i, (cn, control) in enumerate(zip(job.req.controlnet_units, job.control_images, strict=True)):
            model = self._component("controlnet", cn.model)
            family = "qwen" if type(model).__name__.startswith("QwenImage") else (
                "flux" if hasattr(model.config, "axes_dims_rope") else (
                    "sd3" if hasattr(model.config, "joint_attention_dim") else "sd"))
            if family != job.arch:
                name = {"sd": "n SD", "qwen": " Qwen-Image"}.get(family, " " + family.upper())
                raise BadRequest(f"controlnet[{i}]: {cn.model} is a{name} ControlNet; {job.entry.name} is "
                                 f"{'Qwen-Image' if job.arch == 'qwen' else job.arch.upper()}")
            if cn.control_mode != "balanced":
                kind = "Qwen-Image" if family == "qwen" else family.upper()
                raise BadRequest(f"controlnet[{i}]: control_mode {cn.control_mode} is A1111's, for SD1/SDXL "
                                 f"ControlNets (UNet residuals); {cn.model} is a {kind} ControlNet: use balanced")
            if cn.preprocessor in INPAINT_PREPROCESSORS:
                raise BadRequest(f"controlnet[{i}]: {cn.preprocessor} marks the hole for SD1/SDXL inpaint "
                                 f"ControlNets; {cn.model} is not one (InstantX's Qwen-Image inpainting ControlNet "
                                 "reads the unit's mask with preprocessor none)")
            inpainting = family == "qwen" and bool(getattr(model.config, "extra_condition_channels", 0))
            mask = self._unit_mask(cn, job, i, inpainting, f"{cn.model} is a Qwen-Image inpainting ControlNet")
            if family == "qwen":
                Q.share_positions(model, pipe.transformer)
            num_mode = getattr(model.config, "num_mode", None)
            mode = cn.union_mode
            if num_mode and mode is None and family == "flux":  # by name, else by the preprocessor's kind
                mode = union_index("flux", cn.union_type, cn.preprocessor)
                if mode is None and cn.union_type:
                    raise BadRequest(f"controlnet[{i}]: union type {cn.union_type} is not one {cn.model} has")
            if num_mode and mode is None:
                raise BadRequest(f"controlnet[{i}]: {cn.model} is a union ControlNet: give union_type or union_mode "
                                 f"(0-{num_mode - 1})")
            if (mode is not None and (not num_mode or mode >= num_mode)) or (not num_mode and cn.union_type):
                raise BadRequest(f"controlnet[{i}]: union type {cn.union_type or mode} is not one {cn.model} has"
                                 + (f" (0-{num_mode - 1})" if num_mode else " (it is not a union ControlNet)"))
            image = preprocess(self._cropped(job, control), cn, settings=self.settings,
                           cache=self.cache).convert("RGB").resize(
                size, Image.LANCZOS)
            self._detected(job, i, cn, image)
            if inpainting:
                latent = self._masked_control_latent(pipe, image, mask, size)
            else:
                latent = self._vae_encode(pipe.vae, [image])
            cond = pack(latent.repeat(n, 1, 1, 1))
            specs.append(ControlSpec(model, cond, cn.weight, sigma_start=ms.percent_to_sigma(cn.guidance_start),
                                     sigma_end=ms.percent_to_sigma(cn.guidance_end),
                                     mode=None if mode is None else torch.full((n, 1), mode, dtype=torch.long)))
        return specs

    def _masked_control_latent(self, pipe, image: Image.Image, mask: Image.Image,
                               size: tuple[int, int]) -> torch.Tensor:
        """An inpainting ControlNet's control (:func:`qwen_image.inpaint_control`) of the unit's picture, its hole
        ``mask`` (white = repaint) binarised at the pass's ``size`` as diffusers does."""
        mask = mask.convert("L").resize(size, Image.LANCZOS)
        hole = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5)[None, None]
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return Q.inpaint_control(lambda x: self._vae_encode_tensor(pipe.vae, x), pixels, hole)

    def _unit_mask(self, cn, job: _Job, i: int, reads: bool, needs: str) -> Image.Image | None:
        """A ControlNet unit's hole to repaint (white): its own mask, else the inpainting request's, for a unit
        that reads one (``reads``); a mask given to a unit that reads none, or none for one that must, is a 400."""
        if not reads:
            if cn.mask is not None:
                raise BadRequest(f"controlnet[{i}]: {cn.model}: a unit's mask is read only by the inpaint "
                                 "preprocessors (inpaint_only, inpaint_global_harmonious) and inpainting ControlNets "
                                 "(InstantX's Qwen-Image one)")
            return None
        if cn.mask is None and job.mask is None:
            raise BadRequest(f"controlnet[{i}]: {needs}: give the unit a mask (controlnet.mask, white = repaint) or "
                             "make an inpainting request (mask)")
        mask = job.mask if cn.mask is None else load_image(cn.mask, settings=self.settings, mode="L",
                                                           what=f"controlnet[{i}].mask")
        return self._cropped(job, mask, Image.NEAREST)

    @staticmethod
    def _cropped(job: _Job, image: Image.Image, resample=Image.LANCZOS) -> Image.Image:
        """A ControlNet unit's image or mask in 'only masked' inpainting: brought to the working size and cropped
        to the repainted box, as the picture is (A1111's extension crops them alike); unchanged otherwise."""
        if job.crop is None:
            return image
        return image.resize((job.width, job.height), resample).crop(job.crop)

    def redux_embedder(self, entry: ModelEntry):
        """A FLUX Redux embedder (ReduxImageEncoder), loaded once per file version."""
        from .redux import load_redux
        return self.cache.get(("redux", str(entry.path), Path(entry.path).stat().st_mtime_ns),
                              lambda: load_redux(entry.path), device="cpu").value

    def siglip_encoder(self, entry: ModelEntry):
        """A SigLIP vision tower (Redux's reader), loaded once at the engine's dtype and device."""
        from .redux import load_siglip
        return self.cache.get(("siglip", str(entry.path), str(self.dtype)),
                              lambda: load_siglip(entry.path, dtype=self.dtype, device=self.device),
                              device=self.device).value

    def _redux_tokens(self, job: _Job, ms, n: int) -> list[tuple[torch.Tensor, float, float]]:
        """FLUX Redux: each reference's tokens (times its weight) with the sigma window they are added in; a unit of
        weight 0 adds nothing."""
        from ..core.errors import MissingModelFile
        from .redux import redux_tokens
        out = []
        for spec, image in zip(job.req.ip_adapter_units, job.ip_images):
            if spec.weight == 0:
                continue
            entry = self.registry.get(spec.model, "ipadapter")
            embedder = self.redux_embedder(entry)
            width = int(embedder.redux_up.weight.shape[1])
            own = Path(entry.path) / "image_encoder"
            if spec.image_encoder:
                vision = self.registry.get(spec.image_encoder, "clip_vision")
            elif own.is_dir():  # a diffusers Redux folder carries the SigLIP it was trained with
                vision = ModelEntry(name=f"{entry.name}/image_encoder", kind="clip_vision", arch="flux", path=own,
                                    format="diffusers", rel_path=f"{entry.rel_path}/image_encoder",
                                    folder_kind="clip_vision")
            else:
                vision = next((e for e in self.registry.list("clip_vision")
                               if any("SigLIP" in x for x in e.notes) and f"width {width}" in " ".join(e.notes)), None)
                if vision is None:
                    raise MissingModelFile(f"Redux {spec.model} reads SigLIP image features of width {width}: put the "
                                           f"SigLIP vision encoder it was trained with (sigclip_vision_patch14_384) in "
                                           f"{self.settings.models_dir / 'clip_vision'}")
            encoder = self.siglip_encoder(vision)
            if encoder.hidden_size != width:
                raise BadRequest(f"SigLIP {vision.name} is {encoder.hidden_size} wide; Redux {spec.model} reads {width}")
            tokens = redux_tokens(encoder, embedder, image) * spec.weight
            out.append((tokens.repeat(n, 1, 1), ms.percent_to_sigma(spec.guidance_start),
                        ms.percent_to_sigma(spec.guidance_end)))
        return out

    def _ip_adapter_state(self, name: str) -> tuple[str, dict]:
        """(identity, state dict) of an IP-Adapter file, read once per file version."""
        from .ip_adapter import load_adapter_state
        entry = self.registry.get(name, "ipadapter")
        key = f"{entry.path}@{Path(entry.path).stat().st_mtime_ns}"
        if key not in self._ip_states:
            self._ip_states[key] = load_adapter_state(entry.path)
        return key, self._ip_states[key]

    def _image_encoder(self, spec, state: dict):
        """The CLIP vision encoder a reference goes through: the one named, or the first in models/clip_vision
        whose width the adapter reads."""
        from ..core.errors import MissingModelFile
        from .ip_adapter import adapter_widths, encoder_widths, load_image_encoder
        _, width, hidden = adapter_widths(state)
        if spec.image_encoder:
            entry = self.registry.get(spec.image_encoder, "clip_vision")
        else:
            def fits(e) -> bool:
                w = encoder_widths(e.path)
                return w is not None and w[1 if hidden else 0] == width
            entry = next((e for e in self.registry.list("clip_vision") if fits(e)), None)
            if entry is None:
                raise MissingModelFile(
                    f"IP-Adapter {spec.model} reads image {'hidden states' if hidden else 'embeddings'} of width "
                    f"{width}: put the CLIP vision encoder it was trained with in "
                    f"{self.settings.models_dir / 'clip_vision'} (SD1.5 and most SDXL adapters: ViT-H/14; the "
                    f"plain SDXL adapter: ViT-bigG/14)")
        encoder = self.cache.get(("clip_vision", str(entry.path), str(self.dtype)),
                                 lambda: load_image_encoder(entry.path, dtype=self.dtype, device=self.device),
                                 device=self.device).value
        if not encoder.fits(width, hidden):
            raise BadRequest(f"CLIP vision {entry.name} gives width {encoder.hidden_size if hidden else encoder.projection_dim}"
                             f"; IP-Adapter {spec.model} reads {width}")
        return encoder

    def _face_embedder(self, spec):
        """The InsightFace recognition network a FaceID reference goes through: the one named, or the ArcFace
        model found in models/insightface."""
        from .face_id import load_face_embedder, missing_model_error, pick_recognition_model
        if spec.face_model:
            entry = self.registry.get(spec.face_model, "insightface")
        else:
            entries = self.registry.list("insightface")
            path = pick_recognition_model([e.path for e in entries])
            if path is None:
                raise missing_model_error(self.settings.model_dirs("insightface"))
            entry = next(e for e in entries if e.path == path)
        return self.cache.get(("insightface", str(entry.path), Path(entry.path).stat().st_mtime_ns),
                              lambda: load_face_embedder(entry.path), device="cpu").value

    def _ip_conditioning(self, pipe, job: _Job, ms, n: int):
        from .face_id import face_crop, identity_embedding, largest_face
        from .ip_adapter import adapter_kind, faceid_id_width, image_embeds, pack_faceid_plus, reads_hidden_states
        from .sampling.denoisers import IPWindow
        cond, uncond, windows = [], [], []
        for i, (spec, image) in enumerate(zip(job.req.ip_adapter_units, job.ip_images)):
            _, state = self._ip_adapter_state(spec.model)
            kind = adapter_kind(state)
            if kind in ("FaceID", "FaceID Plus"):
                embedder = self._face_embedder(spec)
                if embedder.width != faceid_id_width(state):
                    raise BadRequest(f"face model {embedder.name} gives {embedder.width}-wide embeddings; IP-Adapter "
                                     f"{spec.model} reads {faceid_id_width(state)}")
                points = largest_face(image, what=f"ip_adapter[{i}].image")
                c = torch.from_numpy(identity_embedding(embedder, image, points=points)).float()[None, None]
                u = torch.zeros_like(c)  # FaceID's unconditional side: a zero embedding, as diffusers' example
                if kind == "FaceID Plus":  # and the aligned face through CLIP (a zero image on the other side)
                    hc, hu = image_embeds(self._image_encoder(spec, state), face_crop(image, points), plus=True)
                    c, u = pack_faceid_plus(c, hc), pack_faceid_plus(u, hu)
            else:
                c, u = image_embeds(self._image_encoder(spec, state), image, plus=reads_hidden_states(pipe.unet, i))
            reps = (n,) + (1,) * (c.dim() - 1)
            cond.append(c.repeat(*reps))
            uncond.append(u.repeat(*reps))
            windows.append(IPWindow(spec.weight, ms.percent_to_sigma(spec.guidance_start),
                                    ms.percent_to_sigma(spec.guidance_end)))
        return cond, uncond, windows

    def _conditioning(self, pipe, rows, encoded: list[dict], width: int, height: int):
        """Each request's text conditioning repeated for its images; SDXL's pooled embeddings and size ids."""
        sizes = [n for _, _, n in rows]
        stacked = _stack_rows(encoded, sizes)
        added_c = added_u = None
        if "pooled_prompt_embeds" in stacked:
            total = sum(sizes)
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(total, 1)
            ids_u = ids
            unet = getattr(pipe, "unet", None)
            cfg = unet.config if unet is not None else {}
            per = cfg.get("addition_time_embed_dim") or 0
            pooled = stacked["pooled_prompt_embeds"].shape[-1]
            if per and (cfg.get("projection_class_embeddings_input_dim", 0) - pooled) // per == 5:
                # the SDXL refiner's size ids end with an aesthetic score (diffusers' and A1111's 6 and 2.5)
                ids = torch.tensor([[height, width, 0, 0, 6.0]], dtype=torch.float32).repeat(total, 1)
                ids_u = torch.tensor([[height, width, 0, 0, 2.5]], dtype=torch.float32).repeat(total, 1)
            added_c = {"text_embeds": stacked["pooled_prompt_embeds"], "time_ids": ids}
            added_u = {"text_embeds": stacked["negative_pooled_prompt_embeds"], "time_ids": ids_u}
        return (Conditioning(stacked["prompt_embeds"], added_c),
                Conditioning(stacked["negative_prompt_embeds"], added_u))

    def _control_specs(self, job: _Job, ms, n: int, size: tuple[int, int], unet=None) -> list[ControlSpec]:
        """One ControlSpec per unit: its model, its preprocessed image at the pass's ``size``, its weight and window.
        In the hires fix's second pass (a size above the job's) every unit is soft-injected, as A1111's extension
        does there ("use the soft weights with high-res fix", whatever the control mode)."""
        hires = size != (job.width, job.height)
        from .controlnet import INPAINT_PREPROCESSORS, inpaint_hint, preprocess, union_index
        specs = []
        for i, (cn, control) in enumerate(zip(job.req.controlnet_units, job.control_images, strict=True)):
            model = self._component("controlnet", cn.model)
            if hasattr(model.config, "joint_attention_dim"):
                raise BadRequest(f"ControlNet {cn.model} is a {'FLUX' if hasattr(model.config, 'axes_dims_rope') else 'SD3'}"
                                 f" ControlNet; {job.entry.name} is {job.arch}")
            width = getattr(model.config, "cross_attention_dim", None)
            if unet is not None and width != unet.config.cross_attention_dim:
                kind = {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(width, "other")
                raise BadRequest(f"controlnet[{i}]: {cn.model} is a ControlNet for {kind} models (it reads {width}-"
                                 f"wide text states); {job.entry.name} is {job.arch.upper()} (its UNet reads "
                                 f"{unet.config.cross_attention_dim}-wide ones)")
            inpaint = cn.preprocessor in INPAINT_PREPROCESSORS
            mask = self._unit_mask(cn, job, i, inpaint, f"{cn.preprocessor} marks the hole to repaint")
            kinds = getattr(model.config, "num_control_type", None)  # SDXL Union / ProMax
            mode = cn.union_mode
            if kinds and mode is None:  # by name, else by what the preprocessor draws (as the A1111 extension does)
                mode = union_index("sdxl", cn.union_type, cn.preprocessor)
                if mode is None and cn.union_type:
                    raise BadRequest(f"ControlNet {cn.model}: union type {cn.union_type} is not one it has")
            if kinds and mode is None:
                raise BadRequest(f"ControlNet {cn.model} is a union ControlNet: give union_type or union_mode (0-"
                                 f"{kinds - 1}; ProMax: 0 openpose, 1 depth, 2 hed/scribble, 3 canny/lineart, 4 "
                                 "normal, 5 segment, 6 tile, 7 repaint)")
            if (mode is not None and (not kinds or mode >= kinds)) or (not kinds and cn.union_type):
                raise BadRequest(f"ControlNet {cn.model}: union type {cn.union_type or mode} is not one it has"
                                 + (f" (0-{kinds - 1})" if kinds else " (it is not a union ControlNet)"))
            image = preprocess(self._cropped(job, control), cn, settings=self.settings,
                           cache=self.cache).convert("RGB").resize(
                size, Image.LANCZOS)
            self._detected(job, i, cn, image)
            tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            if inpaint:
                tensor = inpaint_hint(image, mask, size)
            specs.append(ControlSpec(model, tensor.repeat(n, 1, 1, 1), cn.weight,
                                     sigma_start=ms.percent_to_sigma(cn.guidance_start),
                                     sigma_end=ms.percent_to_sigma(cn.guidance_end),
                                     mode=None if mode is None else torch.tensor([[mode]]),
                                     soft=hires or cn.control_mode != "balanced", cond_only=cn.control_mode == "controlnet"))
        return specs

    def _vae_encode(self, vae, images: list[Image.Image]) -> torch.Tensor:
        mode = "RGBA" if _vae_channels(vae) == 4 else "RGB"  # Qwen-Image 2.1's VAE reads alpha too
        arr = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 127.5 - 1.0 for im in images])
        return self._vae_encode_tensor(vae, torch.from_numpy(arr).permute(0, 3, 1, 2))

    def _vae_encode_tensor(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The latent of images in [-1, 1]: the posterior's mode (ComfyUI's; no random draw), scaled."""
        with torch.inference_mode(), _vae_precision(vae):
            if _is_frame_vae(vae):  # Qwen-Image's VAE: a one-frame video in, per-channel normalised latents out
                z = vae.encode(pixels[:, :, None].to(vae.device, vae.dtype)).latent_dist.mode()[:, :, 0]
                mean, std = _channel_stats(vae, z.ndim)
                return (z.float().cpu() - mean) / std
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            return (dist.mode().float().cpu() - shift) * vae.config.scaling_factor

    def _vae_decode(self, vae, latents: torch.Tensor) -> list[Image.Image]:
        pixels = self.vae_decode_tensor(vae, latents)
        arr = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a[..., :3] if a.shape[-1] == 4 and a[..., 3].min() >= OPAQUE else a) for a in arr]



CONTROL_MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                      "controlnet": "ControlNet is more important"}
"""A1111's names of the control modes (its ControlNet extension's UI and infotext)"""


def is_kontext(entry: ModelEntry) -> bool:
    """FLUX.1 Kontext (instruction editing): its weights are shaped as FLUX dev's, so the probe knows it by its
    diffusers pipeline class or its file name."""
    return entry.arch == "flux" and any("Kontext" in n for n in entry.notes)


def is_flux_fill(pipe) -> bool:
    """FLUX.1 Fill: a FLUX transformer that reads the masked picture (its latent: as many features as its own) and
    the mask (256 features: 8x8 pixels x 4) beside the latent."""
    t = getattr(pipe, "transformer", None)
    return t is not None and hasattr(t.config, "guidance_embeds") and bool(t.config.out_channels) and \
        t.config.in_channels == 2 * t.config.out_channels + 256


def is_flux_control(pipe) -> bool:
    """FLUX.1 Canny / Depth dev: a FLUX transformer that reads a control picture's latent beside its own."""
    t = getattr(pipe, "transformer", None)
    return t is not None and hasattr(t.config, "guidance_embeds") and bool(t.config.out_channels) and \
        t.config.in_channels == 2 * t.config.out_channels


def region_mask(region, width: int, height: int, *, settings: Settings, what: str = "region mask") -> torch.Tensor:
    """A region's weight map at the image size, [1, 1, H, W] in [0, 1]: its box or mask, edges feathered."""
    if region.box is not None:
        x0, y0, x1, y1 = region.box
        m = Image.new("L", (width, height), 0)
        m.paste(255, (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)))
    else:
        m = load_image(region.mask, settings=settings, mode="L", what=what).resize((width, height), Image.BILINEAR)
    if region.feather:
        m = m.filter(ImageFilter.GaussianBlur(region.feather / 2))
    arr = np.asarray(m, dtype=np.float32) / 255.0
    if arr.max() <= 0:
        raise BadRequest(f"{what}: the region covers nothing of the {width}x{height} image")
    return torch.from_numpy(arr)[None, None]


class RegionMix:
    """Guided estimates averaged by weight maps: ``sum(m_i d_i) / sum(m_i)`` with the base's map 1 everywhere."""

    def __init__(self, parts: list):
        self.parts = parts
        self.last_uncond = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        total = weight = None
        for m, denoise in self.parts:
            d = shared_uncond_call(denoise, x, sigma, self.last_uncond if total is not None else None)
            if m is None:
                total, weight = d.clone(), torch.ones_like(d[:, :1])
                self.last_uncond = getattr(denoise, "last_uncond", None)
                continue
            m = m.to(d)
            total = total + m * d
            weight = weight + m
        return total / weight


@dataclass(frozen=True)
class _ArchOnly:
    """What _model_sampling reads of a job: its architecture."""
    arch: str


def keep_unmasked(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste the original back wherever the (blurred) mask is 0: those pixels are the input's, exactly."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.LANCZOS)
    o = np.asarray(original.convert("RGB"), dtype=np.float32)
    g = np.asarray(generated.convert("RGB"), dtype=np.float32)
    a = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    blend = np.clip(np.rint(o * (1 - a) + g * a), 0, 255)
    out = np.where(a == 0, o, blend).astype(np.uint8)
    return Image.fromarray(out)


def masked_crop(mask: Image.Image, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box 'only masked' inpainting repaints: the mask's bounding box grown by `padding`, then widened or
    heightened to the working size's aspect ratio (so the crop is not stretched), kept inside the picture. None
    for an empty mask."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    W, H = mask.size
    x0, y0, x1, y1 = box[0] - padding, box[1] - padding, box[2] + padding, box[3] + padding
    aspect = size[0] / size[1]
    w, h = x1 - x0, y1 - y0
    if w / h < aspect:
        w = h * aspect
    else:
        h = w / aspect
    w, h = min(W, round(w)), min(H, round(h))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(0, round(cx - w / 2)), W - w))
    top = int(min(max(0, round(cy - h / 2)), H - h))
    return left, top, left + w, top + h


def paste_crop(full: Image.Image, repainted: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    out = full.convert("RGB").copy()
    out.paste(repainted.convert("RGB").resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
    return out


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's 'fill' start: the masked area painted from its surroundings' colours (OpenCV's Telea inpainting),
    so the sampler starts from the neighbourhood's colours rather than the object being replaced."""
    import cv2
    arr = np.asarray(image.convert("RGB"))
    hole = (np.asarray(mask.convert("L")) > 127).astype(np.uint8) * 255
    radius = max(3, min(arr.shape[:2]) // 16)
    return Image.fromarray(cv2.inpaint(arr, hole, radius, cv2.INPAINT_TELEA))


def outpaint_canvas(image: Image.Image, pads: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas by (left, top, right, bottom); the new border is filled by stretching the edge
    pixels (a colour prior for the sampler) and is the only masked region."""
    import cv2
    left, top, right, bottom = pads
    arr = np.asarray(image.convert("RGB"))
    grown = cv2.copyMakeBorder(arr, top, bottom, left, right, cv2.BORDER_REPLICATE)
    mask = np.full(grown.shape[:2], 255, np.uint8)
    mask[top:top + arr.shape[0], left:left + arr.shape[1]] = 0
    return Image.fromarray(grown), Image.fromarray(mask)


def _num(x: float) -> str:
    return f"{x:g}"


def _stack_rows(encoded: list[dict], sizes: list[int]) -> dict:
    """Conditioning for one call over several requests: each request's encodings repeated for its images and
    concatenated (tensors), or its text repeated (SD3/FLUX encode their own); other values (clip skip) are shared."""
    out: dict[str, Any] = {}
    for key, first in encoded[0].items():
        values = [e[key] for e in encoded]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([v.repeat(n, *([1] * (v.dim() - 1))) for v, n in zip(values, sizes)])
        elif isinstance(first, str):
            out[key] = [v for v, n in zip(values, sizes) for _ in range(n)]
        else:
            out[key] = first
    return out


def _author_grid(entry: ModelEntry) -> list[float] | None:
    """A Qwen-Image 2.1 folder's ``sample_sigmas`` (its model_index.json: the author's sampling grid), or its
    companion folder's for a transformer file; None when it has none."""
    if entry.arch != "qwen21":
        return None
    folder = Path(entry.path) if Path(entry.path).is_dir() else (Path(entry.companion) if entry.companion else None)
    try:
        grid = json.loads((folder / "model_index.json").read_text()).get("sample_sigmas") if folder else None
    except (OSError, ValueError):
        return None
    return [float(g) for g in grid] if isinstance(grid, list) and grid else None


OPAQUE = 250
"""an RGBA VAE's picture whose alpha is at least this everywhere is an opaque picture, returned as RGB"""


def _vae_channels(vae) -> int:
    """The picture channels a VAE reads: 3, or 4 for Qwen-Image 2.1's RGBA VAE."""
    return int(getattr(vae.config, "in_channels", 3) or 3)


def _is_frame_vae(vae) -> bool:
    """Qwen-Image's (Wan-family) VAE: 3-D convolutions over frames and a per-channel latent mean and std instead of
    one scaling factor."""
    return getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "z_dim", None) is not None


def _channel_stats(vae, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (ndim - 2)
    return (torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape),
            torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape))


@contextlib.contextmanager
def _vae_precision(vae):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): run it in fp32 for the call, then back, as
    diffusers' pipelines do. The caller holds the model's lock; a VAE override shared by two models' concurrent
    jobs would see the fp32 weights for that call, which changes nothing but memory."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            vae.to(dtype=torch.float16)
    else:
        yield


def _resize_from(req: GenerateRequest, shape: tuple[int, ...], width: int, height: int) -> tuple[int, int] | None:
    """The latent (height, width) of A1111's 'resize seed from' size for this image's latent `shape`."""
    if req.seed_resize is None:
        return None
    w, h = req.seed_resize
    return max(1, h * shape[1] // height), max(1, w * shape[2] // width)


def _keep_latents(rows, latents: torch.Tensor) -> None:
    """File each request's slice of a run's final latents with the request (GenerationResult.latents)."""
    lo = 0
    for job, _, n in rows:
        job.latents.append(latents[lo:lo + n].detach().float().cpu())
        lo += n


def _cat_conditioning(parts: list[Conditioning], keep: tuple[str, ...] = ()) -> Conditioning:
    """Concatenate per-request conditioning along the batch; `keep` names added entries shared by all (FLUX's
    text position ids)."""
    added = {k: (parts[0].added[k] if k in keep else torch.cat([p.added[k] for p in parts]))
             for k in parts[0].added}
    return Conditioning(torch.cat([p.embeds for p in parts]), added)


def _shape_key(encoded: dict) -> tuple:
    """Requests whose conditioning has equal shapes (the same number of 75-token chunks) can share a call."""
    return tuple((k, tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else type(v).__name__)
                 for k, v in sorted(encoded.items()))
