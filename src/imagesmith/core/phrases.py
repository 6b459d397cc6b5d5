"""Small English helpers for prompts and captions."""

from __future__ import annotations

_MASS_NOUNS = frozenset({"sushi", "broccoli", "fire", "fog", "bricks", "glasses", "sunglasses", "goggles", "jeans",
                         "shorts", "skis", "maracas", "chains", "headphones", "dice"})
_SINGULAR_S = ("ss", "us", "is", "ous")


def with_article(phrase: str) -> str:
    """'apple' -> 'an apple', 'small blue apple' -> 'a small blue apple', 'cherries' -> 'cherries'."""
    words = phrase.split()
    last = words[-1].lower() if words else ""
    head = phrase.split(" of ")[0].split()[-1].lower() if " of " in phrase else last
    if head in _MASS_NOUNS or (head.endswith("s") and not head.endswith(_SINGULAR_S)):
        return phrase
    first = phrase.lower()
    if first.startswith(("uni", "use", "euro", "one", "ufo")):
        return "a " + phrase
    if first.startswith(("hour", "honest", "x-ray", "8", "11 ", "18 ")) or first[:1] in "aeiou":
        return "an " + phrase
    return "a " + phrase


# ------------------------------------------------------------------------------------------- colour
