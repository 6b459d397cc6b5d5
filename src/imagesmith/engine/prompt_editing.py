"""A1111's prompt editing and alternation: which text the model is conditioned on at each sampling step.

- ``[from:to:when]`` reads `from` up to step `when`, then `to`; ``[to:when]`` adds `to` from then on;
  ``[from::when]`` drops `from` then. `when` with a decimal point is a fraction of the steps (``0.5``), without one
  a step number (``10``), as A1111 1.6+ reads it.
- ``[a|b|c]`` alternates every step: step 1 reads `a`, step 2 `b`, ...
- Anything else in square brackets (``[word]``, A1111's de-emphasis) is left as written.
- ``a cat AND a dog :0.8`` is composable diffusion: each part conditions the model on its own and the guided
  estimate is ``uncond + cfg x sum(weight x (cond_part - uncond))`` (:func:`split_and`).

    prompt_schedule("a [cat:dog:0.5] on a [red|blue] mat", 4)
    -> [(1, "a cat on a red mat"), (2, "a cat on a blue mat"), (3, "a dog on a red mat"), (4, "a dog on a blue mat")]

Each entry is (the last step it holds for, 1-based; the text); steps run 1..`steps`."""

from __future__ import annotations

import re

from ..core.errors import BadRequest

_NUMBER = re.compile(r"^\s*\d+(\.\d*)?\s*$|^\s*\.\d+\s*$")


_AND = re.compile(r"\s+AND\s+")
_WEIGHT = re.compile(r"^(.*?)\s*:\s*(-?\d+(?:\.\d+)?)\s*$", re.S)


def has_editing(text: str) -> bool:
    """Does `text` use prompt editing, alternation or AND (cheap check; the parse decides)?"""
    if _AND.search(text):
        return True
    if "[" not in text:
        return False
    return any(isinstance(node, tuple) for node in _parse(text))


def split_and(text: str) -> list[tuple[str, float]]:
    """A1111's composable prompts: ``"a cat AND a dog :0.8"`` -> ``[("a cat", 1.0), ("a dog", 0.8)]`` (a weight
    is a number after the last colon of a part, outside any brackets)."""
    out = []
    for part in _AND.split(text):
        m = _WEIGHT.match(part)
        if m and not (m.group(1).count("(") - m.group(1).count(")")) and \
                not (m.group(1).count("[") - m.group(1).count("]")):
            out.append((m.group(1), float(m.group(2))))
        else:
            out.append((part, 1.0))
    return out


def _top_split(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside any brackets or parentheses (escaped characters stay)."""
    parts, cur, depth, i = [], [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _parse(text: str) -> list:
    """A sequence of str and ("edit", before, after, when) / ("alt", [options]) nodes (each side a sequence)."""
    out: list = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i:i + 2])
            i += 2
            continue
        if ch != "[":
            buf.append(ch)
            i += 1
            continue
        end, depth = i + 1, 1
        while end < len(text) and depth:
            c = text[end]
            if c == "\\":
                end += 2
                continue
            depth += {"[": 1, "]": -1}.get(c, 0)
            end += 1
        if depth:  # unclosed: A1111 reads it as text
            buf.append(text[i:])
            break
        inner = text[i + 1:end - 1]
        node = _bracket(inner)
        if node is None:
            buf.append("[")
            nested = _parse(inner)
            if any(isinstance(n, tuple) for n in nested):  # [word [a:b:3]]: edits inside emphasis
                out.append("".join(buf))
                buf = []
                out.extend(nested)
            else:
                buf.append(inner)
            buf.append("]")
        else:
            out.append("".join(buf))
            buf = []
            out.append(node)
        i = end
    out.append("".join(buf))
    return [n for n in out if n != ""]


def _bracket(inner: str):
    options = _top_split(inner, "|")
    if len(options) > 1:
        return ("alt", [_parse(o) for o in options])
    parts = _top_split(inner, ":")
    if len(parts) in (2, 3) and _NUMBER.match(parts[-1]):
        when = parts[-1].strip()
        before, after = ("", parts[0]) if len(parts) == 2 else (parts[0], parts[1])
        return ("edit", _parse(before), _parse(after), when)
    return None


def check_editing(text: str, what: str = "prompt") -> None:
    """A BadRequest naming the first malformed prompt-editing expression in `text`, where A1111 would silently read
    the prompt as plain text: a '[' never closed or a ']' closing none, ``[from:to:when]`` whose `when` is no
    number or that has more than two ':', and a fraction past 1 (``[word:1.2]``: an edit that never happens, usually
    meant as a weight). ``[word]`` and ``[style: anime]`` stay text, as in A1111."""
    opened: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            opened.append(i)
        elif ch == "]":
            if not opened:
                raise BadRequest(f"{what}: ']' at character {i + 1} closes no '['; write \\] for a bracket")
            start = opened.pop()
            _check_bracket(text[start + 1:i], what)
        i += 1
    if opened:
        raise BadRequest(f"{what}: '[' at character {opened[-1] + 1} is never closed; write \\[ for a bracket")


def check_request(req) -> None:
    """:func:`check_editing` over a GenerateRequest's prompts, its regions' and its detailers' (nothing when it reads
    malformed expressions as text, as A1111's API does)."""
    if req.malformed_prompt != "error":
        return
    units = req.detailer if isinstance(req.detailer, list) else [req.detailer] if req.detailer else []
    for text, what in [(req.prompt, "prompt"), (req.negative_prompt, "negative prompt"),
                       *[(r.prompt, f"region {i + 1} prompt") for i, r in enumerate(req.regions)],
                       *[(t, f"detailer {w}") for o in units
                         for t, w in ((o.prompt, "prompt"), (o.negative_prompt, "negative prompt"))]]:
        check_editing(text, what)


def _check_bracket(inner: str, what: str) -> None:
    if len(_top_split(inner, "|")) > 1:
        return
    parts = _top_split(inner, ":")
    last = parts[-1].strip()
    if len(parts) > 3 or len(parts) == 3 and not _NUMBER.match(last):
        raise BadRequest(f"{what}: [{inner}] is not prompt editing: write [from:to:when], [to:when] or "
                         f"[from::when], with when a step number (10) or a fraction of the steps (0.5)")
    if len(parts) >= 2 and _NUMBER.match(last) and "." in last and float(last) > 1:
        raise BadRequest(f"{what}: [{inner}] switches at {last} of the steps, which never comes (a fraction runs "
                         f"0 to 1; a weight is written ({parts[0].strip()}:{last}))")


def _steps_of(nodes: list, steps: int, acc: set[int]) -> None:
    for n in nodes:
        if not isinstance(n, tuple):
            continue
        if n[0] == "alt":
            acc.update(range(1, steps + 1))
            for o in n[1]:
                _steps_of(o, steps, acc)
        else:
            w = _when(n[3], steps)
            if w >= 1:
                acc.add(w)
            _steps_of(n[1], steps, acc)
            _steps_of(n[2], steps, acc)


def _when(s: str, steps: int) -> int:
    v = float(s)
    return min(steps, int(v * steps) if "." in s else int(v))


def _text_at(nodes: list, step: int, steps: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "alt":
            out.append(_text_at(n[1][(step - 1) % len(n[1])], step, steps))
        else:
            out.append(_text_at(n[1] if step <= _when(n[3], steps) else n[2], step, steps))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text)] covering steps 1..`steps` (one entry when nothing is scheduled)."""
    if steps < 1:
        raise BadRequest("prompt editing needs at least one step")
    nodes = _parse(text)
    ends: set[int] = {steps}
    _steps_of(nodes, steps, ends)
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        t = _text_at(nodes, end, steps)
        if schedule and schedule[-1][1] == t:
            schedule[-1] = (end, t)  # the same text runs on
        else:
            schedule.append((end, t))
    return schedule


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    for end, t in schedule:
        if step <= end:
            return t
    return schedule[-1][1]
