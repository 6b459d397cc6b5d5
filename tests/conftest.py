"""Shared fixtures: a tiny IMAGESMITH_HOME with random models of every architecture, built once per
session (a few seconds). See tests/fixtures/tiny.py for what it holds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# never reach the Hugging Face hub from tests: every load must work from local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tiny.TinyHome:
    """TinyHome(settings, paths): every tiny model, by registry name -> path on disk."""
    return tiny.build_tiny_home(tmp_path_factory.mktemp("imagesmith-home"))


@pytest.fixture(scope="session")
def tiny_home(tiny_models) -> "tiny.Settings":
    """Settings whose home holds the tiny models (tiny-sd15, tiny-sd15-single, tiny-sdxl, tiny-sdxl-single,
    tiny-sd3, tiny-sd3-single, tiny-flux, tiny-flux-single, tiny-lora-peft, tiny-lora-kohya, tiny-lora-sdxl-peft,
    tiny-lora-sdxl-kohya, tiny-vae, tiny-vae-single, tiny-controlnet, tiny-controlnet-single, tiny-embedding)."""
    return tiny_models.settings
