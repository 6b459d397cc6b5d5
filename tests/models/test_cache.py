"""The model cache: LRU order, RAM budget, pinning, hit/miss accounting."""

import torch

from imagesmith.core.settings import Settings
from imagesmith.models.cache import ModelCache, model_bytes, pick_device, pick_dtype


def blob(mb: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(mb * 1024 * 1024 // 4))
    return m


def test_hit_does_not_reload(tmp_path):
    cache = ModelCache(Settings(home=tmp_path), ram_budget_bytes=100 * 2**20)
    loads = []
    a = cache.get(("a",), lambda: loads.append(1) or blob(1))
    b = cache.get(("a",), lambda: loads.append(1) or blob(1))
    assert a is b and len(loads) == 1
    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.loads == 1


def test_lru_eviction_under_ram_budget(tmp_path):
    cache = ModelCache(Settings(home=tmp_path), ram_budget_bytes=10 * 2**20)
    cache.get(("a",), lambda: blob(4))
    cache.get(("b",), lambda: blob(4))
    cache.get(("a",), lambda: blob(4))  # touch a: b is now least recently used
    cache.get(("c",), lambda: blob(4))  # 12 MB > 10 MB: evict b
    assert ("a",) in cache and ("c",) in cache and ("b",) not in cache
    assert cache.stats.evictions == 1
    assert cache.used_bytes("cpu") <= 10 * 2**20


def test_pinned_and_busy_entries_are_not_evicted(tmp_path):
    cache = ModelCache(Settings(home=tmp_path), ram_budget_bytes=6 * 2**20)
    cache.get(("pinned",), lambda: blob(4), pin=True)
    busy = cache.get(("busy",), lambda: blob(1))
    with busy.use():  # a job is running on it
        cache.get(("new",), lambda: blob(4))
    assert ("pinned",) in cache and ("busy",) in cache


def test_model_bytes_counts_pipeline_components():
    class Pipe:
        components = {"unet": blob(2), "vae": blob(1), "tokenizer": object()}
    assert model_bytes(Pipe()) == 3 * 2**20


def test_device_and_dtype_auto():
    dev = pick_device("auto")
    assert dev.type in ("cuda", "mps", "cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_device("cpu").type == "cpu"
