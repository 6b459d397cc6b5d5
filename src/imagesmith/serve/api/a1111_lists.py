"""The A1111 routes that list or refresh things (`/sdapi/v1/cmd-flags`, `embeddings`, `hypernetworks`,
`face-restorers`, `realesrgan-models`, `latent-upscale-modes`, `scripts`, `memory`, `sd-vae`, `refresh-*`), as an APIRouter with the
caller checked on every route, in A1111 1.10's shapes: real clients (webuiapi, Open WebUI) call them at connect
time and treat a 404 as a dead server."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends

from ...core.errors import ImagesmithError
from .context import Admin, Svc, caller

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(caller)])


def registry(svc):
    from ...models.house import make_registry
    return make_registry(svc.settings)


@router.get("/cmd-flags")
def cmd_flags(svc: Svc):
    # the flags clients read to decide what to show; imagesmith's API is always on, never --nowebui-only
    models = svc.settings.models_dir
    return {"api": True, "nowebui": False, "listen": False, "port": None, "data_dir": str(svc.settings.home),
            "ckpt_dir": str(models / "checkpoints"), "lora_dir": str(models / "lora"),
            "vae_dir": str(models / "vae"), "embeddings_dir": str(models / "embeddings"),
            "hypernetwork_dir": None, "medvram": False, "lowvram": False, "xformers": False,
            "disable_safe_unpickle": False, "api_auth": None}


@router.get("/embeddings")
def embeddings(svc: Svc):
    """Every embedding file, read (safetensors only): its width (``shape``) and vector count; a file that cannot be
    read is listed as skipped, as WebUI lists the ones it could not load."""
    from ...engine.embeddings import load_embedding
    loaded, skipped = {}, {}
    for e in registry(svc).list("embedding"):
        info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        try:
            emb = load_embedding(e.path, e.name)
        except ImagesmithError:
            skipped[e.name] = info
            continue
        widths = [int(v.shape[1]) for v in emb.vectors.values()]
        loaded[e.name] = {**info, "shape": widths[0] if len(widths) == 1 else sum(widths), "vectors": emb.count}
    return {"loaded": loaded, "skipped": skipped}


@router.get("/hypernetworks")
def hypernetworks():
    return []  # a format imagesmith does not run (and A1111 itself has deprecated)


@router.get("/face-restorers")
def face_restorers(svc: Svc):
    # restore_faces runs the user's face restorers (GFPGAN, RestoreFormer) when there are any, else imagesmith's
    # face detailer (an img2img repaint of detected faces)
    from .a1111 import restorer_names
    names = restorer_names(svc)
    return [{"name": n, "cmd_dir": None} for n in names] or [{"name": "imagesmith face detailer", "cmd_dir": None}]


@router.get("/realesrgan-models")
def realesrgan_models():
    from ...core.requests import UPSCALERS
    return [{"name": n, "path": None, "scale": 4} for n in UPSCALERS if "ESRGAN" in n]


@router.get("/latent-upscale-modes")
def latent_upscale_modes():
    return [{"name": "Latent"}]  # the latent hires upscaler imagesmith runs (bilinear); A1111's others are not


@router.get("/scripts")
def scripts():
    # the always-on scripts whose args imagesmith reads (ADetailer's map onto its face detailer); webuiapi reads
    # this at connect time to decide what it sends
    return {"txt2img": ["adetailer"], "img2img": ["adetailer", "ultimate sd upscale"]}


@router.get("/sd-vae")
def sd_vae(svc: Svc):
    return [{"model_name": e.name, "filename": str(e.path)} for e in registry(svc).list("vae")]


@router.get("/memory")
def memory_info():
    return {"ram": _ram(), "cuda": _cuda()}


def _refresh(svc: Svc):
    registry(svc).scan()
    return None


@router.post("/unload-checkpoint")
def unload_checkpoint(svc: Svc, who: Admin):
    """Admin: every worker drops the models it holds between jobs (RAM and VRAM freed); the next generation
    loads what it needs again, as in A1111."""
    return svc.store.set_checkpoint_state("unloaded", by=who["name"])


@router.post("/reload-checkpoint")
def reload_checkpoint(svc: Svc, who: Admin):
    """Admin: every worker loads (and warms up) the default checkpoint again between jobs."""
    return svc.store.set_checkpoint_state("loaded", by=who["name"])


def _server_stop_allowed(svc) -> None:
    from ...core.errors import NotFound
    if not svc.server_stop:  # A1111 serves these only with --api-server-stop
        raise NotFound("server-stop, server-kill and server-restart are off: start with imagesmith serve --api-server-stop")


def _stop_self() -> None:
    import signal
    import threading
    # after the answer has gone out: SIGTERM is the graceful stop (uvicorn drains, workers hand jobs back)
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGTERM)).start()


@router.post("/server-stop")
def server_stop(svc: Svc, who: Admin):
    """Admin, with --api-server-stop: a graceful stop (in-flight requests answered; running jobs go back to the
    queue and survive)."""
    _server_stop_allowed(svc)
    _stop_self()
    return {"stopping": True, "by": who["name"]}


@router.post("/server-kill")
def server_kill(svc: Svc, who: Admin):
    """A1111 kills its process; imagesmith stops gracefully as server-stop does (no job is lost either way)."""
    return server_stop(svc, who)


@router.post("/server-restart")
def server_restart(svc: Svc, who: Admin):
    """A1111 restarts under its own launcher; imagesmith stops gracefully and its supervisor (systemd, a container
    restart policy) starts it again."""
    out = server_stop(svc, who)
    return {**out, "restart": "by your supervisor (systemd Restart=, docker --restart)"}


for _name in ("checkpoints", "loras", "vae", "embeddings"):
    router.add_api_route(f"/refresh-{_name}", _refresh, methods=["POST"], name=f"refresh_{_name}")


def _ram() -> dict:
    """RAM in bytes, from /proc/meminfo (A1111 reports psutil's figures under the same keys)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        return {"error": "unavailable"}
    total, free = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    return {"free": free, "used": total - free, "total": total}


def _cuda() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    free, total = torch.cuda.mem_get_info()
    return {"system": {"free": free, "used": total - free, "total": total},
            "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
            "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()},
            "events": {"retries": 0, "oom": 0}, "pid": os.getpid()}
