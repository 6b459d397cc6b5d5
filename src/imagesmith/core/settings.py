"""Settings: where models live and what limits apply. Read from the environment once, passed down
explicitly (no module-level mutable state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

PerformanceMode = Literal["quality", "fast", "turbo"]
"""The engine's performance modes (engine.performance says what each changes)."""

MODEL_KINDS = ("checkpoints", "vae", "loras", "embeddings", "upscalers", "restorers", "controlnet", "segmenters")


def _env_paths(value: str | None) -> list[Path]:
    if not value:
        return []
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x1024,832x1216' -> [(1024, 1024), (832, 1216)]; a malformed entry is a ValueError naming it."""
    sizes = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        w, sep, h = part.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 64 or int(h) < 64:
            raise ValueError(f"resolution bucket {part!r} is not WIDTHxHEIGHT (each at least 64)")
        sizes.append((int(w), int(h)))
    return sizes


class Settings(BaseModel):
    home: Path = Field(default_factory=lambda: Path("~/.imagesmith").expanduser(),
                       description="IMAGESMITH_HOME: models/, outputs/, cache/ live here")
    extra_model_paths: list[Path] = Field(default_factory=list,
                                          description="IMAGESMITH_MODEL_PATHS: extra folders searched for models")
    max_pixels: int = Field(2048 * 2048, description="IMAGESMITH_MAX_PIXELS: cap on width*height of a request")
    max_image_bytes: int = Field(40 * 1024 * 1024, description="IMAGESMITH_MAX_IMAGE_BYTES: cap on an input file")
    max_input_pixels: int = Field(8192 * 8192, description="IMAGESMITH_MAX_INPUT_PIXELS: decompression-bomb cap")
    device: str = Field("auto", description="IMAGESMITH_DEVICE: auto|cpu|cuda|cuda:N|mps")
    ram_budget_bytes: int | None = Field(None, description="IMAGESMITH_RAM_BUDGET_GB: loaded-model RAM budget")
    vram_budget_bytes: int | None = Field(None, description="IMAGESMITH_VRAM_BUDGET_GB: loaded-model VRAM budget")
    cpu_offload: bool = Field(False, description="IMAGESMITH_CPU_OFFLOAD=1: model CPU offload on GPU")
    sequential_offload: bool = Field(False, description="IMAGESMITH_CPU_OFFLOAD=sequential: layer-by-layer CPU "
                                     "offload on GPU (the least VRAM, the slowest: Qwen-Image's 20B transformer "
                                     "on a 12-24 GB card)")
    vae_tiling: bool = Field(False, description="IMAGESMITH_VAE_TILING=1: decode in tiles")
    safety_action: Literal["withhold", "blur"] = Field(
        "withhold", description="IMAGESMITH_SAFETY_ACTION: what the safety gate does with a flagged output image, "
        "wherever it is saved (CLI --safety, every job of the service)")
    output_store: Literal["local", "database"] = Field(
        "local", description="IMAGESMITH_OUTPUT_STORE: where job outputs are kept for the API: local (the worker's "
        "home; API and workers share a disk) or database (also in the job store's database, so any API node serves "
        "outputs made on any machine)")
    retention_days: float | None = Field(None, gt=0, description="IMAGESMITH_RETENTION_DAYS: finished jobs' "
                                         "outputs and uploads older than this are deleted (with their rows)")
    retention_gb_per_user: float | None = Field(None, gt=0, description="IMAGESMITH_RETENTION_GB_PER_USER: past "
                                                "this, a user's oldest finished outputs and uploads are deleted")
    performance: PerformanceMode = Field(
        "quality", description="IMAGESMITH_PERFORMANCE: the default performance mode of requests that name none "
        "(quality: lossless; fast: + fp8 on Ada/Hopper; turbo: + step caching)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="IMAGESMITH_COMPILE: regional torch.compile (auto: on CUDA with Triton, off on CPU)")
    compile_scope: Literal["auto", "regional", "whole"] = Field(
        "auto", description="IMAGESMITH_COMPILE_SCOPE: compile the denoiser's repeated blocks (regional: fast to "
        "compile) or the whole network (whole: slower to compile, fuses everything); auto picks per architecture")
    cuda_graphs: bool = Field(False, description="IMAGESMITH_CUDA_GRAPHS=1: compile with CUDA graphs "
                              "(reduce-overhead); more memory, fewer kernel launches")
    lora_max_rank: int | None = Field(None, ge=1, description="IMAGESMITH_LORA_MAX_RANK: hot-swap LoRAs into "
                                      "fixed slots padded to this rank, so a compiled model never recompiles "
                                      "when LoRAs or their weights change")
    warmup_sizes: list[tuple[int, int]] = Field(
        default_factory=list, description="IMAGESMITH_WARMUP_SIZES: WxH,WxH resolution buckets the service "
        "compiles and warms at start (e.g. 1024x1024,832x1216)")

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        values: dict = {}
        if env.get("IMAGESMITH_HOME"):
            values["home"] = Path(env["IMAGESMITH_HOME"]).expanduser()
        values["extra_model_paths"] = _env_paths(env.get("IMAGESMITH_MODEL_PATHS"))
        for key, name in (("max_pixels", "IMAGESMITH_MAX_PIXELS"),
                          ("max_image_bytes", "IMAGESMITH_MAX_IMAGE_BYTES"),
                          ("max_input_pixels", "IMAGESMITH_MAX_INPUT_PIXELS")):
            if env.get(name):
                values[key] = int(env[name])
        if env.get("IMAGESMITH_DEVICE"):
            values["device"] = env["IMAGESMITH_DEVICE"]
        for key, name in (("ram_budget_bytes", "IMAGESMITH_RAM_BUDGET_GB"),
                          ("vram_budget_bytes", "IMAGESMITH_VRAM_BUDGET_GB")):
            if env.get(name):
                values[key] = int(float(env[name]) * 1024**3)
        offload = env.get("IMAGESMITH_CPU_OFFLOAD", "").lower()
        values["cpu_offload"] = offload in ("1", "true", "yes", "model", "sequential")
        values["sequential_offload"] = offload == "sequential"
        values["vae_tiling"] = env.get("IMAGESMITH_VAE_TILING", "") in ("1", "true", "yes")
        for key, name in (("performance", "IMAGESMITH_PERFORMANCE"), ("compile", "IMAGESMITH_COMPILE"),
                          ("compile_scope", "IMAGESMITH_COMPILE_SCOPE"),
                          ("safety_action", "IMAGESMITH_SAFETY_ACTION"), ("output_store", "IMAGESMITH_OUTPUT_STORE")):
            if env.get(name):
                values[key] = env[name].strip().lower()
        values["cuda_graphs"] = env.get("IMAGESMITH_CUDA_GRAPHS", "") in ("1", "true", "yes")
        for key, name in (("retention_days", "IMAGESMITH_RETENTION_DAYS"),
                          ("retention_gb_per_user", "IMAGESMITH_RETENTION_GB_PER_USER")):
            if env.get(name):
                values[key] = float(env[name])
        if env.get("IMAGESMITH_LORA_MAX_RANK"):
            values["lora_max_rank"] = int(env["IMAGESMITH_LORA_MAX_RANK"])
        if env.get("IMAGESMITH_WARMUP_SIZES"):
            values["warmup_sizes"] = parse_sizes(env["IMAGESMITH_WARMUP_SIZES"])
        values.update(overrides)
        return cls(**values)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def model_dirs(self, kind: str) -> list[Path]:
        """Folders searched for one kind, home first, then the extra paths (each may hold kind subfolders)."""
        dirs = [self.models_dir / kind]
        for extra in self.extra_model_paths:
            dirs.append(extra / kind)
        return dirs

    def ensure_home(self) -> None:
        for kind in MODEL_KINDS:
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)
