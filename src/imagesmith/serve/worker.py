"""A worker: claims jobs from the store, runs them on one Engine, keeps the lease alive, commits results once.

Outputs of an attempt go to ``<outputs>/<user>/<job id>/attempt-<n>/``; the job's result names that folder's
files only when this worker's ``complete`` wins (a worker that lost its lease deletes its attempt folder), so a
job that ran twice after a crash still has exactly one set of outputs.

Batching: a worker that claims a txt2img ``generate`` job also claims up to ``batch - 1`` queued jobs with the same
:func:`batch_key` (same model, size, LoRAs, VAE, sampler, steps, CFG, clip skip, hires fix; prompts and seeds may
differ) and runs them as one pipeline call (:meth:`Engine.generate_many`). Each job keeps its own lease, heartbeat,
cancel, attempt folder, metadata and result; its result says ``batch: {jobs: K, ...}``. ``batch`` comes from
``IMAGESMITH_WORKER_BATCH`` (default 4; 1 turns batching off)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import Cancelled, ImagesmithError
from ..core.progress import CancelToken, ProgressEvent
from ..core.requests import GenerateRequest
from ..core.settings import Settings
from .jobs import JOB_TYPES, JOBS, spec
from .store import JobStore

log = logging.getLogger(__name__)
SHUTDOWN = "worker shutting down"


def batch_key(job_type: str, request: dict) -> str | None:
    """The key under which queued jobs may share one pipeline call (None: this job runs on its own). Only
    txt2img ``generate`` requests with ``batch_count`` 1 and no ControlNet or detailer; the key covers everything
    that must be equal for one call: model, VAE, LoRAs and their weights (from the list and ``<lora:>`` tags),
    clip skip, steps, CFG, sampler, schedule, size (and ``--ar``), hires fix. Prompts, negative prompts, seeds,
    variation seeds and batch sizes may differ. The engine checks compatibility again after resolving the
    models (:meth:`Engine.batch_key`) and splits what cannot share a call, so a key that is too loose costs
    another call, never a wrong picture."""
    if job_type != "generate":
        return None
    from ..core.errors import ImagesmithError
    from ..engine.prompts import extract_lora_tags, extract_prompt_params
    try:
        req = GenerateRequest.model_validate(request)
        text, params = extract_prompt_params(req.prompt)
        _, tag_loras = extract_lora_tags(text)
    except (ImagesmithError, ValueError):
        return None  # it fails when it runs, on its own
    if req.mode != "txt2img" or req.controlnet or req.detailer or req.ip_adapter or req.batch_count != 1:
        return None
    from ..core.sampling_names import SAMPLERS_BY_NAME, resolve_sampling
    try:
        sampler, schedule = resolve_sampling(req.sampler_name, req.scheduler)
    except ImagesmithError:
        return None
    if req.noise == "comfy" and SAMPLERS_BY_NAME[sampler].noise is not None:
        return None  # ComfyUI's sampler noise is one stream over its batch (Engine.batch_key)
    from ..engine.wildcards import has_dynamic
    if req.batch_size > 1 and (has_dynamic(req.prompt) or has_dynamic(req.negative_prompt)):
        return None  # each image draws its own prompt (Engine.generate batches those itself)
    loras: dict[str, float] = {}
    for lora in [*req.loras, *tag_loras]:  # the engine's rule: the last mention of a name wins
        loras.pop(lora.name, None)
        loras[lora.name] = lora.weight
    fields = {"v": 1, "model": req.model, "vae": req.vae, "loras": list(loras.items()), "clip_skip": req.clip_skip,
              "steps": req.steps, "cfg_scale": req.cfg_scale, "cfg_rescale": req.cfg_rescale, "sampler_name": sampler,
              "scheduler": schedule, "noise": req.noise, "ensd": req.eta_noise_seed_delta,
              "sgm_noise_multiplier": req.sgm_noise_multiplier, "width": req.width, "height": req.height, "aspect": params.aspect,
              "hires": req.hires.model_dump(mode="json") if req.hires else None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def worker_batch() -> int:
    """``IMAGESMITH_WORKER_BATCH``: most jobs (and images) one batched pipeline call takes; default 4, 1: off."""
    from ..core.errors import BadRequest
    raw = os.environ.get("IMAGESMITH_WORKER_BATCH", "4").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise BadRequest(f"IMAGESMITH_WORKER_BATCH must be a whole number from 1 to 64, not {raw!r}")
    return int(raw)


class Worker:
    def __init__(self, store: JobStore, settings: Settings | None = None, *, engine=None, worker_id: str | None = None,
                 lease_s: float = 30.0, heartbeat_s: float | None = None, safety=None, batch: int | None = None,
                 cache=None):
        """``safety``: a :class:`~imagesmith.vision.safety.SafetyGate` for generated images; by default one with
        the default policy unless ``IMAGESMITH_SAFETY=0``. ``batch``: most compatible txt2img jobs (and images)
        run as one pipeline call; default ``IMAGESMITH_WORKER_BATCH`` or 4; 1 turns batching off. ``cache``: the
        process's :class:`~imagesmith.models.cache.ModelCache`, shared by the worker threads of one process (``serve
        --workers N``), so a model is loaded once per process, not once per thread."""
        self.settings = settings or Settings.from_env()
        if safety is None and os.environ.get("IMAGESMITH_SAFETY", "1") not in ("0", "false", "no"):
            from ..vision.safety import SafetyGate
            # its models live in the engine's cache, beside the checkpoints and the other vision models
            safety = SafetyGate.from_settings(self.settings, cache=lambda: self.engine.cache)
        self.safety = safety or None
        self.store = store
        self._engine = engine
        self.id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        # an unload asked before this worker started is history: only later requests are followed
        self._checkpoint_epoch = float(store.checkpoint_state()["changed_at"] or 0.0)
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s or max(0.2, lease_s / 3)
        self.stopping = threading.Event()
        self._running: set[CancelToken] = set()  # the tokens of the job(s) running now (shutdown sets them)
        self._running_lock = threading.Lock()
        self.webhooks: list[threading.Thread] = []
        self.webhook_backoff = 1.0
        self.preview_every_s = 0.5  # live previews (approximate RGB from the latents) at most this often
        self._cache = cache
        self._graph_executor = None
        self.batch = worker_batch() if batch is None else int(batch)
        if self.batch < 1:
            raise ValueError("batch must be at least 1")

    def comfy_dirs(self, user: str) -> dict[str, Path]:
        return comfy_dirs(self.settings, user)

    @property
    def graph_executor(self):
        """The ComfyUI graph executor of this worker: its output cache lasts between prompts."""
        if self._graph_executor is None:
            from ..engine.graph.nodes import executor_for
            self._graph_executor = executor_for(self.engine)
        return self._graph_executor

    @property
    def engine(self):
        if self._engine is None:
            from ..engine.generate import Engine
            self._engine = Engine(self.settings, cache=self._cache)
        return self._engine

    def loaded_models(self) -> tuple[str, ...]:
        """Names of the checkpoints this worker's engine has in memory (for model affinity)."""
        if self._engine is None:
            return ()
        paths = {key[1] for key in self._engine.cache.keys() if key and key[0] == "pipeline"}
        names = [e.name for e in self._engine.registry.list("checkpoint") if str(e.path) in paths]
        return tuple(dict.fromkeys(names))

    # ---------------------------------------------------------------- loop
    def warm_up(self) -> list[dict]:
        """Compile and warm the default model at the server's resolution buckets (IMAGESMITH_WARMUP_SIZES)
        before the first job, so no user waits for torch.compile. A failure is logged, never fatal."""
        if not self.settings.warmup_sizes:
            return []
        try:
            return self.engine.warm_up(None, self.settings.warmup_sizes)
        except Exception as exc:  # a broken default model must not stop the worker from serving others
            log.warning("warm-up failed: %s", str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            return []

    def shutdown(self) -> None:
        """A graceful stop (SIGTERM): claim nothing more; the running job(s) stop at their next step and go
        back to the queue at once (``JobStore.release``), not counted as an attempt; ``run_forever`` returns."""
        self.stopping.set()
        with self._running_lock:
            for token in self._running:
                token.cancel(SHUTDOWN)

    def _track(self, token: CancelToken) -> None:
        with self._running_lock:
            self._running.add(token)
        if self.stopping.is_set():  # shut down between the claim and now
            token.cancel(SHUTDOWN)

    def _untrack(self, token: CancelToken) -> None:
        with self._running_lock:
            self._running.discard(token)

    def run_forever(self, poll_s: float = 0.5) -> None:
        if not self.stopping.is_set():
            self.warm_up()
        while not self.stopping.is_set():
            if not self.run_once():
                self.stopping.wait(poll_s)

    def follow_checkpoint_state(self) -> str | None:
        """Act on an admin's unload-checkpoint / reload-checkpoint (the store's checkpoint state) once: unloading
        drops every model this worker holds (RAM and VRAM freed; the next job loads what it needs again, as in
        A1111), reloading warms the default model up again. Returns what was done, or None."""
        state = self.store.checkpoint_state()
        if state["changed_at"] is None or state["changed_at"] <= self._checkpoint_epoch:
            return None
        self._checkpoint_epoch = state["changed_at"]
        if self._engine is None:
            return None
        if state["state"] == "unloaded":
            self._engine.cache.clear()
            log.info("worker %s: checkpoints unloaded (by %s)", self.id, state["by"])
            return "unloaded"
        self.warm_up()
        return "loaded"

    def run_once(self) -> bool:
        """Claim and run one job (with the compatible jobs that can share its pipeline call); False when the
        queue had none."""
        self.follow_checkpoint_state()
        job = self.store.claim(self.id, lease_s=self.lease_s, loaded_models=self.loaded_models(), types=JOB_TYPES)
        if job is None:
            return False
        batch = [job]
        if self.batch > 1 and job.get("batch_key"):
            from .store import job_images
            batch += self.store.claim_compatible(self.id, job, max_jobs=self.batch - 1,
                                                 max_images=self.batch - job_images(job["request"]),
                                                 lease_s=self.lease_s)
        if len(batch) == 1:
            self._run(job)
        else:
            self._run_batch(batch)
        return True

    def _notify(self, job_id: str) -> None:
        """The webhook of a finished job (if it has one)."""
        job = self.store.get(job_id)
        url = self.store.callback_of(job_id)
        if url and job["status"] in ("succeeded", "failed", "canceled"):
            from .webhooks import deliver_async, webhook_secret
            files = (job.get("result") or {}).get("files", [])
            payload = {"job_id": job["id"], "status": job["status"], "error": job["error"], "type": job["type"],
                       "files": [f"/v1/jobs/{job['id']}/files/{k}" for k in range(len(files))],
                       "finished_at": job["finished_at"]}
            self.webhooks.append(deliver_async(url, payload, webhook_secret(self.settings.home),
                                               backoff=self.webhook_backoff))

    def _run(self, job: dict) -> None:
        try:
            self._run_job(job)
        finally:
            try:
                self._notify(job["id"])
            except Exception:  # noqa: BLE001 - a webhook must never take the worker down
                log.exception("webhook of job %s", job["id"])

    def _run_job(self, job: dict) -> None:
        cancel = CancelToken()
        self._track(cancel)
        try:
            self._run_tracked(job, cancel)
        finally:
            self._untrack(cancel)

    def _run_tracked(self, job: dict, cancel: CancelToken) -> None:
        state = {"progress": 0.0, "note": "starting", "lost": False}
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                row = self.store.heartbeat(job["id"], self.id, lease_s=self.lease_s, progress=state["progress"],
                                           note=state["note"])
                if row is None:  # another worker owns it now
                    state["lost"] = True
                    cancel.cancel("lease lost")
                    return
                if row["cancel_requested"]:
                    cancel.cancel("canceled")
        thread = threading.Thread(target=beat, name=f"heartbeat-{job['id'][:8]}", daemon=True)
        thread.start()
        folder = job_folder(self.settings, job)
        preview = self._previewer(job, folder)
        try:
            def on_progress(event: ProgressEvent) -> None:
                state["progress"] = round(event.fraction, 4)
                state["note"] = event.phase
                if preview is not None and event.latents is not None:
                    preview(event.latents)
            result = self.execute(job, folder, on_progress, cancel)
            (folder / PREVIEW_NAME).unlink(missing_ok=True)  # the result replaces the preview
            done.set()
            thread.join()
            if not self._complete(job, result):
                shutil.rmtree(folder, ignore_errors=True)  # someone else's result stands
        except Cancelled:
            done.set()
            thread.join()
            shutil.rmtree(folder, ignore_errors=True)
            if state["lost"]:
                pass
            elif cancel.reason == SHUTDOWN:
                self.store.release(job["id"], self.id)
            else:
                self.store.canceled(job["id"], self.id)
        except ImagesmithError as exc:
            done.set()
            thread.join()
            shutil.rmtree(folder, ignore_errors=True)
            self.store.fail(job["id"], self.id, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not kill the worker
            log.exception("job %s failed", job["id"])
            done.set()
            thread.join()
            shutil.rmtree(folder, ignore_errors=True)
            self.store.fail(job["id"], self.id, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    def _run_batch(self, jobs: list[dict]) -> None:
        """Compatible generate jobs as one pipeline call. Per job: its lease is renewed and its cancel seen by the
        heartbeat; a job canceled (or whose lease is lost) while the call runs is dropped from the batch at
        once (canceled now, its images discarded), and the call stops at its next step only when every job has
        been dropped. Each remaining job's result is committed once, from its own attempt folder. If the call
        fails, each job still running gets a run on its own, so one job's error is not the others'."""
        cancel = CancelToken()  # the whole call: set when no job is left
        state = {"progress": 0.0, "note": "starting"}
        dropped: dict[str, str] = {}  # job id -> "canceled" | "lost" | "finishing" (the heartbeat leaves it)
        lock = threading.Lock()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                for job in jobs:
                    with lock:
                        if job["id"] in dropped:
                            continue
                    row = self.store.heartbeat(job["id"], self.id, lease_s=self.lease_s, progress=state["progress"],
                                               note=state["note"])
                    if row is None or row["cancel_requested"]:
                        with lock:  # unless the main thread is finishing it already
                            if job["id"] not in dropped:
                                dropped[job["id"]] = "lost" if row is None else "canceled"
                                if row is not None:
                                    self.store.canceled(job["id"], self.id)  # canceled now; the others go on
                with lock:
                    if len(dropped) == len(jobs):
                        cancel.cancel("canceled")
                        return
        thread = threading.Thread(target=beat, name=f"heartbeat-batch-{jobs[0]['id'][:8]}", daemon=True)
        thread.start()
        folders = [job_folder(self.settings, job) for job in jobs]
        previews = [self._previewer(job, folder) for job, folder in zip(jobs, folders)]
        reqs = [GenerateRequest.model_validate(job["request"]) for job in jobs]
        offsets = [sum(r.batch_size for r in reqs[:i]) for i in range(len(reqs))]

        def on_progress(event: ProgressEvent) -> None:
            state["progress"] = round(event.fraction, 4)
            state["note"] = event.phase
            if event.latents is None or getattr(event.latents, "ndim", 0) != 4:
                return
            for job, preview, lo in zip(jobs, previews, offsets):
                if preview is not None and job["id"] not in dropped:
                    preview(event.latents[lo:lo + 1])
        failed: Exception | None = None
        results = None
        self._track(cancel)
        try:
            results = self.engine.generate_many(reqs, progress=on_progress, cancel=cancel)
        except Cancelled:
            pass  # every job was dropped (canceled or lost), or the worker is shutting down: nothing to commit
        except Exception as exc:  # noqa: BLE001 - handled per job below
            log.warning("a batch of %d jobs failed (%s: %s); running them one by one", len(jobs),
                        type(exc).__name__, exc)
            failed = exc
        finally:
            self._untrack(cancel)
        # the heartbeat goes on for the jobs not finished yet (a fallback runs them one after another)
        for k, (job, folder) in enumerate(zip(jobs, folders)):
            with lock:
                reason = dropped.setdefault(job["id"], "finishing")
            try:
                if reason != "finishing" or results is None:
                    shutil.rmtree(folder, ignore_errors=True)
                    if reason == "finishing" and failed is not None:
                        self._run(job)  # on its own: its own error, or its images (and its own webhook)
                        continue
                    if reason == "finishing":  # the call stopped with this job still in it: a shutdown
                        if cancel.reason == SHUTDOWN:
                            self.store.release(job["id"], self.id)
                        else:
                            self.store.canceled(job["id"], self.id)
                else:
                    (folder / PREVIEW_NAME).unlink(missing_ok=True)  # the result replaces the preview
                    out = self._save_generation(results[k], folder)
                    out["batch"] = {"jobs": len(jobs), "images": sum(r.batch_size for r in reqs), "position": k}
                    if not self._complete(job, out):
                        shutil.rmtree(folder, ignore_errors=True)  # canceled meanwhile, or another's result stands
            except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not kill the worker
                log.exception("job %s failed", job["id"])
                shutil.rmtree(folder, ignore_errors=True)
                self.store.fail(job["id"], self.id, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
            try:
                self._notify(job["id"])
            except Exception:  # noqa: BLE001 - a webhook must never take the worker down
                log.exception("webhook of job %s", job["id"])
        done.set()
        thread.join()

    def _complete(self, job: dict, result: dict) -> bool:
        """Commit a result, its outputs first kept where the deployment keeps them (serve.storage)."""
        from .storage import keep_outputs
        result = keep_outputs(self.settings.output_store, self.store, job, result)
        if self.store.complete(job["id"], self.id, result):
            return True
        self.store.delete_blobs([f["blob"] for f in result.get("files") or [] if f.get("blob")])  # not ours to keep
        return False

    def _previewer(self, job: dict, folder: Path):
        """A callable that writes ``preview.jpg`` from latents (throttled), or None for jobs/models without one."""
        if not getattr(JOBS.get(job["type"]), "preview", False):
            return None
        from ..core.preview import factors_for, latents_preview
        try:
            name = (job["request"].get("base") or job["request"]).get("model")
            entry = (self.engine.registry.get(name, "checkpoint") if name
                     else self.engine.registry.default_checkpoint())
            found = factors_for(entry.arch, entry.path if Path(str(entry.path)).is_dir() else None)
        except Exception:  # noqa: BLE001 - no preview is never a reason to fail a job
            return None
        if found is None:
            return None
        matrix, unit = found
        last = [0.0]

        def write(latents) -> None:
            now = time.monotonic()
            if now - last[0] < self.preview_every_s:
                return
            last[0] = now
            im = latents_preview(latents, matrix, unit_range=unit)
            if im is None:
                return
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (PREVIEW_NAME + ".part")
            im.save(tmp, "JPEG", quality=80)
            tmp.replace(folder / PREVIEW_NAME)
        return write

    # ---------------------------------------------------------------- job types
    def _ad(self, job: dict, folder: Path, progress: Callable, cancel: CancelToken) -> dict[str, Any]:
        import zipfile

        from ..core.requests import AdRequest
        from ..workflows.product_ad import ProductAdStudio
        req = AdRequest.model_validate(job["request"])

        def on_item(done: int, total: int, label: str) -> None:
            cancel.raise_if_cancelled()
            progress(ProgressEvent(done, total, label))
        result = ProductAdStudio(self.engine, settings=self.settings, safety_gate=self.safety).make(
            req, folder, progress=on_item)
        if not result.outputs:
            raise ImagesmithError("no ad was made: " + "; ".join(f.error for f in result.failures)[:300])
        archive = folder.parent / f"{folder.name}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for f in folder.rglob("*"):
                if f.is_file():
                    z.write(f, f.relative_to(folder))
        files = _ad_files(result) + [{"path": str(archive), "kind": "zip"}]
        return {"files": files, "manifest": result.manifest_path,
                "failures": [f.model_dump() for f in result.failures], "seconds": result.seconds}

    def execute(self, job: dict, folder: Path, progress: Callable, cancel: CancelToken) -> dict[str, Any]:
        """Run one job into its attempt folder (serve.jobs: each type's run)."""
        folder.mkdir(parents=True, exist_ok=True)
        return spec(job["type"]).run(self, job, folder, progress, cancel)

    def _save_generation(self, result, folder: Path) -> dict[str, Any]:
        """A generation's images through the one save path (core.outputs: metadata, the safety gate's policy,
        WebUI naming) and the job's result."""
        from ..core.outputs import flagged, save_control_maps, save_result
        folder.mkdir(parents=True, exist_ok=True)
        saved = save_result(result, folder, default_dir=folder, gate=self.safety)
        out = {"files": [s.file_entry() for s in saved if s.path is not None], "model": result.model_name,
               "seconds": round(result.seconds, 3)}
        maps = save_control_maps(result, next((s.path for s in saved if s.path is not None), None))
        if maps:  # A1111's detected maps, apart from the pictures (the A1111 routes append them as it does)
            out["control_maps"] = maps
        if any(s.flag for s in saved):
            out["safety"] = {"action": self.safety.policy.action, "flagged": flagged(saved)}
        return out

    def _vision(self, job_type: str, request: dict) -> dict[str, Any]:
        """describe / classify / prompt_expand: the same functions as the CLI commands."""
        from ..core import requests as R
        from ..core.imageio import load_image
        if job_type == "prompt_expand":
            req = R.PromptExpandRequest.model_validate(request)
            from ..workflows.llm import LLMConfig  # the server's own IMAGESMITH_LLM_URL, never the client's
            return {"prompts": self._loaded("prompt_assistant").expand(req.request, n=req.n, seed=req.seed,
                                                                      llm=LLMConfig.from_env())}
        if job_type == "classify":
            from ..vision.classify import classify_images
            req = R.ClassifyRequest.model_validate(request)
            images = [load_image(i, settings=self.settings, mode="RGB", what="image") for i in req.images]
            rows = classify_images(images, labels=req.labels, imagenet=req.imagenet, gate=req.gate, top=req.top,
                                   settings=self.settings, clip=self._clip(req.clip) if req.labels else None)
            return {"results": [{"image": i, **r} for i, r in zip(req.images, rows)]}
        from ..vision.caption import TransformersCaptioner, describe
        req = R.DescribeRequest.model_validate(request)
        image = load_image(req.image, settings=self.settings, mode="RGB", what="image")
        model_cap = TransformersCaptioner(req.captioner, settings=self.settings) if req.captioner else None
        return {"description": describe(image, top_k=req.top, captioner=self._captioner(req.clip),
                                        imagenet=self._loaded("imagenet"), model_captioner=model_cap,
                                        question=req.question)}

    def _clip(self, name: str | None):
        """A CLIP by name, kept between jobs (house-clip for None)."""
        def load():
            from ..models.clip import load_clip
            return load_clip(name, settings=self.settings)
        return self._helper(f"clip:{name or 'house-clip'}", load)

    def _captioner(self, clip: str | None):
        if clip in (None, "house-clip"):
            return self._loaded("captioner")

        def load():
            from ..vision.caption import Captioner
            return Captioner(clip=self._clip(clip), settings=self.settings)
        return self._helper(f"captioner:{clip}", load)

    def _loaded(self, what: str):
        """The vision helpers a worker keeps between jobs (each loads an encoder: ~0.2-1 s a time)."""
        def load():
            if what == "prompt_assistant":
                from ..workflows.prompt_assist import PromptAssistant
                return PromptAssistant()
            if what == "imagenet":
                from ..vision.imagenet import ImageNetClassifier
                return ImageNetClassifier(self.settings)
            from ..vision.caption import Captioner
            return Captioner()
        return self._helper(what, load)

    def _helper(self, name: str, load):
        """Vision models live in the engine's model cache beside the checkpoints: one memory manager (RAM
        budget, least recently used out) and one load per process however many worker threads ask."""
        return self.engine.cache.get(("vision", name), load, device="cpu").value


def _ad_files(result) -> list[dict]:
    files = []
    for o in result.outputs:
        files.append({"path": o.path, "kind": "png", "format": o.format, "width": o.width, "height": o.height,
                      "seed": o.seed, "product": Path(o.product).name, "occ": o.occ})
        files.append({"path": o.html_path, "kind": "html", "format": o.format})
    return files


PREVIEW_NAME = "preview.jpg"


def comfy_dirs(settings: Settings, user: str) -> dict[str, Path]:
    """Where a user's ComfyUI files live: input (uploads), output (SaveImage), temp (PreviewImage)."""
    return {kind: settings.home / "comfy" / kind / _safe(user) for kind in ("input", "output", "temp")}


def job_folder(settings: Settings, job: dict) -> Path:
    """Where a job's current attempt writes its files (and its live preview)."""
    return settings.home / "outputs" / _safe(job["user"]) / job["id"] / f"attempt-{job['attempts']}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64] or "user"


def wait_for(store: JobStore, job_id: str, timeout: float = 600.0, poll: float = 0.05) -> dict:
    """Block until the job is finished (for synchronous endpoints and tests)."""
    end = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > end:
            return job
        time.sleep(poll)
