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


def test_a_miss_loads_once_while_other_threads_wait(tmp_path):
    """Worker threads of one process share the cache: two asking for the same model at once get one load."""
    import threading
    import time
    cache = ModelCache(Settings(home=tmp_path), ram_budget_bytes=10**9)
    calls = []

    def slow():
        calls.append(threading.get_ident())
        time.sleep(0.3)
        return torch.nn.Linear(8, 8)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(("m",), slow))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(e) for e in got}) == 1
    assert (cache.stats.loads, cache.stats.misses, cache.stats.hits) == (1, 1, 2)


def test_a_failed_load_lets_a_waiting_caller_try_again(tmp_path):
    import threading
    import time
    cache = ModelCache(Settings(home=tmp_path), ram_budget_bytes=10**9)
    attempts, active, most = [], [], []

    def flaky():
        attempts.append(1)
        active.append(1)
        most.append(len(active))
        time.sleep(0.2)
        active.pop()
        if len(attempts) == 1:
            raise OSError("disk hiccup")
        return torch.nn.Linear(2, 2)
    errors, entries = [], []

    def ask():
        try:
            entries.append(cache.get(("f",), flaky))
        except OSError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(attempts) == 2 and len(errors) == 1 and len(entries) == 1 and ("f",) in cache
    assert max(most) == 1  # the second caller waited for the first load, then loaded after it failed


def test_vision_helpers_are_sized_from_the_modules_they_hold():
    class Helper:
        def __init__(self):
            self.encoder = (torch.nn.Linear(10, 10), "tokenizer")
            self.head = torch.nn.Linear(10, 2)
    assert model_bytes(Helper()) == (10 * 10 + 10 + 10 * 2 + 2) * 4


def test_worker_threads_of_one_process_share_one_cache_and_vision_models_live_in_it(tiny_home, tmp_path):
    from fixtures.tiny import home_with_tiny_sd15
    from imagesmith.core.progress import CancelToken
    from imagesmith.serve.store import JobStore
    from imagesmith.serve.worker import Worker
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    cache = ModelCache(settings)
    a, b = Worker(store, settings, cache=cache), Worker(store, settings, cache=cache)
    gen = {"type": "generate", "request": {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64,
                                           "steps": 2, "seed": 1, "sampler_name": "Euler"}}
    a.execute(gen, tmp_path / "a", lambda e: None, CancelToken())
    b.execute(gen, tmp_path / "b", lambda e: None, CancelToken())
    pipelines = [k for k in cache.keys() if k[0] == "pipeline"]
    assert len(pipelines) == 1 and a.engine.cache is b.engine.cache and b.loaded_models() == ("tiny-sd15",)
    assert a._loaded("imagenet") is b._loaded("imagenet")  # one classifier for the process, in the same cache
    assert ("vision", "imagenet") in cache.keys()
    assert a.safety is not None and ("safety", "nsfw") in cache.keys()  # the safety gate's model checked the images
