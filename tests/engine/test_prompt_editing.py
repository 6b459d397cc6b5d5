"""A1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``: the schedule as A1111 1.6+ reads it, and the
engine switching the conditioning at the named step (the x0 estimates of the steps before the switch are those of
the first prompt, the ones after are not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagesmith.core.progress import ProgressEvent
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.prompt_editing import has_editing, prompt_schedule


@pytest.mark.parametrize("text,steps,expected", [
    ("a [cat:dog:0.5] on a [red|blue] mat", 4, [(1, "a cat on a red mat"), (2, "a cat on a blue mat"),
                                                  (3, "a dog on a red mat"), (4, "a dog on a blue mat")]),
    ("a [cat:dog:10] photo", 20, [(10, "a cat photo"), (20, "a dog photo")]),  # no point: a step number
    ("a [dog:5] x", 20, [(5, "a  x"), (20, "a dog x")]),  # [to:when]
    ("a [hat::0.25] x", 20, [(5, "a hat x"), (20, "a  x")]),  # [from::when]
    ("[a:b:0]", 4, [(4, "b")]), ("[a:b:1.0]", 4, [(4, "a")]), ("[a:b:99]", 4, [(4, "a")]),
    ("(red:1.2) [word] [a:b]", 4, [(4, "(red:1.2) [word] [a:b]")]),  # emphasis and non-numbers stay text
    ("[x [a:b:2]]", 3, [(2, "[x a]"), (3, "[x b]")]),  # an edit inside de-emphasis
    (r"\[a:b:1\]", 3, [(3, r"\[a:b:1\]")]),
])
def test_schedule_as_a1111_reads_it(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_which_prompts_schedule_anything():
    assert not has_editing("a (red:1.2) [word] cat") and has_editing("[a:b:3]") and has_editing("[a|b]")


@pytest.fixture(scope="module")
def engine(tiny_home):
    from imagesmith.engine.generate import Engine
    return Engine(tiny_home, device="cpu")


def estimates(engine, prompt: str) -> tuple[list[torch.Tensor], np.ndarray, str]:
    seen = []

    def progress(event: ProgressEvent) -> None:
        if event.latents is not None:
            seen.append(event.latents.clone())
    r = engine.generate(GenerateRequest(prompt=prompt, negative_prompt="blurry", model="tiny-sd15", width=64,
                                        height=64, steps=4, cfg_scale=6, seed=11, sampler_name="Euler"),
                        progress=progress)
    return seen, np.asarray(r.images[0]), r.records[0].infotext


def test_the_engine_switches_at_the_named_step(engine):
    cat, cat_img, _ = estimates(engine, "a photo of a cat")
    dog, dog_img, _ = estimates(engine, "a photo of a dog")
    edit, edit_img, info = estimates(engine, "a photo of a [cat:dog:2]")
    assert len(cat) == len(edit) == 4
    assert torch.equal(edit[0], cat[0]) and torch.equal(edit[1], cat[1])  # steps 1-2: "cat"
    assert not torch.equal(edit[2], cat[2])  # step 3 onwards: "dog"
    assert not np.array_equal(edit_img, cat_img) and not np.array_equal(edit_img, dog_img)
    assert info.startswith("a photo of a [cat:dog:2]")  # the infotext keeps what was written
    whole, whole_img, _ = estimates(engine, "a photo of a [cat:dog:4]")
    assert np.array_equal(whole_img, cat_img)  # switching after the last step: all "cat"
    never, never_img, _ = estimates(engine, "a photo of a [cat:dog:0]")
    assert np.array_equal(never_img, dog_img)
    alt, _, _ = estimates(engine, "a photo of a [cat|dog]")
    assert torch.equal(alt[0], cat[0]) and not torch.equal(alt[1], cat[1])  # step 1 "cat", step 2 "dog"


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_every_architecture_switches(engine, model):
    def run(prompt):
        seen = []
        engine.generate(GenerateRequest(prompt=prompt, model=model, width=64, height=64, steps=3, cfg_scale=4,
                                        seed=3, sampler_name="Euler"),
                        progress=lambda e: seen.append(e.latents.clone()) if e.latents is not None else None)
        return seen
    cat, edit = run("a cat"), run("a [cat:dog:1]")
    assert torch.equal(edit[0], cat[0]) and not torch.equal(edit[-1], cat[-1])


def test_and_composes_the_parts_as_a1111_does(engine):
    """u + cfg * sum(w_i (c_i - u)): a part of weight 0 adds nothing, two halves of one prompt are that prompt,
    and two different prompts are neither."""
    from imagesmith.engine.prompt_editing import split_and
    assert split_and("a cat AND a dog :0.8") == [("a cat", 1.0), ("a dog", 0.8)]
    assert split_and("(red:1.2) cat AND b:2") == [("(red:1.2) cat", 1.0), ("b", 2.0)]
    _, cat, _ = estimates(engine, "a photo of a cat")
    _, zero, _ = estimates(engine, "a photo of a cat AND a photo of a dog :0")
    _, halves, _ = estimates(engine, "a photo of a cat :0.5 AND a photo of a cat :0.5")
    _, both, info = estimates(engine, "a photo of a cat AND a photo of a dog")
    assert np.abs(zero.astype(int) - cat).max() <= 1 and np.abs(halves.astype(int) - cat).max() <= 1
    assert np.abs(both.astype(int) - cat).max() > 4
    assert info.startswith("a photo of a cat AND a photo of a dog")


def test_and_parts_share_one_unconditional_pass():
    """AND's parts (and regions) reuse the first part's unconditional estimate: one network pass per extra part
    instead of two, and the same estimate as each part computing its own."""
    import torch

    from fixtures.tiny import build_sd15
    from imagesmith.engine.sampling.denoisers import Composed, Conditioning, UNetDenoiser
    from imagesmith.engine.sampling.model_sampling import from_scheduler_config
    pipe = build_sd15(0)
    ms = from_scheduler_config(dict(pipe.scheduler.config), arch="sd1")
    g = torch.Generator().manual_seed(0)
    uncond = Conditioning(torch.randn(1, 77, 32, generator=g))
    parts = [UNetDenoiser(pipe.unet, ms, Conditioning(torch.randn(1, 77, 32, generator=g)), uncond, 7.0)
             for _ in range(3)]
    x, sigma = torch.randn(1, 4, 8, 8, generator=g) * 5, torch.tensor([5.0])
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    with torch.inference_mode():
        shared = Composed([(1.0, parts[0]), (0.5, parts[1]), (0.8, parts[2])])(x, sigma)
        hook.remove()
        full = [p(x, sigma) for p in parts]
        u = parts[0].last_uncond
        expected = u + 1.0 * (full[0] - u) + 0.5 * (full[1] - u) + 0.8 * (full[2] - u)
    assert batches == [2, 1, 1]  # the first part guided (uncond + cond), the later two their conditional half only
    assert torch.allclose(shared, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny-sdxl"])
def test_and_composes_on_sdxl(engine, model):
    """A1111's AND on SDXL (both encoders per part, pooled and size ids per part): a part of weight 0 adds nothing,
    another prompt at full weight changes the picture, and the infotext keeps the written prompt."""
    def run(prompt):
        r = engine.generate(GenerateRequest(prompt=prompt, negative_prompt="blurry", model=model, width=64,
                                            height=64, steps=3, cfg_scale=5, seed=4, sampler_name="Euler"))
        return np.asarray(r.images[0], np.int16), r.records[0].infotext
    cat, _ = run("a photo of a cat")
    zero, _ = run("a photo of a cat AND a photo of a dog :0")
    both, info = run("a photo of a cat AND a photo of a dog")
    assert np.abs(zero - cat).max() <= 1
    assert np.abs(both - cat).max() > 4 and info.startswith("a photo of a cat AND a photo of a dog")


@pytest.mark.parametrize("text", ["a [cat:dog:0.5] x", "[a:b:10]", "[dog:5]", "[hat::0.25]", "[a|b|c]", "[a|]",
                                  "(red:1.2) [word] [style: anime]", "[x [a:b:2]]", r"\[a:b:x\]", r"a \] b",
                                  "[a:(b:1.2):3]", "[a:b:1.0]", "[a:b:99]"])
def test_well_formed_prompts_pass_the_check(text):
    from imagesmith.engine.prompt_editing import check_editing
    check_editing(text)


@pytest.mark.parametrize("text,says", [
    ("a [cat:dog:x] photo", "[cat:dog:x] is not prompt editing"),
    ("[cat:dog:0.3:0.6]", "[cat:dog:0.3:0.6] is not prompt editing"),
    ("a [cat:dog:0.5 photo", "'[' at character 3 is never closed"),
    ("a cat:dog:0.5] photo", "']' at character 14 closes no '['"),
    ("[masterpiece:1.2], a cat", "[masterpiece:1.2] switches at 1.2 of the steps, which never comes"),
    ("[[a:b:x]|c]", "[a:b:x] is not prompt editing"),
])
def test_malformed_prompt_editing_is_named(text, says):
    from imagesmith.core.errors import BadRequest
    from imagesmith.engine.prompt_editing import check_editing
    with pytest.raises(BadRequest) as err:
        check_editing(text, "negative prompt")
    assert str(err.value).startswith("negative prompt: ") and says in str(err.value) and "\n" not in str(err.value)


def test_the_engine_refuses_a_malformed_prompt_before_any_work_unless_asked_to_read_it_as_text(engine):
    """A malformed edit is one error before any step (A1111 would quietly read the whole prompt as text); with
    malformed_prompt="text", as the A1111 API sends, it is read as text and the picture is made."""
    from imagesmith.core.errors import BadRequest
    from imagesmith.core.requests import DetailerOptions
    seen = []
    base = dict(model="tiny-sd15", width=64, height=64, steps=2, seed=3)
    for bad in (dict(prompt="a [cat:dog:x]"), dict(prompt="a cat", negative_prompt="[blurry:1.5]"),
                dict(prompt="a cat", detailer=DetailerOptions(prompt="a [smile:frown:y] face"))):
        with pytest.raises(BadRequest):
            engine.generate(GenerateRequest(**base, **bad), progress=seen.append)
    assert seen == []
    made = engine.generate(GenerateRequest(**base, prompt="a [cat:dog:x]", malformed_prompt="text"))
    assert made.images[0].size == (64, 64) and made.records[0].infotext.startswith("a [cat:dog:x]")
