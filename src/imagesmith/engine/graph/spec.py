"""How a node is described: its inputs (ComfyUI's types, defaults, ranges and choices), outputs and function,
and the ``/object_info`` entry ComfyUI's clients and frontend read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN")
MAX_SEED = 2 ** 64 - 1


@dataclass(frozen=True)
class Input:
    type: str
    """INT, FLOAT, STRING, BOOLEAN, COMBO (choices), or a link type (MODEL, CLIP, LATENT, ...)"""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | str | None = None
    """the allowed values of a COMBO, or the name of a dynamic list (``checkpoints``, ``loras``, ...)"""
    optional: bool = False
    multiline: bool = False
    control_after_generate: bool = False
    tooltip: str = ""
    round: float | None = None
    upload: str | None = None
    """``image``: the frontend shows an upload button (LoadImage)"""

    @property
    def is_widget(self) -> bool:
        return self.type in PRIMITIVES or self.type == "COMBO"


@dataclass(frozen=True)
class Node:
    name: str
    display_name: str
    category: str
    inputs: dict[str, Input]
    outputs: tuple[tuple[str, str], ...]
    """(type, name) per output slot"""
    run: Callable[..., tuple]
    """run(ctx, **inputs) -> one value per output (an output node returns ({"ui": {...}},))"""
    output_node: bool = False
    description: str = ""
    fingerprint: Callable[..., Any] | None = None
    """what, beyond its inputs, decides the output (LoadImage: the file's size and time); part of the cache key"""
    hidden: dict[str, str] = field(default_factory=dict)

    def object_info(self, lists: dict[str, list[str]]) -> dict:
        """ComfyUI's /object_info entry; `lists` holds the dynamic choices (model files by folder)."""
        required, optional = {}, {}
        for name, inp in self.inputs.items():
            (optional if inp.optional else required)[name] = _input_info(inp, lists)
        info = {"input": {"required": required}, "input_order": {"required": [n for n, i in self.inputs.items()
                                                                              if not i.optional]},
                "output": [t for t, _ in self.outputs], "output_is_list": [False] * len(self.outputs),
                "output_name": [n for _, n in self.outputs], "name": self.name, "display_name": self.display_name,
                "description": self.description, "python_module": "nodes", "category": self.category,
                "output_node": self.output_node, "deprecated": False, "experimental": False}
        if optional:
            info["input"]["optional"] = optional
            info["input_order"]["optional"] = list(optional)
        if self.hidden:
            info["input"]["hidden"] = dict(self.hidden)
        return info


def choices_of(inp: Input, lists: dict[str, list[str]]) -> list[str]:
    if isinstance(inp.choices, str):
        return list(lists.get(inp.choices, []))
    return list(inp.choices or ())


def _input_info(inp: Input, lists: dict[str, list[str]]) -> list:
    opts: dict[str, Any] = {}
    if inp.tooltip:
        opts["tooltip"] = inp.tooltip
    if inp.type == "COMBO":
        if inp.default is not None:
            opts["default"] = inp.default
        if inp.upload:
            opts[f"{inp.upload}_upload"] = True
        return [choices_of(inp, lists), opts] if opts else [choices_of(inp, lists)]
    for key in ("default", "min", "max", "step", "round"):
        value = getattr(inp, key)
        if value is not None:
            opts[key] = value
    if inp.multiline:
        opts["multiline"] = True
        opts["dynamicPrompts"] = True
    if inp.control_after_generate:
        opts["control_after_generate"] = True
    return [inp.type, opts] if opts else [inp.type]
