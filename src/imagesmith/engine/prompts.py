"""Prompts as AUTOMATIC1111 WebUI users write them.

- Attention syntax: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)``, nesting multiplies,
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets, unclosed brackets close at the end, ``BREAK`` starts a new
  75-token chunk. :func:`parse_prompt_attention` ports WebUI's ``modules/prompt_parser.py`` algorithm.
- Extra-network tags: ``<lora:name:0.7>`` become :class:`LoraSpec` (:func:`extract_lora_tags`); ``<lyco:..>``,
  ``<hypernet:..>`` and unknown ``<type:..>`` tags are removed with a logged note (not applied).
- SD1/SD2 and SDXL encodings the WebUI way (:func:`encode_prompt_sd`, :func:`encode_prompt_sdxl`): the prompt is
  split into chunks of 75 tokens (BREAK and WebUI's comma backtrack decide where), each chunk is encoded on its own
  as BOS + 75 + EOS = 77 tokens and the chunks are concatenated, so long prompts are never truncated. Each
  token's hidden state is multiplied by its weight and the chunk's original mean restored (WebUI emphasis
  "Original"). :func:`encode_pair_sd` / :func:`encode_pair_sdxl` pad the shorter of prompt and negative prompt
  with empty-prompt chunks so both can go to diffusers as ``prompt_embeds`` / ``negative_prompt_embeds``.
- SD3 and FLUX pipelines encode raw text themselves (T5 + CLIP): :func:`plain_prompt` drops the syntax; the
  weights and BREAK are ignored there.

- Textual-inversion embeddings named in a prompt (``engine.embeddings``) become placeholder ids in the chunks and
  their vectors inside the text encoder's token-embedding layer, for the call only.

Prompt editing, alternation and AND live in ``engine.prompt_editing``.

Deliberate difference from WebUI: a BREAK inside brackets, ``(a BREAK b)``, is still a chunk break (WebUI
multiplies its internal -1 marker weight and then encodes the word "BREAK" with a negative weight).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from ..core.errors import BadRequest, UnsupportedModel
from ..core.requests import LoraSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .embeddings import TextualInversions

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk is 77 tokens, CLIP's context."""
CHUNK_TOKENS = CHUNK_LENGTH + 2
COMMA_BACKTRACK = 20
"""WebUI's ``comma_padding_backtrack`` default: a full chunk is cut after its last comma if that comma is within
the chunk's last 20 tokens, and the words after it move to the next chunk."""
BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)
"""How :func:`parse_prompt_attention` reports BREAK (WebUI's representation)."""

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


# --------------------------------------------------------------------------------------------- parsing
@dataclass(slots=True)
class _Fragment:
    text: str
    weight: float
    is_break: bool = False


def _parse(text: str) -> list[_Fragment]:
    res: list[_Fragment] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for frag in res[start:]:
            if not frag.is_break:
                frag.weight *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append(_Fragment(token[1:], 1.0))
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                value = float(weight)
            except ValueError:
                raise BadRequest(f"bad weight {weight!r} in the prompt: write (text:1.2)") from None
            multiply_range(round_brackets.pop(), value)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append(_Fragment("BREAK", -1.0, is_break=True))
                res.append(_Fragment(part, 1.0))

    for pos in round_brackets:  # unclosed: closed at the end, as WebUI does
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)

    if not res:
        res = [_Fragment("", 1.0)]

    i = 0  # merge runs of identical weights (never across a BREAK)
    while i + 1 < len(res):
        a, b = res[i], res[i + 1]
        if not a.is_break and not b.is_break and a.weight == b.weight:
            a.text += b.text
            res.pop(i + 1)
        else:
            i += 1
    return res


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """WebUI's attention parser: ``'a (b:1.5) c'`` -> ``[('a ', 1.0), ('b', 1.5), (' c', 1.0)]``.

    BREAK is reported as :data:`BREAK_MARKER` ``('BREAK', -1.0)``. Raises BadRequest for an unreadable
    explicit weight such as ``(a:1.2.3)``."""
    return [BREAK_MARKER if f.is_break else (f.text, f.weight) for f in _parse(text)]


def parse_prompt_comfy(text: str) -> list[tuple[str, float]]:
    """ComfyUI's prompt weighting: ``(text)`` multiplies by 1.1, ``(text:1.3)`` sets the weight (it does not
    multiply), nesting applies inside out, ``\\(`` and ``\\)`` are literal, square brackets are plain text and
    there is no BREAK. ``'a (b:1.5) c'`` -> ``[('a ', 1.0), ('b', 1.5), (' c', 1.0)]``."""
    text = text.replace("\\(", "\0\1").replace("\\)", "\0\2")

    def unescape(t: str) -> str:
        return t.replace("\0\1", "(").replace("\0\2", ")")

    def groups(t: str) -> list[str]:
        out, cur, depth = [], "", 0
        for ch in t:
            if ch == "(":
                if depth == 0 and cur:
                    out.append(cur)
                    cur = ""
                cur += ch
                depth += 1
            elif ch == ")" and depth > 0:
                depth -= 1
                cur += ch
                if depth == 0:
                    out.append(cur)
                    cur = ""
            else:
                cur += ch
        if cur:
            out.append(cur)
        return out

    def weigh(t: str, weight: float) -> list[tuple[str, float]]:
        res = []
        for g in groups(t):
            if len(g) >= 2 and g[0] == "(" and g[-1] == ")":
                inner, w = g[1:-1], weight * 1.1
                colon = inner.rfind(":")
                if colon > 0:
                    try:
                        w = float(inner[colon + 1:])
                        inner = inner[:colon]
                    except ValueError:
                        pass
                res += weigh(inner, w)
            else:
                res.append((g, weight))
        return res
    merged: list[tuple[str, float]] = []
    for part, w in weigh(text, 1.0):
        part = unescape(part)
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + part, w)
        elif part:
            merged.append((part, w))
    return merged or [("", 1.0)]


def plain_prompt(text: str) -> str:
    """The words of a WebUI prompt without its syntax, for pipelines that take raw text (SD3, FLUX, T5).

    Weights and BREAK are ignored there: ``'a (red:1.4) [cat] BREAK \\(b\\)'`` -> ``'a red cat (b)'``.
    Whitespace runs become one space. Extra-network tags are not touched: call :func:`extract_lora_tags` first."""
    pieces = [" " if f.is_break else f.text for f in _parse(text)]
    return " ".join("".join(pieces).split())


# ------------------------------------------------------------------------------------ extra networks
@dataclass(frozen=True)
class ExtraNetworks:
    """A prompt with its ``<type:args>`` tags taken out."""

    prompt: str
    loras: tuple[LoraSpec, ...]
    notes: tuple[str, ...]


def _tag_number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise BadRequest(f"bad LoRA tag {tag}: weight {value.strip()!r} is not a number; "
                         f"write <lora:NAME:0.7>") from None


def _lora_from_tag(args: str, tag: str, notes: list[str]) -> LoraSpec:
    items = [s.strip() for s in args.split(":")]
    name = items[0]
    if not name:
        raise BadRequest(f"bad LoRA tag {tag}: no name; write <lora:NAME:0.7>")
    positional: list[float] = []
    named: dict[str, float] = {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in ("te", "unet", "dyn"):
                raise BadRequest(f"bad LoRA tag {tag}: unknown argument {key!r}; use te=, unet= or a weight")
            named[key] = _tag_number(value, tag)
        else:
            positional.append(_tag_number(item, tag))
    # WebUI: te = te= or 1st number (default 1); unet = unet= or 2nd number (default te); 3rd number = dyn
    te = named.get("te", positional[0] if positional else None)
    unet = named.get("unet", positional[1] if len(positional) > 1 else None)
    weight = te if te is not None else unet if unet is not None else 1.0
    if te is not None and unet is not None and te != unet:
        notes.append(f"LoRA {name!r}: separate text-encoder/UNet weights ({te:g}/{unet:g}) are not supported; "
                     f"using {weight:g} for both")
    if "dyn" in named or len(positional) > 2:
        notes.append(f"LoRA {name!r}: the dyn (rank) argument is ignored")
    try:
        return LoraSpec(name=name, weight=weight)
    except ValidationError:
        raise BadRequest(f"bad LoRA tag {tag}: weight {weight:g} is out of range -10..10") from None


def parse_extra_networks(text: str) -> ExtraNetworks:
    """Take every ``<type:args>`` tag out of ``text`` (as WebUI does); ``lora`` tags become LoraSpecs, the
    others (``lyco``, ``hypernet``, unknown types) are dropped with a note. Spaces left around a removed tag are
    folded so ``'a <lora:x:1> b'`` gives ``'a b'``; the result is stripped."""
    loras: list[LoraSpec] = []
    notes: list[str] = []
    out: list[str] = []
    pos = 0
    for m in _RE_EXTRA_NETWORK.finditer(text):
        before = text[pos:m.start()]
        out.append(before)
        pos = m.end()
        kind, args, tag = m.group(1).lower(), m.group(2), m.group(0)
        if kind == "lora":
            loras.append(_lora_from_tag(args, tag, notes))
        elif kind == "lyco":
            notes.append(f"{tag} removed from the prompt: LyCORIS tags are not applied "
                         f"(write <lora:...> for a plain LoRA)")
        elif kind == "hypernet":
            notes.append(f"{tag} removed from the prompt: hypernetworks are not supported")
        else:
            notes.append(f"{tag} removed from the prompt: unknown extra-network type {m.group(1)!r}")
        so_far = "".join(out)
        if not so_far or so_far[-1] in " \t":  # do not leave two spaces where the tag was
            while pos < len(text) and text[pos] in " \t":
                pos += 1
    out.append(text[pos:])
    prompt = "".join(out).strip() if loras or notes else text
    return ExtraNetworks(prompt=prompt, loras=tuple(loras), notes=tuple(notes))


_MJ_PARAM = re.compile(r"(?:^|\s)--(ar|aspect|seed|no)(?:\s+(.*?))?(?=\s--(?:ar|aspect|seed|no)\b|$)",
                       re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class PromptParams:
    """Midjourney-style parameters found at the end of a prompt: ``--ar W:H`` (or ``--aspect``), ``--seed N``
    and ``--no thing, other`` (which joins the negative prompt)."""

    aspect: float | None = None
    seed: int | None = None
    no: str | None = None


def extract_prompt_params(text: str) -> tuple[str, PromptParams]:
    """``a cat --ar 9:16 --no dogs --seed 5`` -> (``a cat``, PromptParams(0.5625, 5, 'dogs'))."""
    found = list(_MJ_PARAM.finditer(text))
    if not found:
        return text, PromptParams()
    values: dict[str, Any] = {}
    for m in found:
        key, value = m.group(1).lower(), (m.group(2) or "").strip()
        if key in ("ar", "aspect"):
            ar = re.fullmatch(r"(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)", value)
            if not ar or float(ar.group(2)) == 0 or not 0.25 <= float(ar.group(1)) / float(ar.group(2)) <= 4:
                raise BadRequest(f"--ar takes W:H with a ratio between 1:4 and 4:1, not {value!r}")
            values["aspect"] = float(ar.group(1)) / float(ar.group(2))
        elif key == "seed":
            if not re.fullmatch(r"\d+", value) or int(value) >= 2 ** 32:
                raise BadRequest(f"--seed takes a whole number below 2^32, not {value!r}")
            values["seed"] = int(value)
        else:
            if not value:
                raise BadRequest("--no needs what to leave out: --no text, watermark")
            values["no"] = ", ".join(x for x in (values.get("no"), value) if x)
    clean = text[:found[0].start()].rstrip()
    return clean, PromptParams(**values)


def aspect_size(native: int, aspect: float, multiple: int | None = None) -> tuple[int, int]:
    """(width, height) of about ``native`` x ``native`` pixels with ``aspect`` = width / height, in multiples of
    64 (of 8 for models under 512 px)."""
    multiple = multiple or (64 if native >= 512 else 8)
    w = (native * aspect ** 0.5) / multiple
    h = (native / aspect ** 0.5) / multiple
    return max(multiple, round(w) * multiple), max(multiple, round(h) * multiple)


def extract_lora_tags(text: str) -> tuple[str, list[LoraSpec]]:
    """``'a cat <lora:style:0.7>'`` -> ``('a cat', [LoraSpec(name='style', weight=0.7)])``.

    ``<lora:name>`` is weight 1; ``<lora:name:0.7:0.5>`` (text encoder / UNet) uses the first. LyCORIS,
    hypernetwork and unknown tags are removed and a warning is logged. BadRequest for a bad weight."""
    found = parse_extra_networks(text)
    log = logging.getLogger(__name__)
    for note in found.notes:
        log.warning(note)
    return found.prompt, list(found.loras)


# ------------------------------------------------------------------------------------------ chunking
@dataclass(frozen=True)
class PromptChunk:
    """Up to 75 prompt token ids (no BOS/EOS) and their weights."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def _comma_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    cid = tokenizer.convert_tokens_to_ids("," if is_bert_tokenizer(tokenizer) else ",</w>")
    return None if cid is None or cid == tokenizer.unk_token_id else int(cid)


def tokenize_chunks(prompt: str, tokenizer: PreTrainedTokenizerBase, *,
                    comma_backtrack: int = COMMA_BACKTRACK, syntax: str = "a1111",
                    embeddings: TextualInversions | None = None) -> list[PromptChunk]:
    """WebUI's ``tokenize_line``: weighted fragments tokenized without special tokens, packed into chunks of
    75. BREAK closes the current chunk; a full chunk whose last comma is within ``comma_backtrack`` tokens of its
    end is cut after that comma. An empty prompt gives one empty chunk. ``syntax="comfy"``: ComfyUI's weighting
    (:func:`parse_prompt_comfy`), plain 75-token chunks. ``embeddings``: the textual inversions the prompt may
    name; each becomes placeholder ids (``engine.embeddings``), kept whole within one chunk."""
    if syntax == "comfy":
        fragments = [_Fragment(t, w) for t, w in parse_prompt_comfy(prompt)]
        comma_backtrack = 0
    else:
        fragments = _parse(prompt)
    pieces = [[] if f.is_break else (embeddings.split(f.text, syntax) if embeddings is not None else [f.text])
              for f in fragments]
    texts = [p for ps in pieces for p in ps if isinstance(p, str)]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                     if texts else [])
    comma = _comma_id(tokenizer)

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(PromptChunk(tuple(tokens), tuple(weights)))
        tokens, weights, last_comma = [], [], -1

    def frag_tokens(frag_pieces: list) -> Iterable[int]:
        for piece in frag_pieces:
            if isinstance(piece, str):
                yield from next(tokenized)
                continue
            first = embeddings.first_id(piece)
            if len(tokens) + piece.count > CHUNK_LENGTH:  # an embedding is never split: it starts the next chunk
                next_chunk()
            yield from range(first, first + piece.count)

    for frag, frag_pieces in zip(fragments, pieces):
        if frag.is_break:
            next_chunk()
            continue
        for token in frag_tokens(frag_pieces):
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            tokens.append(int(token))
            weights.append(frag.weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def is_bert_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """A BERT-family (WordPiece) tokenizer: it has [CLS]/[SEP] and no BOS token. Its chunks are framed
    ``[CLS] ... [SEP]`` and padded with [PAD] (masked out) instead of CLIP's BOS/EOS (house-ldm's MiniLM)."""
    return (getattr(tokenizer, "bos_token", None) is None and getattr(tokenizer, "cls_token", None) is not None
            and getattr(tokenizer, "sep_token", None) is not None)


def _is_bert_encoder(text_encoder: torch.nn.Module) -> bool:
    return getattr(getattr(text_encoder, "config", None), "model_type", None) == "bert"


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    if is_bert_tokenizer(tokenizer):
        pad = tokenizer.pad_token_id
        return int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), int(0 if pad is None else pad)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None:
        raise UnsupportedModel("the tokenizer has no start/end-of-text tokens: it is not a CLIP tokenizer")
    return int(bos), int(eos), int(eos if pad is None else pad)


def chunk_input_ids(chunks: Sequence[PromptChunk], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """[k, 77] ids: BOS + tokens + EOS, padded with the tokenizer's pad id (SDXL's tokenizer_2 pads with '!').
    A BERT tokenizer gives [CLS] + tokens + [SEP] + [PAD]s (see :func:`chunk_attention_mask`)."""
    bos, eos, pad = _special_ids(tokenizer)
    return torch.tensor([[bos, *c.tokens, eos] + [pad] * (CHUNK_LENGTH - len(c.tokens)) for c in chunks],
                        dtype=torch.long)


def chunk_attention_mask(chunks: Sequence[PromptChunk]) -> torch.Tensor:
    """[k, 77] attention mask for BERT-framed chunks: 1 over [CLS] + tokens + [SEP], 0 over the padding."""
    return torch.tensor([[1] * (len(c.tokens) + 2) + [0] * (CHUNK_LENGTH - len(c.tokens)) for c in chunks],
                        dtype=torch.long)


def _chunk_weights(chunks: Sequence[PromptChunk]) -> torch.Tensor:
    return torch.tensor([[1.0, *c.weights, 1.0] + [1.0] * (CHUNK_LENGTH - len(c.tokens)) for c in chunks],
                        dtype=torch.float32)


# ------------------------------------------------------------------------------------------ encoding
def _encoder_device_dtype(text_encoder: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(text_encoder.parameters())
    return param.device, param.dtype


def _apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """WebUI emphasis 'Original', per chunk: z *= w; z *= original_mean / new_mean (in float32)."""
    z = z.float()
    w = weights.to(z.device)
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * w.unsqueeze(-1)
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return z * ratio


def _check_clip_skip(clip_skip: int, layers: int | None = None) -> None:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise BadRequest(f"clip_skip must be a whole number from 1 (last layer), got {clip_skip!r}")
    if layers is not None and clip_skip > layers:
        raise BadRequest(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers")


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps .text_model
    norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    if norm is None:
        norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        raise UnsupportedModel("clip_skip above 1 needs a CLIP text encoder (one with a final_layer_norm)")
    return norm


def _run_encoder(text_encoder: torch.nn.Module, ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                 embeddings: TextualInversions | None, encoder: int, **kwargs):
    """``text_encoder(ids, **kwargs)``, with any textual-inversion placeholder ids given their vectors inside the
    encoder's token-embedding layer (``engine.embeddings``); the ids it sees carry BOS there instead."""
    from .embeddings import PLACEHOLDER_BASE, injected, placeholder_rows
    if embeddings is None or not bool((ids >= PLACEHOLDER_BASE).any()):
        return text_encoder(ids, **kwargs)
    width = int(text_encoder.get_input_embeddings().weight.shape[1])
    clean, rows, vectors = placeholder_rows(ids.cpu(), embeddings.table(encoder), width, _special_ids(tokenizer)[0])
    with injected(text_encoder, rows, vectors):
        return text_encoder(clean.to(ids.device), **kwargs)


def _encode_sd_chunks(chunks: Sequence[PromptChunk], tokenizer: PreTrainedTokenizerBase,
                      text_encoder: torch.nn.Module, clip_skip: int, device: torch.device | str | None,
                      dtype: torch.dtype | None, emphasis: str = "a1111",
                      embeddings: TextualInversions | None = None) -> torch.Tensor:
    enc_device, enc_dtype = _encoder_device_dtype(text_encoder)
    device = enc_device if device is None else device
    dtype = enc_dtype if dtype is None else dtype
    _check_clip_skip(clip_skip)
    ids = chunk_input_ids(chunks, tokenizer).to(device)
    bert = is_bert_tokenizer(tokenizer) or _is_bert_encoder(text_encoder)
    with torch.no_grad():
        if bert:  # BERT family: masked padding; clip_skip c > 1 is hidden_states[-c] (no final layer norm)
            out = text_encoder(ids, attention_mask=chunk_attention_mask(chunks).to(device), output_hidden_states=True)
        else:
            out = _run_encoder(text_encoder, ids, tokenizer, embeddings, 0, output_hidden_states=True)
        _check_clip_skip(clip_skip, len(out.hidden_states) - 1)
        if clip_skip == 1:
            z = out.last_hidden_state
        elif bert:
            z = out.hidden_states[-clip_skip]
        else:
            z = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
        if emphasis == "comfy":
            z = _comfy_emphasis(z, _chunk_weights(chunks), lambda: _encode_sd_chunks(
                [PromptChunk((), ())], tokenizer, text_encoder, clip_skip, device, dtype))
        else:
            z = _apply_emphasis(z, _chunk_weights(chunks))
    return z.reshape(1, -1, z.shape[-1]).to(device=device, dtype=dtype)


def _comfy_emphasis(z: torch.Tensor, weights: torch.Tensor, empty: Callable[[], torch.Tensor]) -> torch.Tensor:
    """ComfyUI's weighting: each weighted token moves away from the empty prompt's encoding at its position,
    ``z_empty + (z - z_empty) * w``; no renormalisation. Unweighted prompts are left exactly as encoded."""
    w = weights.to(z.device)
    if bool((w == 1.0).all()):
        return z.float()
    z_empty = empty().float().reshape(1, -1, z.shape[-1]).to(z.device)
    z = z.float()
    return torch.where((w != 1.0).unsqueeze(-1), z_empty + (z - z_empty) * w.unsqueeze(-1), z)


def encode_prompt_sd(prompt: str, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, *,
                     clip_skip: int = 1, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, syntax: str = "a1111",
                     embeddings: TextualInversions | None = None) -> torch.Tensor:
    """SD1/SD2 prompt embeddings [1, 77*k, hidden], WebUI style (chunked, weighted, never truncated).

    ``clip_skip`` in WebUI meaning: 1 = last layer (``last_hidden_state``), c > 1 = ``hidden_states[-c]``
    through the encoder's final layer norm (``text_model.final_layer_norm``; in transformers 5
    ``CLIPTextModel.final_layer_norm``). ``device``/``dtype`` default to the text encoder's.

    ``syntax="comfy"`` reads the prompt and applies its weights as ComfyUI does (:func:`parse_prompt_comfy`,
    weights relative to the empty prompt's encoding); "a1111" (the default) as WebUI does.

    A BERT-family tokenizer/encoder (house-ldm's MiniLM) works too: chunks are ``[CLS] ... [SEP]`` padded to 77
    with [PAD] under an attention mask, and clip_skip c > 1 is ``hidden_states[-c]``."""
    return _encode_sd_chunks(tokenize_chunks(prompt, tokenizer, syntax=syntax, embeddings=embeddings), tokenizer,
                             text_encoder, clip_skip, device, dtype, emphasis=syntax, embeddings=embeddings)


def _encode_sdxl_chunks(chunks: Sequence[PromptChunk],
                        tokenizers: tuple[PreTrainedTokenizerBase | None, PreTrainedTokenizerBase],
                        text_encoders: tuple[torch.nn.Module | None, torch.nn.Module], clip_skip: int,
                        device: torch.device | str | None, dtype: torch.dtype | None, *, grad: bool = False,
                        emphasis: str = "a1111", embeddings: TextualInversions | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    tok1, tok2 = tokenizers
    te1, te2 = text_encoders
    if te2 is None:
        raise UnsupportedModel("SDXL needs its second text encoder (it gives the pooled embedding)")
    enc_device, enc_dtype = _encoder_device_dtype(te2)
    device = enc_device if device is None else device
    dtype = enc_dtype if dtype is None else dtype
    _check_clip_skip(clip_skip)
    weights = _chunk_weights(chunks)
    parts: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for index, (tok, te) in enumerate(((tok1, te1), (tok2, te2))):
            if te is None:  # e.g. the SDXL refiner: second encoder only
                continue
            tok = tok if tok is not None else (tok2 if tok2 is not None else tok1)
            out = _run_encoder(te, chunk_input_ids(chunks, tok).to(device), tok, embeddings,
                               index if te1 is not None else 0, output_hidden_states=True)
            _check_clip_skip(clip_skip, len(out.hidden_states) - 1)
            if emphasis == "comfy":
                def empty(te=te, tok=tok):
                    ids = chunk_input_ids([PromptChunk((), ())], tok).to(device)
                    return te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
                parts.append(_comfy_emphasis(out.hidden_states[-(clip_skip + 1)], weights, empty))
            else:
                parts.append(_apply_emphasis(out.hidden_states[-(clip_skip + 1)], weights))
            pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise UnsupportedModel("SDXL's second text encoder must be a CLIPTextModelWithProjection "
                                   "(it gives the pooled embedding)")
    z = torch.cat(parts, dim=-1)
    return (z.reshape(1, -1, z.shape[-1]).to(device=device, dtype=dtype),
            pooled[:1].to(device=device, dtype=dtype))


def encode_prompt_sdxl(prompt: str, tokenizers: tuple[Any, Any], text_encoders: tuple[Any, Any], *,
                       clip_skip: int = 1, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, grad: bool = False,
                       syntax: str = "a1111", embeddings: TextualInversions | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL ``(prompt_embeds [1, 77*k, h1+h2], pooled [1, proj])``, WebUI style.

    Both encoders see the same chunks (made with tokenizer 1; they share CLIP's BPE vocabulary, each keeps its
    own pad id). Per chunk: ``hidden_states[-(clip_skip+1)]`` of each encoder (penultimate at clip_skip 1,
    no final layer norm, as diffusers), weighted, concatenated on the last axis. ``pooled`` is encoder 2's
    ``text_embeds`` of the first chunk (as WebUI). Encoder 1 may be None (refiner). ``grad``: keep the graph
    (text-encoder LoRA training)."""
    tok1, tok2 = tokenizers
    chunks = tokenize_chunks(prompt, tok1 if tok1 is not None else tok2, syntax=syntax, embeddings=embeddings)
    return _encode_sdxl_chunks(chunks, (tok1, tok2), (text_encoders[0], text_encoders[1]),
                               clip_skip, device, dtype, grad=grad, emphasis=syntax, embeddings=embeddings)


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor,
                       empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``empty`` (the [1, 77, h] encoding of the empty prompt) to the shorter of ``cond`` and ``uncond``
    until both have the same number of 77-token chunks (what WebUI does for cond/uncond of unequal length)."""
    if empty.shape[1] != CHUNK_TOKENS or cond.shape[1] % CHUNK_TOKENS or uncond.shape[1] % CHUNK_TOKENS:
        raise ValueError(f"embeddings must be whole {CHUNK_TOKENS}-token chunks: got {tuple(cond.shape)}, "
                         f"{tuple(uncond.shape)} and empty {tuple(empty.shape)}")
    length = max(cond.shape[1], uncond.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = (length - t.shape[1]) // CHUNK_TOKENS
        if not missing:
            return t
        filler = empty[:1].to(device=t.device, dtype=t.dtype).repeat(t.shape[0], missing, 1)
        return torch.cat([t, filler], dim=1)

    return pad(cond), pad(uncond)


def _pair_sd(encode: Callable[[str], torch.Tensor], prompt: str,
             negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    cond, uncond = encode(prompt), encode(negative)
    if cond.shape[1] != uncond.shape[1]:
        cond, uncond = pad_to_same_length(cond, uncond, encode(""))
    return cond, uncond


def _pair_sdxl(encode: Callable[[str], tuple[torch.Tensor, torch.Tensor]], prompt: str, negative: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (cond, pooled), (uncond, neg_pooled) = encode(prompt), encode(negative)
    if cond.shape[1] != uncond.shape[1]:
        cond, uncond = pad_to_same_length(cond, uncond, encode("")[0])
    return cond, uncond, pooled, neg_pooled


def encode_pair_sd(prompt: str, negative: str, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module,
                   *, clip_skip: int = 1, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, negative_prompt_embeds)`` of equal length for a diffusers SD1/SD2 pipeline."""
    return _pair_sd(lambda text: encode_prompt_sd(text, tokenizer, text_encoder, clip_skip=clip_skip,
                                                  device=device, dtype=dtype), prompt, negative)


def encode_pair_sdxl(prompt: str, negative: str, tokenizers: tuple[Any, Any], text_encoders: tuple[Any, Any], *,
                     clip_skip: int = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`` for a
    diffusers SDXL pipeline; the two sequences have equal length."""
    return _pair_sdxl(lambda text: encode_prompt_sdxl(text, tokenizers, text_encoders, clip_skip=clip_skip,
                                                      device=device, dtype=dtype), prompt, negative)


# --------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class _CacheKey:
    kind: str
    prompt: str
    clip_skip: int
    model_key: str
    loras: tuple[tuple[str, float], ...]
    device: str
    dtype: str
    embeddings: tuple[tuple[str, str], ...] = ()
    """the textual inversions the prompt names, with their hashes"""


LoraKey = LoraSpec | tuple[str, float]


def _lora_key(loras: Iterable[LoraKey]) -> tuple[tuple[str, float], ...]:
    out = []
    for item in loras:
        name, weight = (item.name, item.weight) if isinstance(item, LoraSpec) else item
        out.append((str(name), float(weight)))
    return tuple(sorted(out))


class PromptEncoder:
    """A caller-owned LRU cache of prompt encodings, keyed by (prompt, clip_skip, model identity, active LoRA
    set, device, dtype). ``model_key`` must identify the text encoder weights (e.g. the checkpoint hash); the
    LoRA set is the adapters active on it, as (name, weight) pairs or LoraSpecs (include anything that
    changes a LoRA's weights, such as its file hash, in its name). Thread-safe; returns fresh tensors."""

    def __init__(self, max_entries: int = 32):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_CacheKey, tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _cached(self, key: _CacheKey, compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return tuple(t.clone() for t in found)
            self.misses += 1
        value = tuple(t.detach() for t in compute())
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return tuple(t.clone() for t in value)

    @staticmethod
    def _key(kind: str, prompt: str, clip_skip: int, model_key: str, loras: Iterable[LoraKey],
             encoder: torch.nn.Module, device: torch.device | str | None, dtype: torch.dtype | None,
             embeddings: TextualInversions | None = None, syntax: str = "a1111") -> _CacheKey:
        enc_device, enc_dtype = _encoder_device_dtype(encoder)
        return _CacheKey(kind, prompt, clip_skip, model_key, _lora_key(loras),
                         str(torch.device(device) if device is not None else enc_device),
                         str(dtype if dtype is not None else enc_dtype),
                         embeddings.key(prompt, syntax) if embeddings else ())

    def encode_sd(self, prompt: str, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, *,
                  model_key: str, loras: Iterable[LoraKey] = (), clip_skip: int = 1,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  syntax: str = "a1111", embeddings: TextualInversions | None = None) -> torch.Tensor:
        """:func:`encode_prompt_sd`, cached."""
        key = self._key("sd" if syntax == "a1111" else f"sd-{syntax}", prompt, clip_skip, model_key, loras,
                        text_encoder, device, dtype, embeddings, syntax)
        return self._cached(key, lambda: (encode_prompt_sd(prompt, tokenizer, text_encoder, clip_skip=clip_skip,
                                                           device=device, dtype=dtype, syntax=syntax,
                                                           embeddings=embeddings),))[0]

    def encode_sdxl(self, prompt: str, tokenizers: tuple[Any, Any], text_encoders: tuple[Any, Any], *,
                    model_key: str, loras: Iterable[LoraKey] = (), clip_skip: int = 1,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    syntax: str = "a1111", embeddings: TextualInversions | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`encode_prompt_sdxl`, cached."""
        key = self._key("sdxl" if syntax == "a1111" else f"sdxl-{syntax}", prompt, clip_skip, model_key, loras,
                        text_encoders[1], device, dtype, embeddings, syntax)
        z, pooled = self._cached(key, lambda: encode_prompt_sdxl(prompt, tokenizers, text_encoders,
                                                                 clip_skip=clip_skip, device=device, dtype=dtype,
                                                                 syntax=syntax, embeddings=embeddings))
        return z, pooled

    def encode_pair_sd(self, prompt: str, negative: str, tokenizer: PreTrainedTokenizerBase,
                       text_encoder: torch.nn.Module, *, model_key: str, loras: Iterable[LoraKey] = (),
                       clip_skip: int = 1, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, embeddings: TextualInversions | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`encode_pair_sd`, each prompt (and the empty-prompt padding) cached."""
        loras = tuple(loras)
        return _pair_sd(lambda text: self.encode_sd(text, tokenizer, text_encoder, model_key=model_key, loras=loras,
                                                    clip_skip=clip_skip, device=device, dtype=dtype,
                                                    embeddings=embeddings), prompt, negative)

    def encode_pair_sdxl(self, prompt: str, negative: str, tokenizers: tuple[Any, Any],
                         text_encoders: tuple[Any, Any], *, model_key: str, loras: Iterable[LoraKey] = (),
                         clip_skip: int = 1, device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None, embeddings: TextualInversions | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`encode_pair_sdxl`, each prompt (and the empty-prompt padding) cached."""
        loras = tuple(loras)
        return _pair_sdxl(lambda text: self.encode_sdxl(text, tokenizers, text_encoders, model_key=model_key,
                                                        loras=loras, clip_skip=clip_skip, device=device,
                                                        dtype=dtype, embeddings=embeddings), prompt, negative)
