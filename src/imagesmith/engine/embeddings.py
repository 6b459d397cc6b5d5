"""Textual-inversion embeddings, applied as AUTOMATIC1111 and ComfyUI apply them.

An embedding is a few learnt token vectors (``emb_params`` [n, width] as A1111 writes them, ``string_to_param.*``,
a diffusers ``learned_embeds`` file with one tensor, or SDXL's ``clip_l`` [n, 768] + ``clip_g`` [n, 1280]),
read from safetensors only. A prompt names it:

- A1111 style (``syntax="a1111"``): by its file name as a word, ``easynegative`` in the negative prompt, matched
  without regard to case, as WebUI matches the name's tokens; weights apply to it like any word
  (``(easynegative:1.2)``). An embedding that does not fit the model (an SD1 embedding on SDXL) is text, as WebUI
  leaves a "skipped" embedding.
- ComfyUI style (``syntax="comfy"``): ``embedding:name`` (with or without its extension); an unknown or unfitting
  one is dropped with a warning, as ComfyUI does.

Its vectors replace the token embeddings at its place in the chunk (an embedding never straddles two 75-token
chunks: it starts the next one, as WebUI). The replacement happens inside the text encoder's own token-embedding
layer, by a forward hook that exists only for that call and only acts on the thread that placed it, so a shared
model is never modified. The infotext names each one used with its 12-digit hash (``TI hashes``), as WebUI."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import BadRequest, UnsafeModelFile

log = logging.getLogger(__name__)

KINDS = ("clip", "clip_l", "clip_g")
"""Vector sets an embedding may carry: ``clip`` (one encoder: SD1/SD2), or SDXL's two encoders."""
MAX_VECTORS = 75


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict[str, torch.Tensor]
    """kind -> [n, width] float32 on the CPU"""
    shorthash: str = ""
    """sha256 of the file, its first 12 hex digits (WebUI's ``TI hashes``)"""

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def load_embedding(path: str | Path, name: str | None = None, shorthash: str = "") -> Embedding:
    """An embedding file's vectors (safetensors only: a pickle is refused, never opened)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    name = name or path.stem
    if path.suffix.lower() in (".pt", ".bin", ".ckpt", ".pth"):
        raise UnsafeModelFile(f"embedding {path.name} is a pickle-format file; imagesmith reads textual inversions "
                              "from .safetensors only (convert it, or get the .safetensors release)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadRequest(f"embedding {path.name} cannot be read as safetensors: {exc}") from None
    vectors: dict[str, torch.Tensor] = {}
    if "clip_l" in tensors and "clip_g" in tensors:
        vectors = {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    elif "emb_params" in tensors:
        vectors = {"clip": tensors["emb_params"]}
    elif (found := [k for k in tensors if k.startswith("string_to_param.")]):
        vectors = {"clip": tensors[found[0]]}
    elif len(tensors) == 1:  # diffusers' learned_embeds: {"<token>": [width]} or [n, width]
        vectors = {"clip": next(iter(tensors.values()))}
    if not vectors or any(v.ndim not in (1, 2) for v in vectors.values()):
        raise BadRequest(f"{path.name} is not a textual-inversion embedding (expected emb_params, "
                         "string_to_param, clip_l + clip_g, or a single vector tensor)")
    vectors = {k: (v.unsqueeze(0) if v.ndim == 1 else v).float().contiguous() for k, v in vectors.items()}
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise BadRequest(f"embedding {path.name}: its clip_l and clip_g have different numbers of vectors")
    if not 0 < next(iter(vectors.values())).shape[0] <= MAX_VECTORS:
        raise BadRequest(f"embedding {path.name} has {next(iter(vectors.values())).shape[0]} vectors; "
                         f"1 to {MAX_VECTORS} fit a prompt chunk")
    return Embedding(name, vectors, shorthash)


PLACEHOLDER_BASE = 1 << 24
"""Token ids from here up stand for embedding vectors inside imagesmith (never given to a tokenizer or model)."""


@dataclass
class TextualInversions:
    """The embeddings a model can use, by lower-cased name, for one model's encoders: ``kinds`` is what each of
    its encoders takes (``("clip",)`` for SD1/SD2, ``("clip_l", "clip_g")`` for SDXL) and ``widths`` their
    token-embedding widths; embeddings that do not fit are left out (their names stay text)."""

    kinds: tuple[str, ...]
    widths: tuple[int, ...]
    by_name: dict[str, Embedding] = field(default_factory=dict)
    _names: re.Pattern | None = field(default=None, repr=False)
    """the A1111 name pattern, compiled once for the set (reset by add)"""

    def add(self, emb: Embedding) -> bool:
        vecs = self.vectors_of(emb)
        if vecs is None:
            return False
        self.by_name[emb.name.lower()] = emb
        self._names = None
        return True

    def vectors_of(self, emb: Embedding) -> list[torch.Tensor] | None:
        """One [n, width] tensor per encoder, or None where the embedding does not fit this model. An SDXL file's
        ``clip_l`` serves a single 768-wide encoder (SD1), as ComfyUI allows."""
        out = []
        for kind, width in zip(self.kinds, self.widths):
            v = emb.vectors.get(kind)
            if v is None and kind == "clip":
                v = next((x for k, x in emb.vectors.items() if x.shape[1] == width), None)
            if v is None or v.shape[1] != width:
                return None
            out.append(v)
        return out

    def __bool__(self) -> bool:
        return bool(self.by_name)

    # ------------------------------------------------------------------ placeholder ids
    def first_id(self, emb: Embedding) -> int:
        """The placeholder id of the embedding's first vector (its next ones follow): fixed by its place among
        this set's names, so a tokenized prompt means the same vectors whenever it is encoded with this set."""
        return PLACEHOLDER_BASE + sorted(self.by_name).index(emb.name.lower()) * MAX_VECTORS

    def table(self, encoder: int) -> dict[int, torch.Tensor]:
        """Placeholder id -> vector, for encoder number ``encoder`` of the model (0, or 1 for SDXL's second)."""
        out = {}
        for name in sorted(self.by_name):
            emb = self.by_name[name]
            for i, v in enumerate(self.vectors_of(emb)[encoder]):
                out[self.first_id(emb) + i] = v
        return out

    # ------------------------------------------------------------------ finding names in text
    def _pattern(self, syntax: str) -> re.Pattern | None:
        if syntax == "comfy":
            return _COMFY_NAME
        if not self.by_name:
            return None
        if self._names is None:  # every fragment of every prompt is split with it: compiled once
            names = sorted(self.by_name, key=len, reverse=True)
            self._names = re.compile(r"(?<![\w\-.])(" + "|".join(re.escape(n) for n in names) + r")(?![\w\-])",
                                     re.IGNORECASE)
        return self._names

    def split(self, text: str, syntax: str = "a1111") -> list[str | Embedding]:
        """``text`` as text pieces and the embeddings it names, in order."""
        pattern = self._pattern(syntax)
        if pattern is None:
            return [text]
        out: list[str | Embedding] = []
        pos = 0
        for m in pattern.finditer(text):
            emb = self.by_name.get(_strip_extension(m.group(1)).lower())
            if emb is None:
                if syntax == "comfy":
                    log.warning("embedding:%s does not exist or does not fit this model; ignored (as ComfyUI)",
                                m.group(1))
                    out.append(text[pos:m.start()])
                    pos = m.end()
                continue
            out.append(text[pos:m.start()])
            out.append(emb)
            pos = m.end()
        out.append(text[pos:])
        return [p for p in out if not (isinstance(p, str) and not p)]

    def used(self, texts: Sequence[str], syntax: str = "a1111") -> list[Embedding]:
        """The embeddings the texts name, each once, in order of first mention."""
        seen: dict[str, Embedding] = {}
        for text in texts:
            for part in self.split(text, syntax):
                if isinstance(part, Embedding):
                    seen.setdefault(part.name.lower(), part)
        return list(seen.values())

    def key(self, text: str, syntax: str = "a1111") -> tuple[tuple[str, str], ...]:
        """What of this set changes the encoding of ``text`` (for caches): the embeddings it names and hashes."""
        return tuple((e.name.lower(), e.shorthash or str(id(e))) for e in self.used([text], syntax))


_COMFY_NAME = re.compile(r"embedding:([^\s,()\[\]{}<>]+)", re.IGNORECASE)


def _strip_extension(name: str) -> str:
    for ext in (".safetensors", ".pt", ".bin"):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name.rstrip(".")


# ---------------------------------------------------------------------------------------- injection
@contextlib.contextmanager
def injected(text_encoder: torch.nn.Module, rows: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While the context lasts, this thread's calls of ``text_encoder``'s token-embedding layer give ``vectors``
    [k, T, width] wherever ``rows`` [k, T] (bool) is set. Other threads using the same model are untouched."""
    layer = text_encoder.get_input_embeddings()
    owner = threading.get_ident()

    def hook(module, args, output):
        if threading.get_ident() != owner or output.shape[:2] != rows.shape:
            return None
        mask = rows.to(output.device)
        return torch.where(mask.unsqueeze(-1), vectors.to(device=output.device, dtype=output.dtype), output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def placeholder_rows(ids: torch.Tensor, table: dict[int, torch.Tensor], width: int, filler: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids`` [k, T] with placeholder ids -> (ids with each placeholder replaced by ``filler``, the bool mask of
    placeholder positions, the [k, T, width] vectors to put there)."""
    mask = ids >= PLACEHOLDER_BASE
    vectors = torch.zeros(*ids.shape, width)
    for pos in mask.nonzero().tolist():
        vectors[pos[0], pos[1]] = table[int(ids[pos[0], pos[1]])]
    return ids.masked_fill(mask, filler), mask, vectors
