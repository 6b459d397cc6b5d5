"""Loaded models, least-recently-used first out, under RAM and VRAM budgets.

Document 4 ran FLUX plus a VLM in 24 GB by loading just in time and unloading after use; this cache
does that automatically: `get()` hands back a warm model or loads it, evicting the least recently used
models until the new one fits. On a GPU an evicted model first moves to RAM (cheap to bring back), and
is dropped only when RAM is short too."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.settings import Settings


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 16 * 1024**3


def pick_device(preference: str = "auto") -> torch.device:
    """cuda, then mps, then cpu (or what the user asked for)."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU (CPU half precision is slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def modules_of(obj: Any) -> list[torch.nn.Module]:
    """The torch modules a cached value holds: itself, a pipeline's components, or (vision helpers: captioners,
    classifiers, CLIPs) the modules among its attributes, one level down, tuples and lists included."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, torch.nn.Module)]
    found: list[torch.nn.Module] = []
    for value in getattr(obj, "__dict__", {}).values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(item, torch.nn.Module):
                found.append(item)
    return found


def model_bytes(obj: Any) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules_of(obj):
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class CacheEntry:
    key: tuple
    value: Any
    size_bytes: int
    device: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    # per-model state the engine keeps beside the model (loaded LoRA adapters, pipeline variants)
    state: dict = field(default_factory=dict)
    pinned: bool = False  # never evicted (models handed in by the caller cannot be reloaded)
    users: int = 0        # jobs running on it right now: never evicted or offloaded meanwhile
    last_used: float = field(default_factory=time.monotonic)

    @contextmanager
    def use(self):
        """Run one job on this model: exclusive (diffusers pipelines are not thread-safe) and
        protected from eviction, also against loads the same job makes (a VAE, a ControlNet)."""
        with self.lock:
            self.users += 1
            try:
                yield self.value
            finally:
                self.users -= 1


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    offloads: int = 0
    load_seconds: float = 0.0


class ModelCache:
    """LRU of loaded models. Keys are tuples naming what was loaded (path, dtype, device, ...)."""

    def __init__(self, settings: Settings | None = None, *, ram_budget_bytes: int | None = None,
                 vram_budget_bytes: int | None = None):
        settings = settings or Settings.from_env()
        self.ram_budget = ram_budget_bytes or settings.ram_budget_bytes or int(total_ram_bytes() * 0.6)
        vram = vram_budget_bytes or settings.vram_budget_bytes
        if vram is None and torch.cuda.is_available():
            vram = int(torch.cuda.get_device_properties(0).total_memory * 0.85)
        self.vram_budget = vram or 0
        self._entries: "OrderedDict[tuple, CacheEntry]" = OrderedDict()
        self._loading: dict[tuple, threading.Event] = {}  # keys being loaded right now: one load per key
        self._lock = threading.RLock()
        self.stats = CacheStats()

    # -- queries
    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def keys(self) -> list[tuple]:
        return list(self._entries)

    def used_bytes(self, device_type: str) -> int:
        return sum(e.size_bytes for e in self._entries.values() if e.device.split(":")[0] == device_type)

    # -- the one entry point
    def get(self, key: tuple, loader: Callable[[], Any], *, device: torch.device | str = "cpu",
            pin: bool = False) -> CacheEntry:
        """The warm entry for `key`, or load it with `loader()` (which returns a model on `device`). A miss loads
        once: callers asking for the same key meanwhile wait for that load (threads of one process share this
        cache), and load it themselves only if it failed."""
        device = str(device)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self.stats.hits += 1
                    self._entries.move_to_end(key)
                    entry.last_used = time.monotonic()
                    if entry.device != device:  # was offloaded to RAM: bring it back
                        self._make_room(entry.size_bytes, device, exclude=key)
                        _move(entry.value, device)
                        entry.device = device
                    return entry
                pending = self._loading.get(key)
                if pending is None:
                    self.stats.misses += 1
                    done = self._loading[key] = threading.Event()
                    break
            pending.wait()  # another thread is loading it: take its result (or try again if it failed)
        try:
            start = time.perf_counter()
            value = loader()
            size = model_bytes(value)
            with self._lock:
                self._make_room(size, device, exclude=key)
                entry = CacheEntry(key=key, value=value, size_bytes=size, device=device, pinned=pin)
                self._entries[key] = entry
                self.stats.loads += 1
                self.stats.load_seconds += time.perf_counter() - start
                return entry
        finally:
            with self._lock:
                self._loading.pop(key, None)
            done.set()

    def evict(self, key: tuple) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.evictions += 1
            del entry
            _free()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _free()

    # -- internals
    def _make_room(self, size: int, device: str, *, exclude: tuple) -> None:
        dev_type = device.split(":")[0]
        if dev_type != "cpu" and self.vram_budget:
            for key, entry in list(self._entries.items()):
                if self.used_bytes(dev_type) + size <= self.vram_budget:
                    break
                if key == exclude or entry.users or entry.device.split(":")[0] != dev_type:
                    continue
                # offload to RAM rather than drop: bringing it back is a copy, not a load
                _move(entry.value, "cpu")
                entry.device = "cpu"
                self.stats.offloads += 1
            _free()
        for key, entry in list(self._entries.items()):
            if self.used_bytes("cpu") + (size if dev_type == "cpu" else 0) <= self.ram_budget:
                break
            if key == exclude or entry.pinned or entry.users or entry.device != "cpu":
                continue
            del self._entries[key]
            self.stats.evictions += 1
        _free()


def _move(value: Any, device: str) -> None:
    if hasattr(value, "to") and not isinstance(value, torch.nn.Module):
        value.to(device)
        return
    for module in modules_of(value):
        module.to(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
