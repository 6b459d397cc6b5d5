"""`imagesmith prompt expand`: relevant, varied, reproducible prompts from the packaged sentence encoder."""

from __future__ import annotations

import json

import pytest

from imagesmith.core.errors import BadRequest
from imagesmith.workflows.prompt_assist import VOCAB, PromptAssistant

from fixtures.cli import run_cli


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


def test_midjourney_parameters_stay_at_the_end_of_every_expansion(assistant):
    """--ar/--no/--seed are not words to expand: each prompt ends with them, and the engine still reads them."""
    from imagesmith.engine.prompts import extract_prompt_params
    rows = assistant.expand("a white cat, 3D --ar 9:16 --no blur", n=3, seed=1)
    plain = assistant.expand("a white cat, 3D", n=3, seed=1)
    for r, p in zip(rows, plain):
        assert r["prompt"] == p["prompt"] + " --ar 9:16 --no blur" and r["parameters"] == "--ar 9:16 --no blur"
        core, params = extract_prompt_params(r["prompt"])
        assert core == p["prompt"] and params.aspect == 9 / 16 and params.no == "blur"
    with pytest.raises(BadRequest, match="--ar takes W:H"):
        assistant.expand("a cat --ar 9:0")
    with pytest.raises(BadRequest, match="before its --parameters"):
        assistant.expand("--ar 1:1")


def test_cli_json(capsys):
    code, out, err = run_cli(capsys, "prompt", "expand", "a bowl of ramen", "--n", "2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(0 <= v["relevance"] <= 1 for r in rows for v in r["added"].values())


def test_prompt_expand_uses_a_configured_llm_and_falls_back_offline(capsys, monkeypatch):
    """With IMAGESMITH_LLM_URL set, an OpenAI-compatible model writes the prompts; a failing one falls back to the
    offline vocabularies with a note (a fake endpoint on loopback stands in for the LLM)."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fixtures.cli import run_cli
    seen = []

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):
            body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if body["messages"][1]["content"] == "break":
                self.send_response(500)
                self.end_headers()
                return
            answer = {"prompts": [f"a white cat, 3D, prompt {i}, studio light" for i in range(3)]}
            data = _json.dumps({"choices": [{"message": {"content": "```json\n" + _json.dumps(answer) + "\n```"}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("IMAGESMITH_LLM_URL", f"http://127.0.0.1:{server.server_port}")
        code, out, err = run_cli(capsys, "prompt", "expand", "a white cat, 3D", "--n", "3", "--json")
        assert code == 0, err
        got = _json.loads(out)
        assert [g["source"] for g in got] == ["llm"] * 3 and got[2]["prompt"].endswith("prompt 2, studio light")
        assert seen[0]["messages"][1]["content"] == "a white cat, 3D" and "JSON" in seen[0]["messages"][0]["content"]
        code, out, err = run_cli(capsys, "prompt", "expand", "break", "--n", "2", "--json")
        assert code == 0, err
        got = _json.loads(out)
        assert [g["source"] for g in got] == ["offline"] * 2 and "HTTPError" in got[0]["llm_error"]
        assert "the LLM failed" in err
    finally:
        server.shutdown()
