"""What every benchmark records: the machine it ran on, and the report written to benchmarks/results."""

from __future__ import annotations

import json
import os
import platform
import sys
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
