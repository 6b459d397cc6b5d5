"""Concept grounding for small closed-vocabulary models (the house models).

house-ldm knows the ~700 objects of its training captions. Its frozen MiniLM text encoder puts a word it never
saw *near* the right concept, but the UNet only learned to draw from the token states of words it saw: "a cup of
espresso" comes out as a blob while "a cup of coffee" comes out as a cup. Grounding finds the prompt's subject
(the noun phrase before the first backdrop/placement phrase), and when the model does not know it, replaces it
with the nearest concept the model does know, by MiniLM sentence similarity (mean-pooled, normalised token states:
how all-MiniLM-L6-v2 was trained to be used). Colours, sizes and everything after the subject stay as written.

A model opts in by shipping ``concepts.json`` in its folder (written by the house-ldm export); every other model
is left alone. The rewrite is reported in the image's infotext (``Concept: cup of espresso -> cup of coffee``), and
``GenerateRequest.ground_concepts = False`` turns it off.

Deliberately conservative: prompts with WebUI weighting syntax are not touched, a subject whose head noun (or any
trailing part of it) is already known is kept ("a ripe banana" stays), and a replacement must score at least
:data:`MIN_SIMILARITY`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONCEPTS_FILE = "concepts.json"
MIN_SIMILARITY = 0.6
"""all-MiniLM-L6-v2 cosine similarity a replacement needs. Measured on the shipped vocabulary: 'cup of espresso'
-> 'cup of coffee' 0.72, 'puppy' -> 'poodle' 0.68, 'kitten' -> 'cat' 0.79, 'bouquet of roses' -> 'bouquet' 0.78;
'espresso' alone 0.48 and 'latte' 0.54 (nearest: 'soda cup') fall below and are kept as written."""

_WEIGHT_SYNTAX = re.compile(r"[()\[\]<>:]|\bBREAK\b")
_LEADS = re.compile(r"^\s*(?:(?:a|an)\s+)?(?:photo|picture|image|3d render|render|product photo|product shot|"
                    r"studio shot|studio photo|close-up|closeup|illustration|drawing)\s+of\s+", re.I)
_RELATIONS = (r"(?:on|against|in front of|with|at|in|near|beside|next to|over|under|by|from|and|behind|inside|"
              r"atop|upon|floating|sitting|standing|lying)\b")
_BOUNDARY = re.compile(r"\s+" + _RELATIONS + r"|[,;.!?]", re.I)
_STARTS_WITH_RELATION = re.compile(r"\s*" + _RELATIONS, re.I)
_DETERMINERS = frozenset("a an the one some this that my our your".split())
SCENE_NOUNS = frozenset("backdrop background cloth gradient surface table wall floor counter countertop desk shelf "
                        "room scene landscape backdrops".split())
"""Head nouns of a setting rather than an object ("a wooden table with a teapot"): never grounded."""


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class Grounding:
    """One rewrite: ``subject`` (as written) became ``concept`` in ``prompt``."""
    subject: str
    concept: str
    similarity: float
    prompt: str

    @property
    def note(self) -> str:
        return f"{self.subject} -> {self.concept}"


@dataclass
class ConceptVocabulary:
    """The concepts a model knows (``names``), other spellings that mean one of them (``aliases``: CLDR names,
    e.g. 'hot beverage' -> 'cup of coffee') and the modifier words its captions put before a subject
    (colours, sizes), which grounding keeps and does not count as part of the subject."""

    names: list[str]
    aliases: dict[str, str] = field(default_factory=dict)
    modifiers: frozenset[str] = frozenset()
    _embeddings: torch.Tensor | None = field(default=None, repr=False)
    _keys: list[str] = field(default_factory=list, repr=False)
    _pattern: re.Pattern | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._known = {n.lower(): n for n in self.names}
        for alias, name in self.aliases.items():
            self._known.setdefault(alias.lower(), name)
        # 'red apple' without its colour: the captions said 'blue apple' for a recoloured one, so 'apple' after
        # any colour is known too
        self._stems = {" ".join(w for w in n.split() if w not in self.modifiers) for n in self._known}

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, folder: str | Path) -> ConceptVocabulary | None:
        """The vocabulary a model folder ships, or None when it ships none (grounding is then off)."""
        path = Path(folder) / CONCEPTS_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(names=list(data["names"]), aliases=dict(data.get("aliases", {})),
                   modifiers=frozenset(w.lower() for w in data.get("modifiers", [])))

    def save(self, folder: str | Path, *, source: str = "") -> Path:
        path = Path(folder) / CONCEPTS_FILE
        data = {"format": 1, "source": source, "names": sorted(self.names, key=str.lower),
                "aliases": dict(sorted(self.aliases.items())), "modifiers": sorted(self.modifiers)}
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        return path

    # ------------------------------------------------------------------ lookup
    def known(self, phrase: str) -> str | None:
        """The concept ``phrase`` names exactly (name or alias, singular or plural), else None."""
        words = phrase.lower().split()
        if not words:
            return None
        for cand in (" ".join(words), " ".join([*words[:-1], _singular(words[-1])])):
            if cand in self._known:
                return self._known[cand]
        return None

    def _mentions_known(self, text: str) -> bool:
        if self._pattern is None:
            alts = sorted(set(self._known) | {t for t in self._stems if t}, key=len, reverse=True)
            self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alts) + r")s?\b", re.I)
        return bool(self._pattern.search(text))

    def _familiar(self, phrase: str) -> bool:
        """Whether the model reads ``phrase`` as it is: a concept, or a concept with its colour taken out."""
        words = phrase.lower().split()
        return bool(words) and (self.known(phrase) is not None or " ".join(words) in self._stems
                                or " ".join([*words[:-1], _singular(words[-1])]) in self._stems)

    def nearest(self, phrase: str, embed: Callable[[Sequence[str]], torch.Tensor]) -> tuple[str, float]:
        """The concept whose name or alias is most similar to ``phrase`` (cosine of ``embed`` vectors)."""
        if self._embeddings is None:
            self._keys = list(self._known)
            self._embeddings = torch.nn.functional.normalize(embed(self._keys).float(), dim=-1)
        q = torch.nn.functional.normalize(embed([phrase.lower()]).float(), dim=-1)
        scores = (q @ self._embeddings.T)[0]
        best = int(scores.argmax())
        return self._known[self._keys[best]], float(scores[best])

    # ------------------------------------------------------------------ the rewrite
    def ground(self, prompt: str, embed: Callable[[Sequence[str]], torch.Tensor],
               min_similarity: float = MIN_SIMILARITY) -> Grounding | None:
        """``prompt`` with its subject replaced by the nearest known concept, or None when nothing changes."""
        if not prompt.strip() or _WEIGHT_SYNTAX.search(prompt):
            return None
        lead = _LEADS.match(prompt)
        start = lead.end() if lead else 0
        if _STARTS_WITH_RELATION.match(prompt, start):
            return None  # "on a beach at sunset": a scene, no subject
        stop = _BOUNDARY.search(prompt, start)
        end = stop.start() if stop else len(prompt)
        span = prompt[start:end]
        tokens = list(re.finditer(r"\S+", span))
        i = 0  # skip determiners and modifiers (colours, sizes): they stay as written
        while i < len(tokens) and tokens[i].group().lower() in _DETERMINERS:
            i += 1
        first = i
        while i < len(tokens) and tokens[i].group().lower() in self.modifiers:
            i += 1
        if i == len(tokens):
            return None
        words = [t.group() for t in tokens[i:]]
        core = " ".join(words)
        if _singular(words[-1].lower()) in SCENE_NOUNS or self._mentions_known(prompt[end:]):
            return None  # a setting first ("a marble table with a teapot"), or a known object comes later
        if any(self.known(" ".join(t.group() for t in tokens[j:])) for j in range(first, i)):
            return None  # "a large red apple": known with its modifiers
        concept = self.known(core)
        similarity = 1.0
        if concept is None:
            if self._familiar(core):
                return None  # "a blue apple": the colour replaced the name's own, as in the captions
            low = [w.lower() for w in words]
            head = words[:low.index("of")] if "of" in low else words  # "bouquet of roses": the bouquet
            if any(self._familiar(" ".join(head[k:])) for k in range(1, len(head))):
                return None  # its head noun is known ("a ripe banana"): the model reads it as written
            concept, similarity = self.nearest(core, embed)
            if similarity < min_similarity or re.search(rf"\b{re.escape(concept.lower())}s?\b", core.lower()):
                return None  # nothing near enough, or the model already reads it ("a pair of sunglasses")
        if concept.lower() == core.lower():
            return None
        c0, c1 = start + tokens[i].start(), start + tokens[-1].end()
        before = prompt[:c0]
        article = re.search(r"\b(a|an|A|An)\s+$", before)
        if article and i > 0 and tokens[i - 1].group().lower() in ("a", "an"):
            new = _article(concept)
            new = new.capitalize() if article.group(1)[0].isupper() else new
            before = before[:article.start(1)] + new + before[article.end(1):]
        rewritten = before + concept + prompt[c1:]
        return Grounding(subject=core, concept=concept, similarity=round(similarity, 3), prompt=rewritten)


def mean_pooled(tokenizer, text_encoder) -> Callable[[Sequence[str]], torch.Tensor]:
    """Sentence vectors the sentence-transformers way (``house_clip.mean_pool`` of the last hidden states)."""
    from ..models.house_clip import mean_pool

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for k in range(0, len(texts), 256):
            batch = tokenizer(list(texts[k:k + 256]), padding=True, truncation=True, max_length=64,
                              return_tensors="pt").to(text_encoder.device)
            hidden = text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out.append(mean_pool(hidden.last_hidden_state, batch["attention_mask"]).cpu())
        return torch.cat(out)
    return embed
