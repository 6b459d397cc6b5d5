"""Workers as Ray actors: ``imagesmith serve --ray auto|ADDRESS`` (or :func:`start_ray_workers`).

Each actor runs one :class:`~imagesmith.serve.worker.Worker` against the shared job store (PostgreSQL across
machines; the home's SQLite on one machine). Jobs are pulled, not pushed: a worker claims the queued job for a
model it already holds before any other (the store's claim orders by model affinity, then priority, then age),
so work lands where its model is loaded without a central router. An actor asks Ray for one GPU when the
cluster has GPUs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _actor_class():
    import ray

    @ray.remote
    class RayWorker:
        def __init__(self, database_url: str, home: str, worker_id: str, lease_s: float = 30.0,
                     batch: int | None = None):
            from ..core.settings import Settings
            from .store import JobStore
            from .worker import Worker
            import threading
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            # the deployment's environment applies (IMAGESMITH_OUTPUT_STORE, ...), under this actor's own home
            self.worker = Worker(JobStore(database_url), Settings.from_env(home=Path(home)), worker_id=worker_id,
                                 lease_s=lease_s, batch=batch)
            self.thread = threading.Thread(target=self.worker.run_forever, kwargs={"poll_s": 0.2}, daemon=True)
            self.thread.start()

        def status(self) -> dict[str, Any]:
            return {"id": self.worker.id, "alive": self.thread.is_alive(),
                    "loaded_models": list(self.worker.loaded_models()),
                    "node_id": ray.get_runtime_context().get_node_id(), "home": str(self.worker.settings.home)}

        def stop(self) -> bool:
            self.worker.stopping.set()
            self.thread.join(30)
            return not self.thread.is_alive()

    return RayWorker


def start_ray_workers(address: str, database_url: str, home: str, count: int = 1, *, lease_s: float = 30.0,
                      init_kwargs: dict | None = None, batch: int | None = None,
                      resources: dict[str, float] | None = None) -> list:
    """Connect to (``address``) or start (``auto``/``local``) a Ray cluster and start ``count`` worker actors.
    ``home``: the actors' home on the node they land on; ``resources``: Ray custom resources an actor needs (to
    place it on a given node)."""
    import ray
    if not ray.is_initialized():
        kwargs = dict(init_kwargs or {})
        if address not in ("auto", "local"):
            kwargs["address"] = address
        elif address == "auto" and os.environ.get("RAY_ADDRESS"):
            kwargs["address"] = "auto"
        ray.init(**kwargs)
    gpus = ray.cluster_resources().get("GPU", 0)
    cls = _actor_class()
    options = {"num_gpus": 1} if gpus >= count else {"num_cpus": 1}
    if resources:
        options["resources"] = dict(resources)
    return [cls.options(**options).remote(database_url, home, f"ray-{i}", lease_s, batch) for i in range(count)]
