"""Textual-inversion embeddings: the vectors reach the text encoder's token embeddings at the named word's place
(SD1 and both SDXL encoders), A1111 and ComfyUI naming, chunking, caching, the engine's TI hashes, bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures.tiny import build_sd15, build_sdxl, home_with_tiny_sd15
from imagesmith.core.errors import UnsafeModelFile
from imagesmith.core.requests import GenerateRequest
from imagesmith.engine import prompts as P
from imagesmith.engine.embeddings import Embedding, TextualInversions, load_embedding


@pytest.fixture(scope="module")
def sd15():
    return build_sd15(0)


def _embeddings_out(text_encoder):
    """Records what the encoder's embeddings block gives its layers (token embeddings + positions)."""
    block = getattr(text_encoder, "text_model", text_encoder).embeddings
    seen = []
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen, handle, block


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_vectors_replace_the_named_words_token_embeddings(sd15):
    vec = _vectors(2, 32, 1)
    ti = TextualInversions(("clip",), (32,))
    emb = Embedding("my-style", {"clip": vec}, "0123456789ab")
    assert ti.add(emb)
    prompt = "a photo of My-Style, red"  # names match whatever their case, as WebUI's tokens do
    n = len(P.tokenize_chunks("a photo of", sd15.tokenizer)[0].tokens)
    chunks = P.tokenize_chunks(prompt, sd15.tokenizer, embeddings=ti)
    first = ti.first_id(emb)
    assert chunks[0].tokens[n:n + 2] == (first, first + 1)
    seen, handle, block = _embeddings_out(sd15.text_encoder)
    try:
        z = P.encode_prompt_sd(prompt, sd15.tokenizer, sd15.text_encoder, embeddings=ti)
    finally:
        handle.remove()
    positions = block.position_embedding.weight[1 + n:3 + n].detach()
    assert torch.allclose(seen[-1][0, 1 + n:3 + n] - positions, vec, atol=1e-6)  # after BOS and "a photo of"
    plain = P.encode_prompt_sd(prompt, sd15.tokenizer, sd15.text_encoder)  # no embeddings: the name is text
    other = P.encode_prompt_sd("a photo of the, red", sd15.tokenizer, sd15.text_encoder)
    assert torch.equal(z[0, :1 + n], plain[0, :1 + n])  # causal attention: what comes before is untouched
    assert not torch.allclose(z[0, 1 + n:], plain[0, 1 + n:]) and not torch.allclose(z, other)
    # the model itself is unchanged: the hook lived for that call only
    assert torch.equal(P.encode_prompt_sd(prompt, sd15.tokenizer, sd15.text_encoder), plain)


def test_an_embedding_never_straddles_two_chunks(sd15):
    ti = TextualInversions(("clip",), (32,))
    emb = Embedding("my-style", {"clip": _vectors(3, 32, 2)})
    ti.add(emb)
    chunks = P.tokenize_chunks("a " * 74 + "my-style", sd15.tokenizer, embeddings=ti)
    assert [len(c.tokens) for c in chunks] == [74, 3]
    assert chunks[1].tokens == tuple(range(ti.first_id(emb), ti.first_id(emb) + 3))
    # weights apply to it as to any word
    weighted = P.tokenize_chunks("(my-style:1.3) cat", sd15.tokenizer, embeddings=ti)
    assert weighted[0].weights[:3] == (1.3, 1.3, 1.3)


def test_comfy_names_it_embedding_colon_and_drops_unknown_ones(sd15):
    ti = TextualInversions(("clip",), (32,))
    ti.add(Embedding("SDA768", {"clip": _vectors(2, 32, 3)}))
    a1111 = P.encode_prompt_sd("style of sda768 girl", sd15.tokenizer, sd15.text_encoder, embeddings=ti)
    comfy = P.encode_prompt_sd("style of embedding:SDA768.pt girl", sd15.tokenizer, sd15.text_encoder,
                               embeddings=ti, syntax="comfy")
    assert torch.equal(a1111, comfy)
    # ComfyUI ignores an embedding it does not have (with a warning): the word goes, the rest stays
    missing = P.encode_prompt_sd("style of embedding:nope girl", sd15.tokenizer, sd15.text_encoder,
                                 embeddings=ti, syntax="comfy")
    assert torch.equal(missing, P.encode_prompt_sd("style of  girl", sd15.tokenizer, sd15.text_encoder,
                                                   syntax="comfy"))


def test_sdxl_gives_each_encoder_its_own_vectors():
    pipe = build_sdxl(0)
    l, g = _vectors(2, 32, 4), _vectors(2, 64, 5)
    ti = TextualInversions(("clip_l", "clip_g"), (32, 64))
    assert ti.add(Embedding("xl-style", {"clip_l": l, "clip_g": g}))
    assert not ti.add(Embedding("sd1-only", {"clip": _vectors(2, 32, 6)}))  # an SD1 embedding does not fit SDXL
    n = len(P.tokenize_chunks("a photo of", pipe.tokenizer)[0].tokens)
    s1, h1, b1 = _embeddings_out(pipe.text_encoder)
    s2, h2, b2 = _embeddings_out(pipe.text_encoder_2)
    try:
        z, pooled = P.encode_prompt_sdxl("a photo of xl-style", (pipe.tokenizer, pipe.tokenizer_2),
                                         (pipe.text_encoder, pipe.text_encoder_2), embeddings=ti)
    finally:
        h1.remove()
        h2.remove()
    for seen, block, vec in ((s1, b1, l), (s2, b2, g)):
        pos = block.position_embedding.weight[1 + n:3 + n].detach()
        assert torch.allclose(seen[-1][0, 1 + n:3 + n] - pos, vec, atol=1e-6)
    plain, plain_pooled = P.encode_prompt_sdxl("a photo of xl-style", (pipe.tokenizer, pipe.tokenizer_2),
                                               (pipe.text_encoder, pipe.text_encoder_2))
    assert z.shape == plain.shape and not torch.allclose(z, plain) and not torch.allclose(pooled, plain_pooled)
    # the pooled embedding is still read at the end-of-text token, not at the embedding's place
    assert P.tokenize_chunks("sd1-only", pipe.tokenizer, embeddings=ti)[0].tokens == \
        P.tokenize_chunks("sd1-only", pipe.tokenizer)[0].tokens


def test_files_in_every_layout_and_pickles_refused(tmp_path):
    v = _vectors(2, 32, 7)
    layouts = {"a1111": {"emb_params": v}, "string": {"string_to_param.*": v}, "diffusers": {"<tok>": v[0]},
               "sdxl": {"clip_l": v, "clip_g": _vectors(2, 64, 8)}}
    for name, tensors in layouts.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        emb = load_embedding(tmp_path / f"{name}.safetensors")
        assert emb.name == name and all(t.ndim == 2 for t in emb.vectors.values())
    assert load_embedding(tmp_path / "diffusers.safetensors").count == 1
    from imagesmith.models.probe import probe  # a diffusers learned_embeds file is listed as an embedding
    save_file({"<cat-toy>": torch.zeros(768)}, str(tmp_path / "cat-toy.safetensors"))
    assert (probe(tmp_path / "cat-toy.safetensors").kind, probe(tmp_path / "cat-toy.safetensors").arch) == \
        ("embedding", "sd1")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02}q\x00.")  # never unpickled: refused by its format
    with pytest.raises(UnsafeModelFile, match="pickle-format"):
        load_embedding(tmp_path / "old.pt")
    save_file({"a": torch.zeros(3, 3), "b": torch.zeros(3)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(Exception, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "two.safetensors")


def test_the_engine_applies_a_negative_embedding_and_records_its_hash(tiny_home, tiny_models, tmp_path):
    from imagesmith.engine.generate import Engine
    from imagesmith.models.hashing import sha256_file
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    folder = settings.models_dir / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models.paths["tiny-embedding"], folder / "EasyNeg.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not safetensors at all")  # skipped, named in the log
    engine = Engine(settings, device="cpu")
    req = GenerateRequest(model="tiny-sd15", prompt="a glass bottle", negative_prompt="easyneg, blurry", steps=2,
                          width=64, height=64, seed=11)
    first = engine.generate(req)
    expected = sha256_file(folder / "EasyNeg.safetensors")[:12]
    assert f"TI hashes: \"EasyNeg: {expected}\"" in first.records[0].infotext
    plain = engine.generate(req.model_copy(update={"negative_prompt": "blurry"}))
    assert "TI hashes" not in plain.records[0].infotext
    assert np.abs(np.asarray(first.images[0], float) - np.asarray(plain.images[0], float)).max() > 0
    # without the file the same words are only text: a different picture, and no stale cached encoding
    (folder / "EasyNeg.safetensors").unlink()  # noticed without a restart or refresh, as WebUI notices it
    gone = engine.generate(req)
    assert "TI hashes" not in gone.records[0].infotext
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(gone.images[0]))
    # one added while the engine runs is found by its next job
    shutil.copy(tiny_models.paths["tiny-embedding"], folder / "NewNeg.safetensors")
    added = engine.generate(req.model_copy(update={"negative_prompt": "newneg, blurry"}))
    assert f"TI hashes: \"NewNeg: {expected}\"" in added.records[0].infotext
    assert np.array_equal(np.asarray(added.images[0]), np.asarray(first.images[0]))  # same vectors, same picture
