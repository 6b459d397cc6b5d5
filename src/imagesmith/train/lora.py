"""``imagesmith train lora CONFIG.yaml``: LoRA fine-tuning of a registered SD1.5/SD2/SDXL-class checkpoint,
house-ldm, or a FLUX / SD3 (diffusion-transformer) checkpoint, built the way diffusers' own LoRA training scripts
are: the frozen pipeline's denoiser (and, for SD1.5/SDXL, optionally the text encoders) get peft ``LoraConfig``
adapters (``add_adapter``), AdamW over the adapter parameters only, a ``diffusers.optimization.get_scheduler``
schedule with warmup, gradient accumulation and clipping.

What one step optimises is an :class:`Objective`, the one place the model families differ:

- :class:`UnetObjective` (SD1/SD2/SDXL/house-ldm): DDPM noising with the model's own noise schedule, epsilon or
  v-prediction target (``train_text_to_image_lora.py`` / ``train_text_to_image_lora_sdxl.py``);
- :class:`FlowMatchObjective` (FLUX, SD3): rectified-flow / flow matching as ``train_dreambooth_lora_flux.py`` and
  ``train_dreambooth_lora_sd3.py`` do it: timesteps drawn by ``compute_density_for_timestep_sampling`` from the
  model's ``FlowMatchEulerDiscreteScheduler`` sigmas, ``x_t = (1 - sigma) x_0 + sigma noise``, target
  ``noise - x_0`` weighted by ``compute_loss_weighting_for_sd3``; FLUX latents packed (``_pack_latents``, image
  ids, guidance embedding when the transformer has one), SD3 outputs preconditioned (the SD3 script's default);
  text embeddings from the pipeline's own ``encode_prompt``.

Outputs (``output_name``):

- ``<loras dir>/<output_name>.safetensors``: the LoRA that registers itself (``--lora NAME:W`` works at once):
  kohya/WebUI keys (A1111, Forge, ComfyUI load it) with kohya's ``ss_*`` metadata and the trigger word, for
  SD1.5/SDXL bases; for house-ldm (no WebUI runs it) and FLUX/SD3 (what diffusers' ``load_lora_weights`` reads
  for every FLUX/SD3 width) the diffusers-format file is the registered one;
- ``<run dir>/diffusers/pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``, with the adapter
  config as ``lora_adapter_metadata`` so alpha survives) and ``<run dir>/<output_name>.kohya.safetensors``
  (FLUX/SD3: original BFL/MMDiT names with q/k/v fused, see models/lora_keys.py);
- ``<run dir>/TRAINING_CARD.md`` with the config, dataset, steps, wall time, hardware, ``loss.png`` and the
  sample grids (``samples/step-N.png``).

Runs are seeded and resumable: ``<run dir>/checkpoint`` (safetensors + JSON: adapter weights, optimizer,
scheduler, RNG) is written every ``save_every`` steps and at the end; re-running the command continues from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.errors import ImagesmithError
from ..core.settings import Settings
from . import common as C
from .lora_data import LoraDataset

CLIP_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
BERT_TE_TARGETS = ["query", "key", "value"]
NATIVE_RESOLUTION = {"house": 128, "sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}
DIT_ARCHS = ("flux", "sd3")
WEIGHTING_DEFAULT = {"flux": "none", "sd3": "logit_normal"}  # the diffusers scripts' defaults


class LoraConfigError(ImagesmithError):
    code = "bad_config"
    http_status = 422


class LoraTrainConfig(BaseModel):
    """Every key of a LoRA training YAML (see examples/lora/lora.yaml for a commented one)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "house-ldm"
    dataset: Path
    output_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    trigger_word: str | None = None
    # network
    rank: int = Field(8, ge=1, le=512)
    alpha: float | None = Field(None, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = Field(0.0, ge=0, lt=1)
    train_text_encoder: bool = False
    text_encoder_targets: list[str] | None = None
    # flow matching (FLUX, SD3): timestep density and loss weighting as diffusers' scripts
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] | None = None
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    guidance_scale: float = Field(3.5, ge=0)
    # optimisation
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # data
    resolution: int | None = Field(None, ge=32)
    bucketing: bool = True
    bucket_step: int = Field(64, ge=8)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    flip: bool = False
    # bookkeeping
    seed: int = 0
    save_every: int = Field(0, ge=0)
    sample_every: int = Field(0, ge=0)
    sample_prompts: list[str] = Field(default_factory=list)
    sample_steps: int = Field(20, ge=1)
    sample_cfg: float = 7.0
    resume: bool = True
    device: str = "auto"
    output_dir: Path | None = None
    """Where the registered LoRA file goes (default: $IMAGESMITH_HOME/models/loras)."""
    run_dir: Path | None = None
    """Checkpoints, card, samples (default: $IMAGESMITH_HOME/runs/lora/<output_name>)."""
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> LoraTrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' and 'epochs'")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, base_dir: Path | None = None) -> LoraTrainConfig:
        import yaml
        path = Path(path)
        if not path.is_file():
            raise LoraConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise LoraConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise LoraConfigError(f"{path}: the config must be a mapping of keys to values")
        cfg = cls.parse(data, where=str(path))
        root = base_dir or path.parent  # relative paths are relative to the config file
        updates = {k: (root / v) for k in ("dataset", "output_dir", "run_dir")
                   if (v := getattr(cfg, k)) is not None and not Path(v).is_absolute()}
        return cfg.model_copy(update=updates)

    @classmethod
    def parse(cls, data: dict, where: str = "config") -> LoraTrainConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "config"
            if err["type"] == "extra_forbidden":
                raise LoraConfigError(f"{where}: unknown key '{key}'") from None
            if err["type"] == "missing":
                raise LoraConfigError(f"{where}: '{key}' is required") from None
            raise LoraConfigError(f"{where}: '{key}': {err['msg']}") from None


# -------------------------------------------------------------------------------------------- model
class _AdapterParams(torch.nn.Module):
    """The trainable adapter parameters of the UNet and text encoder, as one module whose state dict is only
    them (what the checkpoints hold)."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        super().__init__()
        self.names: dict[str, tuple[str, str]] = {}
        self.params = torch.nn.ParameterDict()
        for comp, module in parts.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    key = f"{comp}__{name}".replace(".", "__")
                    self.params[key] = p
                    self.names[key] = (comp, name)


def _is_bert(text_encoder) -> bool:
    return getattr(getattr(text_encoder, "config", None), "model_type", "") == "bert"


def resolve_base(config: LoraTrainConfig, settings: Settings):
    """The registry entry of the base model (nothing loaded yet)."""
    from ..models.house import make_registry
    entry = make_registry(settings).get(config.base_model, "checkpoint")
    if entry.arch not in NATIVE_RESOLUTION:
        raise LoraConfigError(f"base_model '{config.base_model}' is {entry.arch}: LoRA training supports "
                              "SD1.5/SD2/SDXL-class, SD3 and FLUX checkpoints and house-ldm")
    return entry


def _arch_of_pipe(pipe) -> str:
    """The family of a pipeline handed in without a registry entry."""
    if getattr(pipe, "transformer", None) is not None:
        return "flux" if "Flux" in type(pipe).__name__ else "sd3"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


def pixel_multiple(pipe, arch: str) -> int:
    """What image sides must be multiples of: the VAE's downscale, times the transformer's patch (FLUX packs
    2x2 latent patches; SD3's patch_size)."""
    vae_sf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if arch == "flux":
        return vae_sf * 2
    if arch == "sd3":
        return vae_sf * int(getattr(pipe.transformer.config, "patch_size", 2) or 2)
    return vae_sf


# ------------------------------------------------------------------------------------------- objectives
class Objective:
    """One training step's loss for a model family: which pipeline component carries the LoRA, the loss of a
    batch of clean latents, and the pipeline arguments that render a sample."""

    component = "unet"
    label = "UNet"

    def __init__(self, trainer: LoraTrainer):
        self.trainer = trainer

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.trainer.pipe, self.component)

    def loss(self, latents: torch.Tensor, captions: list[str], gen: torch.Generator,
             noise_sched=None) -> torch.Tensor:
        raise NotImplementedError

    def sample_kwargs(self, prompt: str) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _forward(self, *args, **kwargs):
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.trainer.config.mixed_precision)
        device = self.trainer.device
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return self.denoiser(*args, **kwargs)


class UnetObjective(Objective):
    """SD1/SD2/SDXL/house-ldm: DDPM noising with the checkpoint's own schedule; epsilon or v-prediction target."""

    def __init__(self, trainer: LoraTrainer):
        from diffusers import DDPMScheduler
        super().__init__(trainer)
        self.noise_sched = DDPMScheduler.from_config(trainer.pipe.scheduler.config)

    def describe(self) -> str:
        return f"DDPM {self.noise_sched.config.prediction_type} MSE"

    def loss(self, latents, captions, gen, noise_sched=None):
        tr = self.trainer
        noise_sched = noise_sched or self.noise_sched
        noise = torch.randn(latents.shape, generator=gen).to(tr.device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(tr.device)
        noisy = noise_sched.add_noise(latents, noise, t)
        if noise_sched.config.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(latents, noise, t)
        else:
            target = noise
        cond, pooled = tr.encode(captions)
        unet_dtype = self.denoiser.dtype
        kwargs: dict[str, Any] = {}
        if pooled is not None:
            h, w = (latents.shape[-2] * tr.vae_scale_factor, latents.shape[-1] * tr.vae_scale_factor)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet_dtype),
                                           "time_ids": tr._time_ids(latents.shape[0], h, w).to(unet_dtype)}
        pred = self._forward(noisy.to(unet_dtype), t, encoder_hidden_states=cond.to(unet_dtype), **kwargs).sample
        return F.mse_loss(pred.float(), target.float())

    def sample_kwargs(self, prompt):
        tr = self.trainer
        (cond, pooled), (unc, upooled) = tr.encode([prompt]), tr.encode([""])
        cond, unc = tr._same_length([cond, unc], lambda: unc)
        kw: dict[str, Any] = dict(prompt_embeds=cond, negative_prompt_embeds=unc)
        if tr.sdxl:
            kw.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=upooled)
        return kw


class FlowMatchObjective(Objective):
    """FLUX and SD3: flow matching on the transformer, as diffusers' train_dreambooth_lora_flux.py /
    train_dreambooth_lora_sd3.py (see the module docstring). Frozen-text-encoder embeddings are cached by caption."""

    component = "transformer"
    label = "transformer"
    CACHE = 512

    def __init__(self, trainer: LoraTrainer):
        from collections import OrderedDict

        from diffusers import FlowMatchEulerDiscreteScheduler
        super().__init__(trainer)
        cfg = trainer.config
        self.flux = trainer.arch == "flux"
        self.scheme = cfg.weighting_scheme or WEIGHTING_DEFAULT[trainer.arch]
        # the scripts' noise_scheduler_copy: sigmas/timesteps of the checkpoint's scheduler config
        self.sched = FlowMatchEulerDiscreteScheduler.from_config(trainer.pipe.scheduler.config)
        self.precondition = not self.flux  # train_dreambooth_lora_sd3.py: --precondition_outputs 1
        self.guidance = cfg.guidance_scale if self.flux and getattr(
            self.denoiser.config, "guidance_embeds", False) else None
        self._cache: OrderedDict[str, tuple] = OrderedDict()

    def describe(self) -> str:
        extra = f", logit-normal({self.trainer.config.logit_mean:g}, {self.trainer.config.logit_std:g})" \
            if self.scheme == "logit_normal" else ""
        return (f"flow matching, timestep density / loss weighting {self.scheme}{extra}"
                + (f", guidance embedding {self.guidance:g}" if self.guidance is not None else "")
                + (", preconditioned outputs" if self.precondition else ""))

    @torch.no_grad()
    def _encode_one(self, caption: str) -> tuple:
        pipe, dev = self.trainer.pipe, self.trainer.device
        if self.flux:
            embeds, pooled, ids = pipe.encode_prompt(prompt=[caption], prompt_2=None, device=dev)
            return embeds, pooled, ids
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[caption], prompt_2=None, prompt_3=None, device=dev,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled, None

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = []
        for c in captions:
            if c in self._cache:
                self._cache.move_to_end(c)
            else:
                self._cache[c] = self._encode_one(c)
                if len(self._cache) > self.CACHE:
                    self._cache.popitem(last=False)
            out.append(self._cache[c])
        return (torch.cat([e for e, _, _ in out]), torch.cat([p for _, p, _ in out]), out[0][2])

    def loss(self, latents, captions, gen, noise_sched=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
        tr, cfg = self.trainer, self.trainer.config
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen).to(tr.device)
        u = compute_density_for_timestep_sampling(self.scheme, b, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                                  mode_scale=cfg.mode_scale, generator=gen)
        n = self.sched.config.num_train_timesteps
        indices = (u * n).long().clamp(0, n - 1)  # 'mode' can reach u = 1
        timesteps = self.sched.timesteps[indices].to(tr.device)
        sigmas = self.sched.sigmas[indices].to(tr.device, torch.float32).view(b, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        embeds, pooled, text_ids = self.encode(captions)
        dtype = self.denoiser.dtype
        if self.flux:
            from diffusers import FluxPipeline
            _, c, h, w = latents.shape
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, tr.device, dtype)
            guidance = torch.full((b,), float(self.guidance), device=tr.device) if self.guidance is not None else None
            pred = self._forward(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                                 guidance=guidance, pooled_projections=pooled.to(dtype),
                                 encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids, img_ids=img_ids,
                                 return_dict=False)[0]
            vae_sf = tr.vae_scale_factor
            pred = FluxPipeline._unpack_latents(pred, height=h * vae_sf, width=w * vae_sf, vae_scale_factor=vae_sf)
        else:
            pred = self._forward(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype),
                                 encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                                 return_dict=False)[0]
        pred = pred.float()
        if self.precondition:  # EDM-style: the model's output read as x_0
            pred, target = pred * (-sigmas) + noisy, latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.scheme, sigmas=sigmas).float()
        per_item = (weighting * (pred - target.float()) ** 2).reshape(b, -1).mean(1)
        return per_item.mean()

    def sample_kwargs(self, prompt):
        return {"prompt": prompt} if self.flux else {"prompt": prompt, "negative_prompt": ""}


class LoraTrainer:
    """One LoRA run. ``LoraTrainer(config).train()`` returns a summary dict (files, steps, losses, seconds)."""

    def __init__(self, config: LoraTrainConfig, settings: Settings | None = None, *, pipe=None, entry=None):
        from ..models.house import is_house_folder
        from ..models.loaders import load_pipeline
        self.config = config
        self.settings = settings or Settings.from_env()
        if pipe is None:
            entry = resolve_base(config, self.settings)  # fail on a bad name before reading any image
        self.arch = entry.arch if entry is not None else _arch_of_pipe(pipe)
        if entry is not None and is_house_folder(entry.path):
            self.arch = "house"
        if config.train_text_encoder and self.arch == "house":
            raise LoraConfigError("train_text_encoder: house-ldm's MiniLM text encoder cannot carry a LoRA that "
                                  "diffusers loads back; train the UNet only (train_text_encoder: false)")
        if config.train_text_encoder and self.arch in DIT_ARCHS:
            raise LoraConfigError(f"train_text_encoder: {self.arch.upper()} LoRA training adapts the transformer "
                                  "only (its CLIP/T5 encoders stay frozen); set train_text_encoder: false")
        # sides: multiples of the VAE downscale (x the DiT patch); FLUX/SD3 need 16 px before the model loads
        self.multiple = 16 if self.arch in DIT_ARCHS else 8
        self._make_dataset()  # a bad dataset fails before the weights load
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        dtype = amp if amp is not None and self.arch in DIT_ARCHS else torch.float32  # frozen DiT weights in half
        self.entry, self.pipe = entry, pipe if pipe is not None else load_pipeline(entry, torch_dtype=dtype)
        self.sdxl = self.arch not in DIT_ARCHS and getattr(self.pipe, "text_encoder_2", None) is not None
        self.vae_scale_factor = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        if pixel_multiple(self.pipe, self.arch) != self.multiple:
            self.multiple = pixel_multiple(self.pipe, self.arch)
            self._make_dataset()
        self.objective: Objective = FlowMatchObjective(self) if self.arch in DIT_ARCHS else UnetObjective(self)
        self.device = C.pick_device(config.device)
        self.run_dir = Path(config.run_dir or self.settings.home / "runs" / "lora" / config.output_name)
        self.loras_dir = Path(config.output_dir or self.settings.models_dir / "loras")
        self.alpha = float(config.alpha or config.rank)

    def _make_dataset(self) -> None:
        """Resolution and bucket step rounded to what the model's latents (and DiT patches) need."""
        cfg, m = self.config, self.multiple
        wanted = cfg.resolution or NATIVE_RESOLUTION.get(self.arch, 512)
        self.resolution = max(m, wanted // m * m)
        self.bucket_step = -(-cfg.bucket_step // m) * m
        self.dataset = LoraDataset(cfg.dataset, resolution=self.resolution, bucketing=cfg.bucketing,
                                   bucket_step=self.bucket_step, trigger_word=cfg.trigger_word)

    # ---------------------------------------------------------------- set-up
    def _add_adapters(self) -> dict[str, torch.nn.Module]:
        from peft import LoraConfig
        pipe, cfg = self.pipe, self.config
        for comp in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, comp, None)
            if module is not None:
                module.requires_grad_(False).to(self.device)
        denoiser = self.objective.denoiser
        parts = {self.objective.component: denoiser}
        try:
            denoiser.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=self.alpha, lora_dropout=cfg.dropout,
                                            init_lora_weights="gaussian", target_modules=cfg.target_modules))
        except ValueError as exc:  # peft: no module matched
            raise LoraConfigError(f"target_modules {cfg.target_modules}: {str(exc).splitlines()[0][:200]}") from None
        if cfg.train_text_encoder:  # SDXL: both CLIP encoders, as kohya's sdxl_train_network
            for comp in ("text_encoder", "text_encoder_2"):
                te = getattr(pipe, comp, None)
                if te is None:
                    continue
                targets = cfg.text_encoder_targets or (BERT_TE_TARGETS if _is_bert(te) else CLIP_TE_TARGETS)
                te.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=self.alpha, lora_dropout=cfg.dropout,
                                          init_lora_weights="gaussian", target_modules=targets))
                parts[comp] = te
        for module in parts.values():  # adapters train in fp32 whatever the base dtype
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        return parts

    def total_steps(self) -> int:
        if self.config.steps:
            return self.config.steps
        per_epoch = math.ceil(self.dataset.batches_per_epoch(self.config.batch_size) / self.config.gradient_accumulation)
        return self.config.epochs * per_epoch

    # ---------------------------------------------------------------- text
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings [B, T, H], SDXL pooled [B, P] or None); differentiable when the text encoder
        trains. Plain captions encode exactly as the engine encodes a prompt."""
        pipe = self.pipe
        if self.sdxl:
            pairs = [self._sdxl_one(c) for c in captions]
            embeds = self._same_length([e for e, _ in pairs], lambda: self._sdxl_one("")[0])
            return torch.cat(embeds), torch.cat([p for _, p in pairs])
        if not self.config.train_text_encoder:
            embeds = [self._sd_one(c) for c in captions]
            return torch.cat(self._same_length(embeds, lambda: self._sd_one(""))), None
        tok = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        if _is_bert(pipe.text_encoder):
            out = pipe.text_encoder(ids, attention_mask=tok["attention_mask"].to(self.device))
        else:
            out = pipe.text_encoder(ids)
        return out.last_hidden_state.float(), None

    def _sd_one(self, text: str) -> torch.Tensor:
        from ..engine import prompts as P
        return P.encode_prompt_sd(text, self.pipe.tokenizer, self.pipe.text_encoder, device=self.device,
                                  dtype=torch.float32)

    def _sdxl_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from ..engine import prompts as P
        pipe = self.pipe
        return P.encode_prompt_sdxl(text, (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                    device=self.device, dtype=torch.float32, grad=self.config.train_text_encoder)

    @staticmethod
    def _same_length(embeds: list[torch.Tensor], empty) -> list[torch.Tensor]:
        """Captions over 75 tokens encode to more 77-token chunks: pad the others with the empty prompt's
        chunk, as WebUI pads cond/uncond."""
        from ..engine import prompts as P
        longest = max(embeds, key=lambda e: e.shape[1])
        if all(e.shape[1] == longest.shape[1] for e in embeds):
            return embeds
        chunk = empty()
        return [P.pad_to_same_length(e, longest, chunk)[0] for e in embeds]

    def _time_ids(self, b: int, h: int, w: int) -> torch.Tensor:
        return torch.tensor([[h, w, 0, 0, h, w]] * b, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- one step
    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Clean latents of a batch: a VAE posterior sample, shifted and scaled as the pipeline expects."""
        vae = self.pipe.vae
        vae_dtype = next(vae.parameters()).dtype
        posterior = vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(self.device, posterior.mean.dtype)
        latents = (posterior.mean + posterior.std * eps).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def loss(self, pixels: torch.Tensor, captions: list[str], gen: torch.Generator, noise_sched=None) -> torch.Tensor:
        """The training loss of one micro-batch (pixels in [-1, 1]); all randomness from ``gen``."""
        return self.objective.loss(self.latents(pixels, gen), captions, gen, noise_sched)

    def _micro_batch(self, m: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        cfg, ds = self.config, self.dataset
        per_epoch = self._per_epoch
        epoch, k = divmod(m, per_epoch)
        if epoch not in self._plans:
            self._plans = {epoch: ds.batches(epoch, cfg.batch_size, cfg.seed)}
        idx = self._plans[epoch][k]
        flips = (torch.rand(len(idx), generator=gen) < 0.5).tolist() if cfg.flip else [False] * len(idx)
        drop = (torch.rand(len(idx), generator=gen) < cfg.caption_dropout).tolist()
        pixels = torch.stack([ds.load(i, f) for i, f in zip(idx, flips)])
        captions = ["" if d else ds.caption(i) for i, d in zip(idx, drop)]
        return pixels, captions

    # ---------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler
        cfg = self.config
        total = self.total_steps()
        gen = C.seed_everything(cfg.seed)
        parts = self._add_adapters()
        holder = _AdapterParams(parts)
        groups = [{"params": [p for k, p in holder.params.items() if holder.names[k][0] == self.objective.component],
                   "lr": cfg.learning_rate}]
        te_params = [p for k, p in holder.params.items() if holder.names[k][0].startswith("text_encoder")]
        if te_params:  # text_encoder, and SDXL's text_encoder_2
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
        self._per_epoch, self._plans = self.dataset.batches_per_epoch(cfg.batch_size), {}
        step, watch = 0, C.Stopwatch()
        log = C.LossLog(self.run_dir / "losses.jsonl")
        if cfg.resume and C.has_checkpoint(self.run_dir):
            state = C.load_checkpoint(self.run_dir, model=holder, optimizer=opt, scheduler=sched, generator=gen)
            step, watch = state["step"], C.Stopwatch(state["wall_seconds"])
        elif log.records:
            log.path.unlink()
            log = C.LossLog(self.run_dir / "losses.jsonl")
        log.truncate_after(step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        for module in parts.values():
            module.train()
        bar = C.progress(total, step, f"lora {cfg.output_name}", cfg.progress)
        params = [p for g in groups for p in g["params"]]
        while step < total:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for micro in range(cfg.gradient_accumulation):
                pixels, captions = self._micro_batch(step * cfg.gradient_accumulation + micro, gen)
                loss = self.loss(pixels, captions, gen) / cfg.gradient_accumulation
                loss.backward()
                value += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            log.append({"step": step, "loss": value, "lr": sched.get_last_lr()[0], "sec": round(dt, 4)})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", s_step=f"{dt:.2f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                C.save_checkpoint(self.run_dir, step=step, model=holder, optimizer=opt, scheduler=sched,
                                  generator=gen, wall_seconds=watch.total)
            if cfg.sample_every and cfg.sample_prompts and (step % cfg.sample_every == 0 or step == total):
                self.render_samples(self.run_dir / "samples" / f"step-{step:06d}.png")
        bar.close()
        files = self.save(parts, step)
        losses = log.losses()
        k = max(1, min(10, len(losses) // 4))  # mean of the first / last k steps
        summary = {"name": cfg.output_name, "base_model": cfg.base_model, "arch": self.arch, "steps": step,
                   "images": len(self.dataset.report.samples), "items_with_repeats": len(self.dataset),
                   "resolution": self.resolution, "bucket_step": self.bucket_step, "objective": self.objective.describe(),
                   "buckets": sorted({f"{w}x{h}" for w, h in self.dataset.bucket_of}),
                   "first_loss": round(C.mean(losses[:k]), 5) if losses else None,
                   "last_loss": round(C.mean(losses[-k:]), 5) if losses else None,
                   "wall_seconds": round(watch.total, 1), "hardware": C.hardware_note(self.device), **files}
        card = self.write_card(summary, losses)
        summary["card"] = str(card)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    # ---------------------------------------------------------------- outputs
    def _peft_layers(self, parts: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        from peft.utils import get_peft_model_state_dict
        return {comp: {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(m).items()}
                for comp, m in parts.items()}

    def kohya_metadata(self, steps: int) -> dict[str, str]:
        cfg = self.config
        version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "house": "imagesmith_house_ldm",
                   "flux": "flux1", "sd3": "sd3"}
        module = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}.get(self.arch, "networks.lora")
        return {"ss_network_module": module, "ss_network_dim": str(cfg.rank),
                "ss_network_alpha": f"{self.alpha:g}", "ss_output_name": cfg.output_name,
                "ss_base_model_version": version.get(self.arch, self.arch), "ss_steps": str(steps),
                "ss_resolution": f"({self.resolution}, {self.resolution})", "ss_learning_rate": f"{cfg.learning_rate:g}",
                "ss_num_train_images": str(len(self.dataset)), "ss_seed": str(cfg.seed),
                "ss_training_comment": f"trigger word: {cfg.trigger_word}" if cfg.trigger_word else "",
                "ss_tag_frequency": json.dumps({}), "imagesmith.trigger_word": cfg.trigger_word or "",
                "imagesmith.base_model": cfg.base_model, "imagesmith.arch": self.arch,
                "modelspec.title": cfg.output_name}

    def save(self, parts: dict[str, torch.nn.Module], steps: int) -> dict[str, str]:
        """Both formats, written atomically; the registered one lands in the loras folder. The diffusers file
        is what the pipeline's ``save_lora_weights`` writes (peft keys under ``transformer.`` for FLUX/SD3, as
        the diffusers scripts save them; with each adapter's LoraConfig as metadata, so alpha != rank loads
        back right)."""
        from safetensors.torch import save_file

        from ..models.lora_keys import NoKohyaName, dit_to_kohya, sdxl_unet_module_to_ldm, to_kohya
        layers = self._peft_layers(parts)
        name = self.config.output_name
        diff_dir = self.run_dir / "diffusers"
        tmp = self.run_dir / ".diffusers.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs: dict[str, Any] = {}
        for comp, st in layers.items():
            kwargs[f"{comp}_lora_layers"] = st if comp == "transformer" else _diffusers_layers(comp, st)
            peft_config = getattr(parts[comp], "peft_config", {}).get("default")
            if peft_config is not None:
                kwargs[f"{comp}_lora_adapter_metadata"] = peft_config.to_dict()
        type(self.pipe).save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        shutil.rmtree(diff_dir, ignore_errors=True)
        tmp.rename(diff_dir)
        diffusers_file = diff_dir / "pytorch_lora_weights.safetensors"
        kohya_file: Path | None = self.run_dir / f"{name}.kohya.safetensors"
        self.kohya_note = ""
        if self.arch in DIT_ARCHS:
            denoiser = self.objective.denoiser
            widths = {n: int(m.out_features) for n, m in denoiser.named_modules()
                      if isinstance(getattr(m, "out_features", None), int)}
            try:
                kohya = dit_to_kohya(self.arch, layers["transformer"], alpha=self.alpha, out_features=widths,
                                     num_layers=int(denoiser.config.num_layers))
            except NoKohyaName as exc:
                kohya = None
                self.kohya_note = f"no kohya file ({exc.args[0]} has no name in the original layout)"
            except ValueError as exc:
                kohya = None
                self.kohya_note = f"no kohya file ({exc})"
        else:
            kohya = to_kohya(layers, alpha=self.alpha,
                             unet_name_map=sdxl_unet_module_to_ldm(self.pipe.unet.config) if self.sdxl else None)
        if kohya is not None:
            save_file(kohya, str(kohya_file), metadata=self.kohya_metadata(steps))
        else:
            kohya_file.unlink(missing_ok=True)
            kohya_file = None
        self.loras_dir.mkdir(parents=True, exist_ok=True)
        registered = self.loras_dir / f"{name}.safetensors"
        diffusers_registered = self.arch == "house" or self.arch in DIT_ARCHS
        source = diffusers_file if diffusers_registered else kohya_file
        part = registered.with_name(registered.name + ".part")
        shutil.copyfile(source, part)
        part.replace(registered)
        return {"lora": str(registered), "kohya": str(kohya_file) if kohya_file else None,
                "diffusers": str(diffusers_file), "registered_format": "diffusers" if diffusers_registered else "kohya"}

    @torch.no_grad()
    def render_samples(self, path: Path, seed: int | None = None) -> Path:
        from ..eval.grid import labelled_grid
        pipe, cfg = self.pipe, self.config
        modules = [m for m in (self.objective.denoiser, pipe.text_encoder) if m is not None]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        images = []
        for k, prompt in enumerate(cfg.sample_prompts):
            g = torch.Generator().manual_seed((cfg.seed if seed is None else seed) + k)
            kw: dict[str, Any] = dict(num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_cfg,
                                      height=self.resolution, width=self.resolution, generator=g)
            kw.update(self.objective.sample_kwargs(prompt))
            images.append(pipe(**kw).images[0])
        for m, w in zip(modules, was):
            m.train(w)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = labelled_grid(list(zip(images, cfg.sample_prompts)), min(4, len(images)),
                             title=f"{cfg.output_name} ({cfg.trigger_word or 'no trigger'})")
        grid.save(path)
        return path

    def _kohya_layout(self) -> str:
        return {"flux": ", BFL double_blocks/single_blocks names, q/k/v fused",
                "sd3": ", MMDiT joint_blocks names, q/k/v fused"}.get(self.arch, "")

    def write_card(self, summary: dict[str, Any], losses: list[float]) -> Path:
        plot = loss_plot(losses, self.run_dir / "loss.png") if losses else None
        samples = sorted((self.run_dir / "samples").glob("step-*.png")) if (self.run_dir / "samples").is_dir() else []
        cfg = self.config
        lines = [f"# LoRA {cfg.output_name}", "",
                 f"Trained by `imagesmith train lora` on `{cfg.base_model}` ({self.arch}).", "",
                 "| | |", "|---|---|",
                 f"| Trigger word | {cfg.trigger_word or '-'} |",
                 f"| Use | `--lora {cfg.output_name}:1.0` or `<lora:{cfg.output_name}:1>` in a prompt |",
                 f"| Network | LoRA rank {cfg.rank}, alpha {self.alpha:g}, {self.objective.label} "
                 f"{', '.join(cfg.target_modules)}{'; text encoder too' if cfg.train_text_encoder else ''} |",
                 f"| Objective | {summary['objective']} |",
                 f"| Dataset | {summary['images']} images ({summary['items_with_repeats']} with repeats) from "
                 f"`{cfg.dataset}`; {summary['resolution']} px, buckets {', '.join(summary['buckets'])} "
                 f"(sides in multiples of {summary['bucket_step']}) |",
                 f"| Training | {summary['steps']} steps x batch {cfg.batch_size} x accumulation "
                 f"{cfg.gradient_accumulation}, AdamW lr {cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup "
                 f"{cfg.warmup_steps}), caption dropout {cfg.caption_dropout:g}, flips {cfg.flip} |",
                 f"| Loss | {summary['first_loss']} -> {summary['last_loss']} (means of the first and last quarter, at most 10 steps each) |",
                 f"| Wall time | {summary['wall_seconds']} s on {summary['hardware']} |",
                 f"| Files | `{summary['lora']}` (registered, {summary['registered_format']} keys); "
                 + (f"`{Path(summary['kohya']).name}` (kohya/WebUI{self._kohya_layout()}); " if summary['kohya']
                    else f"{getattr(self, 'kohya_note', 'no kohya file')}; ")
                 + "`diffusers/pytorch_lora_weights.safetensors` |",
                 "", "## Config", "", "```json", cfg.model_dump_json(indent=1), "```", ""]
        if plot:
            lines += ["## Loss", "", "![loss](loss.png)", ""]
        if samples:
            lines += ["## Samples", ""] + [f"![{p.stem}](samples/{p.name})" for p in samples[-3:]] + [""]
        card = self.run_dir / "TRAINING_CARD.md"
        card.write_text("\n".join(lines))
        return card


def _diffusers_layers(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys -> what diffusers' LoRA scripts save (``convert_state_dict_to_diffusers``). Text-encoder
    modules that mapping does not name (BERT's query/key/value in house-ldm) get its generic
    ``lora_linear_layer.down/up`` form, which ``load_lora_weights`` reads back."""
    from diffusers.utils import convert_state_dict_to_diffusers
    out = convert_state_dict_to_diffusers(state)
    if component.startswith("text_encoder"):
        out = {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
               for k, v in out.items()}
    return out


def loss_plot(losses: list[float], path: Path, size: tuple[int, int] = (640, 320)) -> Path:
    """The loss curve (raw, and a 20-step moving average) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw
    w, h = size
    pad = 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    n = max(1, len(losses) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * i / n, h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)
    d.rectangle([pad, pad, w - pad, h - pad], outline="#999999")
    d.line([xy(i, v) for i, v in enumerate(losses)], fill="#9fb7d9", width=1)
    k = 20
    avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    d.line([xy(i, v) for i, v in enumerate(avg)], fill="#1f4e99", width=2)
    d.text((pad, 10), f"loss (step 1..{len(losses)}; line: {k}-step mean)", fill="black")
    d.text((4, pad - 6), f"{hi:.3f}", fill="black")
    d.text((4, h - pad - 6), f"{lo:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def train_lora(config_path: str | Path, settings: Settings | None = None) -> dict[str, Any]:
    """The CLI's entry: config file -> trained, saved, registered LoRA; returns the summary."""
    config = LoraTrainConfig.from_yaml(config_path)
    return LoraTrainer(config, settings).train()
