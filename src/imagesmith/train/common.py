"""Helpers shared by imagesmith's trainers: seeding, device choice, resumable checkpoints, loss logs, EMA.

Checkpoints are a folder written atomically (a temporary sibling renamed into place), holding only
safetensors and JSON, never pickles:

- ``model.safetensors`` - the trained module's state dict;
- ``ema.safetensors`` - the EMA shadow weights (when there is an EMA);
- ``optimizer.safetensors`` + ``state.json["optimizer"]`` - the optimizer's per-parameter tensors, and its
  param_groups as JSON;
- ``rng.safetensors`` - torch's global CPU RNG, the CUDA RNG when present and the trainer's own
  ``torch.Generator`` (batch order, noise, timesteps and caption dropout all come from it);
- ``state.json`` - step, wall seconds so far, the LR scheduler's state dict and anything else the trainer
  adds (``extra``).

Resuming restores all of them, so an interrupted run continued to the end gives the same weights as an
uninterrupted one (on the same device and thread count)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..models.cache import pick_device  # noqa: F401  one device rule everywhere (cuda > mps > cpu)

CHECKPOINT_DIR = "checkpoint"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- seeds, devices
def seed_everything(seed: int) -> torch.Generator:
    """Seed python and torch (CPU and CUDA) and return a CPU ``torch.Generator`` seeded with ``seed`` for the
    trainer's own draws."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def hardware_note(device: torch.device) -> str:
    """A short human description of where training ran, for the model card."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    return f"CPU: {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier for ``LambdaLR``: linear warmup over ``warmup`` steps, then cosine down to ``min_ratio``."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# ------------------------------------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of a module's floating-point parameters (kept in float32).

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the
    random initialisation."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = self.current_decay()
        # one fused lerp over all tensors (shadow += (1 - d) * (p - shadow)): a per-parameter loop costs two
        # kernel launches per tensor, which dominates a small model's step on a GPU
        names = list(self.shadow)
        params = dict(module.named_parameters())
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(dtype=p.dtype, device=p.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for k in self.shadow:
            self.shadow[k] = tensors[k].float().to(self.shadow[k].device).clone()
        self.updates = updates


# ------------------------------------------------------------------------------------------ loss logs
@dataclass
class LossLog:
    """Append-only JSONL log of training records (one object a line: step, loss, lr, seconds...)."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.is_file():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run starts from)."""
        kept = [r for r in self.records if int(r.get("step", 0)) <= step]
        if len(kept) != len(self.records):
            self.records = kept
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def losses(self, key: str = "loss") -> list[float]:
        return [float(r[key]) for r in self.records if key in r]


# --------------------------------------------------------------------------------------- checkpoints
def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                    wall_seconds: float, ema: EMA | None = None, extra: dict[str, Any] | None = None,
                    budget: TimeBudget | None = None) -> Path:
    """Write ``folder/checkpoint`` atomically (see the module docstring) and return it. A ``budget`` keeps its
    :meth:`TimeBudget.state` in ``extra`` so :func:`load_checkpoint` can continue it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=folder))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        sched = scheduler.state_dict()  # LambdaLR keeps None for plain-function lambdas: JSON-safe
        state = {"step": step, "wall_seconds": wall_seconds, "optimizer": opt_meta, "scheduler": sched,
                 "ema_updates": ema.updates if ema is not None else None, "python_random": _py_random_state(),
                 "extra": {**(extra or {}), **(budget.state() if budget is not None else {})}}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        old = folder / (CHECKPOINT_DIR + ".old")
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _py_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                    ema: EMA | None = None, budget: TimeBudget | None = None) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote into the given objects (a ``budget`` continues where it
    was); returns ``state.json``."""
    ckpt = Path(folder) / CHECKPOINT_DIR
    state = json.loads((ckpt / "state.json").read_text())
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
    if ema is not None:
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(device)), state["ema_updates"])
    _optimizer_from_flat(optimizer, load_file(str(ckpt / "optimizer.safetensors"), device=str(device)),
                         state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    if budget is not None:
        budget.restore(state)
    return state


# ------------------------------------------------------------------------------------------ progress
def progress(total: int, initial: int, desc: str, enabled: bool = True, budget: TimeBudget | None = None):
    """A tqdm bar (steps, it/s shown by tqdm; the trainer adds loss and images/s as postfix).

    With a ``budget`` that has seconds, the bar's total is the step count the budget will reach at this
    process's step rate (re-estimated at every update, never past ``total``), so its percentage and ETA say
    when the run ends: a 4,800 s budget with a 100,000-step ceiling showed an ETA of 28 hours before."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")
    if budget is not None and budget.seconds:
        plain_update = bar.update

        def update(n: int = 1):
            bar.total = budget.final_step(bar.n + n, initial) or bar.total
            return plain_update(n)
        bar.update = update
    return bar


class Stopwatch:
    """Wall seconds accumulated across resumed runs."""

    def __init__(self, already: float = 0.0):
        self.already = already
        self.started = time.perf_counter()

    @property
    def total(self) -> float:
        return self.already + time.perf_counter() - self.started


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------- time budgets
class TimeBudget:
    """Train for a wall-clock budget instead of (or as well as) a step count, e.g. on a rented GPU.

    ``progress(step)`` is the fraction of the run done: ``step / total_steps``, or, when ``seconds`` is set,
    the larger of that and the elapsed fraction of the budget, so a cosine schedule driven by it reaches its
    floor when the budget runs out whatever the step rate is. ``done(step)`` says when to stop. With a budget
    an interrupted-and-resumed run is NOT bit-identical to an uninterrupted one (the schedule follows the
    clock); without one this is the plain step schedule.

    The budget is for the whole run, across interruptions: a trainer passes it to :func:`save_checkpoint` and
    :func:`load_checkpoint` (``budget=``), which keep :meth:`state` in the checkpoint's ``extra`` and
    :meth:`restore` it, so a resumed run gets only what is left of the budget and its cosine carries on from
    where it was (a fresh budget would restart the cosine at the top)."""

    def __init__(self, total_steps: int, seconds: float | None = None):
        self.total_steps = max(1, int(total_steps))
        self.seconds = float(seconds) if seconds else None
        self.spent = 0.0  # seconds of steps before this process (restored from a checkpoint)
        self.p0: float | None = None  # progress where the cosine began (end of warmup)
        self.started = time.perf_counter()

    def start(self) -> None:
        """Start the clock: call right before the first step (data caches built before it do not count)."""
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (its ``extra``) so :meth:`restore` can continue the budget."""
        return {"budget_seconds": self.elapsed(), "budget_p0": self.p0}

    def restore(self, checkpoint_state: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint's ``state.json`` (older checkpoints without the keys: a fresh
        budget, as before)."""
        extra = checkpoint_state.get("extra") or {}
        self.spent = float(extra.get("budget_seconds", 0.0))
        self.p0 = extra.get("budget_p0")

    def progress(self, step: int) -> float:
        p = step / self.total_steps
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return min(1.0, p)

    def final_step(self, step: int, first: int) -> int | None:
        """The step this budget will stop at, from the rate of this process (steps ``first``..``step`` over the
        seconds since :meth:`start`), never past ``total_steps``; None without seconds or before a step."""
        run_s = self.elapsed() - self.spent
        if not self.seconds or step <= first or run_s <= 0:
            return None
        left = max(0.0, self.seconds - self.elapsed())
        return int(min(self.total_steps, step + left * (step - first) / run_s))

    def done(self, step: int) -> bool:
        return step >= self.total_steps or (self.seconds is not None and self.elapsed() >= self.seconds)

    def lr_factor(self, warmup: int, min_ratio: float = 0.1):
        """A ``LambdaLR`` factor: linear warmup over ``warmup`` steps, then cosine over :meth:`progress`
        (from where the warmup ended) down to ``min_ratio``."""
        if self.seconds is None:
            return warmup_cosine(warmup, self.total_steps, min_ratio)

        def factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            p = self.progress(step)
            if self.p0 is None:
                self.p0 = p
            span = max(1e-9, 1.0 - self.p0)
            q = min(1.0, max(0.0, (p - self.p0) / span))
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))
        return factor


# ------------------------------------------------------------------------------------ parallel data
class _Picked(torch.utils.data.Dataset):
    """``dataset`` seen through a list of indices (what a DataLoader worker renders)."""

    def __init__(self, dataset, indices: list[int], keys: tuple[str, ...]):
        self.dataset, self.indices, self.keys = dataset, indices, keys

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        item = self.dataset[self.indices[k]]
        return {key: item[key] for key in self.keys}


def _as_list(batch):
    return batch


def render_items(dataset, indices: Iterable[int], *, keys: tuple[str, ...], workers: int = 0,
                 chunk: int = 64) -> Iterable[dict[str, Any]]:
    """``dataset[i]`` (only ``keys``) for each index, in order. ``workers > 0`` renders in that many
    worker processes (a ``torch.utils.data.DataLoader``): the items are the same, only faster."""
    picked = _Picked(dataset, list(indices), keys)
    if workers <= 0:
        for k in range(len(picked)):
            yield picked[k]
        return
    loader = torch.utils.data.DataLoader(picked, batch_size=chunk, shuffle=False, num_workers=workers,
                                         collate_fn=_as_list, prefetch_factor=4, persistent_workers=False)
    done = 0
    try:
        for batch in loader:
            for item in batch:
                yield item
                done += 1
    except RuntimeError as exc:  # workers that cannot share memory (a tiny /dev/shm): finish in-process
        log.warning("render workers failed (%s); rendering the remaining %d items in-process", exc,
                    len(picked) - done)
        for k in range(done, len(picked)):
            yield picked[k]


class StepBatches(torch.utils.data.Dataset):
    """Item ``k`` = the stacked ``keys`` of ``batch_size`` dataset samples for training step ``first + k``;
    the sample indices come from a generator seeded by (``seed``, step) alone, so a resumed run draws the same
    batches as an uninterrupted one, and DataLoader workers can render steps ahead of the trainer."""

    def __init__(self, dataset, *, first: int, last: int, batch_size: int, seed: int,
                 keys: tuple[str, ...] = ("image", "mask")):
        self.dataset, self.first, self.last = dataset, int(first), int(last)
        self.batch_size, self.seed, self.keys = int(batch_size), int(seed), keys

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def indices(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(len(self.dataset), (self.batch_size,), generator=g).tolist()

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        items = [self.dataset[i] for i in self.indices(self.first + k)]
        return tuple(torch.stack([it[key] for it in items]).float() for key in self.keys)


def step_batches(dataset, *, first: int, last: int, batch_size: int, seed: int, workers: int,
                 keys: tuple[str, ...] = ("image", "mask")) -> Iterable[tuple[torch.Tensor, ...]]:
    """Iterate :class:`StepBatches` for steps ``first .. last - 1``, rendered by ``workers`` processes
    (0: in this process)."""
    ds = StepBatches(dataset, first=first, last=last, batch_size=batch_size, seed=seed, keys=keys)
    if workers <= 0:
        yield from (ds[k] for k in range(len(ds)))
        return
    done = 0
    try:
        for batch in torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                                 prefetch_factor=4, persistent_workers=False):
            yield batch
            done += 1
    except RuntimeError as exc:  # as in render_items
        log.warning("batch workers failed (%s); rendering the remaining batches in-process", exc)
        yield from (ds[k] for k in range(done, len(ds)))
