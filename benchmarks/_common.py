"""What every benchmark records: the machine it ran on, and the report written to benchmarks/results."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def machine(**extra) -> dict:
    import torch
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **extra}


def write_report(report: dict, out: Path, indent: int = 2) -> None:
    """Write ``report`` as JSON to ``out`` (folders made) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=indent) + "\n")
    print(json.dumps(report, indent=indent))


@contextmanager
def house_server(prefix: str):
    """A live `imagesmith serve` on the shipped house model in this process (a throwaway home, one worker thread,
    no safety gate): yields (httpx client, port); stops both after."""
    import httpx
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures.live import free_port
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine
    from imagesmith.serve.app import create_app
    from imagesmith.serve.store import JobStore
    from imagesmith.serve.worker import Worker

    home = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings(home=home)
    settings.ensure_home()
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    worker = Worker(store, settings, engine=Engine(settings, device="cpu"), safety=False, batch=1)
    threading.Thread(target=worker.run_forever, kwargs={"poll_s": 0.02}, daemon=True).start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, store, safety=False), host="127.0.0.1", port=port,
                                          log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300), port
    finally:
        server.should_exit = True
        worker.stopping.set()
