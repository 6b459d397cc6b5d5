"""Wildcards and dynamic prompts, drawn from the seed so the same seed gives the same prompt.

- ``__name__`` is a line of ``<home>/wildcards/name.txt`` (``__folder/name__`` for nested folders); blank lines
  and ``#`` comments are skipped; a line may itself hold wildcards and choices.
- ``{a|b|c}`` is one of the options; ``{2$$a|b|c}`` two different ones, ``{1-3$$a|b|c}`` one to three, joined
  with ", " (``{2$$ and $$a|b|c}`` joins with " and "); ``{0.5::a|2::b}`` weighs the options.
- ``\\{``, ``\\}`` and ``\\|`` are literal.

    expand_prompt("a {red|green} __fruit__", seed=7, folder=home / "wildcards") -> "a green pear"
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..core.errors import BadRequest

MAX_DEPTH = 20
MAX_LENGTH = 20_000
_WILDCARD = re.compile(r"__([A-Za-z0-9_\-./ ]+?)__")
_COUNT = re.compile(r"^\s*(\d+)(?:\s*-\s*(\d+))?\s*\$\$")
_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d+)?)::")
_ESCAPES = {"\\{": "\x00", "\\}": "\x01", "\\|": "\x02"}


def has_dynamic(text: str) -> bool:
    return "{" in text or bool(_WILDCARD.search(text))


def expand_prompt(text: str, *, seed: int, folder: Path | None) -> str:
    """`text` with every choice and wildcard drawn from a generator seeded with `seed`."""
    if not has_dynamic(text):
        return text
    for k, v in _ESCAPES.items():
        text = text.replace(k, v)
    rng = random.Random(int(seed))
    out = _expand(text, rng, folder, 0, {})
    if len(out) > MAX_LENGTH:
        raise BadRequest(f"the prompt grows to {len(out)} characters through its wildcards (at most {MAX_LENGTH})")
    for k, v in _ESCAPES.items():
        out = out.replace(v, k[1])
    return out


def _expand(text: str, rng: random.Random, folder: Path | None, depth: int, cache: dict) -> str:
    if depth > MAX_DEPTH:
        raise BadRequest(f"wildcards and choices nest deeper than {MAX_DEPTH} levels (a wildcard that names itself?)")
    text = _choices(text, rng, folder, depth, cache)
    return _WILDCARD.sub(lambda m: _expand(_pick_line(m.group(1), rng, folder, cache), rng, folder, depth + 1,
                                           cache), text)


def _choices(text: str, rng: random.Random, folder: Path | None, depth: int, cache: dict) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "}":
            raise BadRequest(f"prompt: '}}' at character {i + 1} closes no '{{'")
        if ch != "{":
            out.append(ch)
            i += 1
            continue
        end, level = i + 1, 1
        while end < len(text) and level:
            level += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if level:
            raise BadRequest(f"prompt: '{{' at character {i + 1} is never closed")
        out.append(_choose(text[i + 1:end - 1], rng, folder, depth, cache))
        i = end
    return "".join(out)


def _split_top(body: str) -> list[str]:
    parts, level, cur = [], 0, []
    for ch in body:
        if ch == "|" and level == 0:
            parts.append("".join(cur))
            cur = []
            continue
        level += {"{": 1, "}": -1}.get(ch, 0)
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _choose(body: str, rng: random.Random, folder: Path | None, depth: int, cache: dict) -> str:
    lo = hi = 1
    sep = ", "
    m = _COUNT.match(body)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        body = body[m.end():]
        if "$$" in body and "{" not in body.split("$$", 1)[0]:
            sep, body = body.split("$$", 1)
        if lo > hi:
            raise BadRequest(f"prompt: {{{lo}-{hi}$$...}} asks for at least {lo} but at most {hi} options")
    options, weights = [], []
    for part in _split_top(body):
        w = _WEIGHT.match(part)
        weights.append(float(w.group(1)) if w else 1.0)
        options.append(part[w.end():] if w else part)
    if len(options) == 1 and not m:
        raise BadRequest(f"prompt: {{{body}}} offers one option; separate choices with '|'")
    n = rng.randint(lo, hi)
    if n > len(options):
        raise BadRequest(f"prompt: asks for {n} of {len(options)} options")
    picked: list[int] = []
    pool = list(range(len(options)))
    for _ in range(n):  # weighted, without replacement
        total = sum(weights[k] for k in pool)
        r = rng.random() * total if total > 0 else 0.0
        for k in pool:
            r -= weights[k]
            if r <= 0 or k == pool[-1]:
                picked.append(k)
                pool.remove(k)
                break
    return sep.join(_expand(options[k].strip() if n > 1 else options[k], rng, folder, depth + 1, cache)
                    for k in picked)


def _pick_line(name: str, rng: random.Random, folder: Path | None, cache: dict) -> str:
    lines = cache.get(name)
    if lines is None:
        lines = cache[name] = wildcard_lines(name, folder)
    return rng.choice(lines)


def wildcard_lines(name: str, folder: Path | None) -> list[str]:
    """The options of wildcard `name` (its file's non-empty, non-comment lines)."""
    parts = [p for p in name.strip().split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") for p in parts):
        raise BadRequest(f"wildcard __{name}__: give a name under the wildcards folder, not a path")
    if folder is None:
        raise BadRequest(f"wildcard __{name}__: no wildcards folder is set")
    path = folder.joinpath(*parts[:-1], parts[-1] + ".txt")
    if not path.is_file():
        known = sorted(str(p.relative_to(folder).with_suffix("")).replace("\\", "/")
                       for p in folder.rglob("*.txt")) if folder.is_dir() else []
        hint = f" Known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}." if known else \
            f" Put one option per line in {path}."
        raise BadRequest(f"wildcard __{name}__ has no file {path.name} in {folder}.{hint}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise BadRequest(f"wildcard __{name}__: {path} has no options")
    return lines
