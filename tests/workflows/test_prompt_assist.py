"""`imagesmith prompt expand`: relevant, varied, reproducible prompts from the packaged sentence encoder."""

from __future__ import annotations

import json

import pytest

from imagesmith.core.errors import BadRequest
from imagesmith.workflows.prompt_assist import VOCAB, PromptAssistant

from test_cli import run_cli


@pytest.fixture(scope="module")
def assistant():
    return PromptAssistant()


def test_expansions_are_relevant_distinct_and_reproducible(assistant):
    a = assistant.expand("a white cat, 3D", n=5, seed=3)
    b = assistant.expand("a white cat, 3D", n=5, seed=3)
    c = assistant.expand("a white cat, 3D", n=5, seed=4)
    assert a == b and a != c and len({r["prompt"] for r in a}) == 5
    assert all(r["prompt"].startswith("a white cat, 3D, ") and set(r["added"]) == set(VOCAB) for r in a)
    best = [p for p, _ in assistant.ranked("a white cat, 3D", "style")[:3]]
    assert any("3D" in p for p in best)  # the request's own words steer the ranking
    assert assistant.ranked("portrait of an old fisherman", "camera")[0][1] >= assistant.ranked(
        "portrait of an old fisherman", "camera")[-1][1]
    with pytest.raises(BadRequest):
        assistant.expand("   ")


def test_cli_json(capsys):
    code, out, err = run_cli(capsys, "prompt", "expand", "a bowl of ramen", "--n", "2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(0 <= v["relevance"] <= 1 for r in rows for v in r["added"].values())
