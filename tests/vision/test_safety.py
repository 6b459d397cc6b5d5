"""The safety gate: prompt policy (terms and concepts), open_nsfw on images, and the CLI and service hooks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesmith.vision.safety import SafetyGate, SafetyPolicy

from fixtures.cli import run_cli


@pytest.fixture(scope="module")
def gate():
    return SafetyGate()


def test_prompt_policy_terms_and_concepts(gate):
    assert gate.check_prompt("a red apple on a wooden table").flagged is False
    assert gate.check_prompt("a sneaker on a wooden table, product shot").flagged is False
    term = gate.check_prompt("a NUDE statue")
    assert term.flagged and term.reason == "blocked term 'nude'"
    concept = gate.check_prompt("explicit sexual scene")
    assert concept.flagged and "sexually explicit content" in concept.reason and concept.score >= 0.45
    assert gate.check_prompt("a scene of brutal bloody violence with mutilated bodies").flagged
    own = SafetyGate(SafetyPolicy(blocked_terms=["teapot"], blocked_concepts=[]))
    assert own.check_prompt("a teapot").flagged and not own.check_prompt("a NUDE statue").flagged


def test_images_are_scored_and_blurred(gate):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    v = gate.check_image(image)
    assert not v.flagged and 0 <= v.score < 0.8
    strict = SafetyGate(SafetyPolicy(image_threshold=0.0))
    assert strict.check_image(image).flagged
    blurred = np.asarray(strict.apply(image), np.float32)
    assert blurred.std() < 0.5 * np.asarray(image, np.float32).std()


def test_cli_safety_refuses_a_blocked_prompt(tiny_home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))
    out = tmp_path / "x.png"
    args = ["--model", "tiny-sd15", "-W", "64", "-H", "64", "--steps", "2", "--safety", "-o", str(out)]
    code, _, err = run_cli(capsys, "generate", "a naked figure", *args)
    assert code == 2 and "blocked term 'naked'" in err and not out.exists()
    code, _, err = run_cli(capsys, "generate", "a red apple", *args)
    assert code == 0 and out.exists(), err
