"""Wildcards and dynamic prompts (engine.wildcards): drawn from the seed, written to the infotext as A1111's
dynamic-prompts extension writes them, refused in one clear line when malformed."""

from __future__ import annotations

import numpy as np
import pytest

from imagesmith.core.errors import BadRequest
from imagesmith.engine.wildcards import expand_prompt


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "colours").mkdir()
    (tmp_path / "fruit.txt").write_text("# fruit\napple\n\npear\n__colours/warm__ plum\n", encoding="utf-8")
    (tmp_path / "colours" / "warm.txt").write_text("red\norange\n", encoding="utf-8")
    (tmp_path / "loop.txt").write_text("__loop__\n", encoding="utf-8")
    return tmp_path


def test_same_seed_same_prompt_and_the_options_all_come_up(folder):
    text = "a {big|small} __fruit__ on a table"
    draws = {expand_prompt(text, seed=s, folder=folder) for s in range(60)}
    assert expand_prompt(text, seed=7, folder=folder) == expand_prompt(text, seed=7, folder=folder)
    assert {"a big apple on a table", "a small pear on a table", "a big red plum on a table",
            "a small orange plum on a table"} <= draws  # nested wildcard in a folder, comments and blanks skipped
    assert all(d.startswith("a ") and "__" not in d and "{" not in d for d in draws)


def test_counts_separators_weights_and_escapes(folder):
    for seed in range(30):
        two = expand_prompt("{2$$a|b|c}", seed=seed, folder=folder).split(", ")
        assert len(two) == 2 and len(set(two)) == 2 and set(two) <= {"a", "b", "c"}
        some = expand_prompt("{1-3$$ and $$x|y|z}", seed=seed, folder=folder).split(" and ")
        assert 1 <= len(some) <= 3 and set(some) <= {"x", "y", "z"}
        assert expand_prompt("{0::never|1::always}", seed=seed, folder=folder) == "always"
    assert expand_prompt(r"\{not a choice\} {a|a}", seed=1, folder=folder) == "{not a choice} a"
    assert expand_prompt("plain (red:1.2) [text]", seed=1, folder=folder) == "plain (red:1.2) [text]"


@pytest.mark.parametrize("text,needle", [
    ("a {red|green", "never closed"), ("{a|b}}", "closes no"), ("{only}", "one option"),
    ("__missing__", "Known: colours/warm, fruit, loop"), ("__../secret__", "not a path"),
    ("__loop__", "nest deeper"), ("{3$$a|b}", "3 of 2"),
])
def test_malformed_or_unknown_is_one_clear_line(folder, text, needle):
    with pytest.raises(BadRequest) as err:
        expand_prompt(text, seed=1, folder=folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_engine_draws_from_the_seed_and_records_the_template(tiny_home):
    from imagesmith.core.metadata import parse_infotext
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.engine.generate import Engine
    folder = tiny_home.home / "wildcards"
    folder.mkdir(exist_ok=True)
    (folder / "fruit.txt").write_text("apple\npear\nplum\n", encoding="utf-8")
    engine = Engine(tiny_home, device="cpu")
    base = dict(model="tiny-sd15", width=64, height=64, steps=2, sampler_name="Euler")
    first = engine.generate(GenerateRequest(prompt="a {red|green} __fruit__", negative_prompt="{blurry|dark}",
                                            seed=5, **base))
    info = parse_infotext(first.records[0].infotext)
    drawn = info["Prompt"]
    assert "{" not in drawn and "__" not in drawn and drawn.startswith("a ")
    assert info["Template"] == "a {red|green} __fruit__" and info["Negative Template"] == "{blurry|dark}"
    again = engine.generate(GenerateRequest(prompt="a {red|green} __fruit__", negative_prompt="{blurry|dark}",
                                            seed=5, **base))
    assert parse_infotext(again.records[0].infotext)["Prompt"] == drawn
    plain = engine.generate(GenerateRequest(prompt=drawn, negative_prompt=info["Negative prompt"], seed=5, **base))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(plain.images[0]))  # the drawn prompt, exactly
    assert "Template" not in parse_infotext(plain.records[0].infotext)


def test_a_bad_wildcard_is_a_4xx_at_submit(tiny_home, tmp_path):
    from fastapi.testclient import TestClient

    from fixtures.tiny import home_with_tiny_sd15
    from imagesmith.serve.app import create_app
    from imagesmith.serve.store import JobStore
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    client = TestClient(create_app(settings, store, safety=False))
    for prompt, needle in (("a __nope__", "__nope__"), ("a {red|green", "never closed")):
        r = client.post("/v1/jobs", json={"type": "generate", "request": {"prompt": prompt, "model": "tiny-sd15"}})
        assert 400 <= r.status_code < 500 and needle in r.json()["error"]["message"], r.text
        r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt})
        assert 400 <= r.status_code < 500 and needle in r.json()["detail"]
    # a malformed prompt edit: a 4xx naming it in the native API
    r = client.post("/v1/jobs", json={"type": "generate", "request": {"prompt": "a [cat:dog:x]", "model": "tiny-sd15"}})
    assert r.status_code == 422 and "[cat:dog:x] is not prompt editing" in r.json()["error"]["message"], r.text
    assert store.list()[1] == 0  # nothing queued (tests/serve/test_webuiapi.py: A1111's API makes the picture)


def test_each_image_of_a_batch_draws_from_its_own_seed(tiny_home):
    """A batch of 3 from seed 100: image i has the prompt seed 100+i draws, and its pixels are those of seed 100+i
    made alone (the noise of each seed is its own), so any image can be made again by its seed."""
    from imagesmith.core.metadata import parse_infotext
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.engine.generate import Engine
    engine = Engine(tiny_home, device="cpu")
    base = dict(prompt="a {red|green|blue|gold|white|black} apple", model="tiny-sd15", width=64, height=64,
                steps=2, sampler_name="Euler")
    batch = engine.generate(GenerateRequest(**base, seed=100, batch_size=3))
    prompts = [parse_infotext(r.infotext)["Prompt"] for r in batch.records]
    assert [r.seed for r in batch.records] == [100, 101, 102] and [r.index for r in batch.records] == [0, 1, 2]
    assert len(set(prompts)) > 1  # not one draw for all
    for i, seed in enumerate((100, 101, 102)):
        alone = engine.generate(GenerateRequest(**base, seed=seed))
        assert parse_infotext(alone.records[0].infotext)["Prompt"] == prompts[i]
        diff = np.abs(np.asarray(alone.images[0], np.int16) - np.asarray(batch.images[i], np.int16)).max()
        assert diff <= 2  # batched kernels may round a level apart
