"""X/Y/Z plot (WebUI's "X/Y/Z plot" script): sweep request fields along up to three axes.

- :class:`AxisSpec` is one axis: a :class:`~imagesmith.core.requests.GenerateRequest` field and its values,
  parsed from WebUI-style text (:meth:`AxisSpec.parse`)::

      cfg_scale=3,5,7            steps=10-30 (+10)          cfg_scale=3-7 [3]
      sampler_name=Euler a,DPM++ 2M                          seed=1,2,3 (-1: a random seed)
      model=tiny-sd15,other      loras=a(1.0) | b(1.0) | a(0.7)+b(0.5) | none
      prompt_sr=red,blue,green   (WebUI Prompt S/R: the first value is searched, each value replaces it)

  Values are separated by commas, or by ``|`` when any ``|`` is present (so values may hold commas).
  Any scalar field of GenerateRequest can be an axis (width, height, clip_skip, denoising_strength,
  scheduler, vae, negative_prompt, ...); a few CLI names are accepted too (cfg, sampler, schedule, lora).
  A LoRA axis value is a *set*: ``name(weight)`` terms joined by ``+`` (``name:weight`` and a bare ``name``
  at weight 1 work too); ``none`` or an empty value is the set without LoRAs. The set is added to the base
  request's LoRAs (a name in both takes the axis weight).
- :class:`GridRequest` is a base request plus the axes; :meth:`GridRequest.plan` builds and validates the
  request of every cell before anything is generated (a bad field, value or Prompt S/R term is one
  BadRequest line naming the axis).
- :func:`run_grid` generates every cell through ``engine.generate``, saves each image as a PNG with the
  usual metadata, draws the labelled grid (one panel per z value, stacked under z headers) and writes
  ``grid.json``: axes, base request and per cell the labels, image path, seed, seconds and peak memory.

Seeds follow WebUI: a base seed of -1 picks one random seed for the whole grid, so every cell shares it
unless ``seed`` is an axis.

Peak memory per cell (:class:`PeakMemory`): on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (tensor memory of this process, ``memory_kind="vram"``). Elsewhere the
process's resident set size (``memory_kind="rss"``): a background thread samples RSS (``/proc/self/statm``,
else psutil when installed) every 10 ms while the cell runs and the maximum is reported; if the
process-wide high-water mark (``getrusage().ru_maxrss``, which never goes down) rose during the cell, that
new mark is the cell's exact peak and is used too. A spike shorter than the sampling interval that stays
below an earlier high-water mark can be missed, so the RSS figure is a close lower bound.

The picture helpers :func:`labelled_grid` (captions under images) and :func:`stack_vertically` are also
used by the house-model sample sheet (``train.house_eval``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import resource
import sys
import textwrap
import threading
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import __version__
from ..core.errors import BadRequest, ImagesmithError
from ..core.imageio import save_png_atomic, write_json_atomic
from ..core.outputs import save_image
from ..core.progress import CancelToken, ProgressCallback, ProgressEvent
from ..core.requests import GenerateRequest, LoraSpec

if TYPE_CHECKING:
    from ..engine.generate import Engine

AxisName = Literal["x", "y", "z"]
MemoryKind = Literal["vram", "rss"]

# Special axes that are not plain request fields.
LORAS = "loras"
PROMPT_SR = "prompt_sr"
MAX_VALUES_PER_AXIS = 256
MAX_CELLS = 1024
RSS_SAMPLE_SECONDS = 0.01

# CLI flag names and WebUI spellings that mean a request field (one concept, one name: the canonical
# name is what JSON and labels use).
FIELD_ALIASES: types.MappingProxyType[str, str] = types.MappingProxyType({
    "cfg": "cfg_scale", "cfg scale": "cfg_scale", "sampler": "sampler_name", "schedule": "scheduler",
    "schedule_type": "scheduler", "lora": LORAS, "lora_set": LORAS, "lora_sets": LORAS,
    "negative": "negative_prompt", "checkpoint": "model", "checkpoint_name": "model",
    "strength": "denoising_strength", "denoising": "denoising_strength", "prompt_s/r": PROMPT_SR,
    "prompt s/r": PROMPT_SR, "sr": PROMPT_SR, "subseed": "variation_seed",
    "subseed_strength": "variation_strength",
})
# WebUI's axis labels ("CFG Scale: 5"); fields not listed here use their own name.
FIELD_LABELS: types.MappingProxyType[str, str] = types.MappingProxyType({
    "cfg_scale": "CFG Scale", "steps": "Steps", "seed": "Seed", "variation_seed": "Var. seed",
    "variation_strength": "Var. strength", "scheduler": "Schedule type", "clip_skip": "Clip skip",
    "denoising_strength": "Denoising", "width": "Width", "height": "Height", "mask_blur": "Mask blur",
    "vae": "VAE", "negative_prompt": "Negative prompt", "init_image": "Init image", "mask": "Mask",
})
# Fields whose value is the whole label, as WebUI shows samplers, checkpoints and Prompt S/R.
BARE_LABELS: frozenset[str] = frozenset({"sampler_name", "model", "prompt", LORAS, PROMPT_SR})
# Scalar fields that cannot be an axis: a grid cell is exactly one image.
NOT_AXES: frozenset[str] = frozenset({"batch_size", "batch_count"})
NONE_WORDS: frozenset[str] = frozenset({"", "none", "default"})

_NUM_INT = r"[+-]?\s*\d+"
_NUM_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_INT = re.compile(rf"^\s*({_NUM_INT})\s*-\s*({_NUM_INT})\s*(?:\(\s*({_NUM_INT})\s*\)|\[\s*(\d+)\s*\])?\s*$")
_RANGE_FLOAT = re.compile(
    rf"^\s*({_NUM_FLOAT})\s*-\s*({_NUM_FLOAT})\s*(?:\(\s*({_NUM_FLOAT})\s*\)|\[\s*(\d+)\s*\])?\s*$")
_LORA_TERM = re.compile(r"^(?P<name>[^()]+?)\s*(?:\(\s*(?P<weight>[^()]*?)\s*\))?$")


# ------------------------------------------------------------------------------------------- axis fields
def _scalar_type(annotation: Any) -> type | None:
    """int/float/str/bool for ``X`` or ``X | None`` annotations, else None."""
    if annotation in (int, float, str, bool):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, str, bool):
            return args[0]
    return None


def axis_fields() -> dict[str, type]:
    """Every name an axis may sweep -> the Python type of its values (``list`` for LoRA sets)."""
    out: dict[str, type] = {}
    for name, info in GenerateRequest.model_fields.items():
        kind = _scalar_type(info.annotation)
        if kind is not None and name not in NOT_AXES:
            out[name] = kind
    out[LORAS] = list
    out[PROMPT_SR] = str
    return out


def _optional(field: str) -> bool:
    info = GenerateRequest.model_fields.get(field)
    return info is not None and type(None) in get_args(info.annotation)


def canonical_field(name: str) -> str:
    """The request field an axis name means (``cfg`` -> ``cfg_scale``); BadRequest for an unknown one."""
    key = " ".join(str(name).split()).lower()
    if key not in FIELD_ALIASES:
        key = key.replace("-", "_").replace(" ", "_")
    key = FIELD_ALIASES.get(key, key)
    if key not in axis_fields():
        choices = ", ".join(sorted(axis_fields()))
        raise BadRequest(f"{name!r} cannot be a grid axis; use one of: {choices}")
    return key


# ------------------------------------------------------------------------------------------- parsing
def split_values(text: str) -> list[str]:
    """``a,b,c`` -> ['a', 'b', 'c']; when any ``|`` is present it is the separator (values may hold commas)."""
    sep = "|" if "|" in text else ","
    return [v.strip() for v in text.split(sep)]


def _number(text: str, kind: type) -> int | float:
    return kind(text.replace(" ", ""))


def expand_range(text: str, kind: type) -> list[int | float] | None:
    """WebUI range syntax for a numeric field, or None when ``text`` is not a range:
    ``1-5`` (step 1), ``10-30 (+10)`` (step), ``3-7 [3]`` (count, evenly spaced, ends included)."""
    m = (_RANGE_INT if kind is int else _RANGE_FLOAT).match(text)
    if m is None:
        return None
    start, end = _number(m.group(1), kind), _number(m.group(2), kind)
    if m.group(4) is not None:
        count = int(m.group(4))
        if count < 1:
            raise BadRequest(f"range {text!r}: the count in [..] must be at least 1")
        if count > MAX_VALUES_PER_AXIS:
            raise BadRequest(f"range {text!r} has {count} values; the most per axis is {MAX_VALUES_PER_AXIS}")
        if count == 1:
            return [start]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [int(round(v)) for v in values] if kind is int else [round(v, 10) for v in values]
    step = _number(m.group(3), kind) if m.group(3) is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise BadRequest(f"range {text!r}: the step ({step}) never gets from {start} to {end}")
    n = int(math.floor((end - start) / step + 1e-9)) + 1
    if n > MAX_VALUES_PER_AXIS:
        raise BadRequest(f"range {text!r} has {n} values; the most per axis is {MAX_VALUES_PER_AXIS}")
    if kind is int:
        return [start + i * step for i in range(n)]
    return [round(start + i * step, 10) for i in range(n)]


def parse_lora_set(text: str) -> list[LoraSpec]:
    """``a(0.7)+b(0.5)`` -> [LoraSpec(a, 0.7), LoraSpec(b, 0.5)]; ``a``, ``a:0.7`` work too;
    ``none`` or empty -> [] (no LoRA)."""
    t = text.strip()
    if t.lower() in NONE_WORDS:
        return []
    specs: list[LoraSpec] = []
    for term in t.split("+"):
        term = term.strip()
        m = _LORA_TERM.match(term)
        if not term or m is None:
            raise BadRequest(f"bad LoRA set {text!r}: use NAME(WEIGHT) terms joined by +, e.g. a(0.7)+b(0.5)")
        try:
            if m.group("weight") is None:
                spec = LoraSpec.parse(term)
            else:
                spec = LoraSpec(name=m.group("name").strip(), weight=float(m.group("weight")))
        except (ValueError, ValidationError):
            raise BadRequest(f"bad LoRA {term!r} in set {text!r}: the weight must be a number "
                             "from -10 to 10, e.g. a(0.7)") from None
        if any(s.name.lower() == spec.name.lower() for s in specs):
            raise BadRequest(f"LoRA set {text!r} names {spec.name!r} twice")
        specs.append(spec)
    return specs


def format_weight(weight: float) -> str:
    """1 -> '1.0', 0.7 -> '0.7', 0.45 -> '0.45' (how LoRA weights read in the document's mixes)."""
    s = f"{weight:.3f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def lora_set_label(specs: Sequence[LoraSpec]) -> str:
    """[a 0.7, b 0.5] -> 'a(0.7)+b(0.5)'; the empty set -> 'none'."""
    return "+".join(f"{s.name}({format_weight(s.weight)})" for s in specs) or "none"


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def value_label(field: str, value: Any) -> str:
    """WebUI-style label of one axis value: 'CFG Scale: 5', 'Euler a', 'a(0.7)+b(0.5)'."""
    if field == LORAS:
        return lora_set_label(value)
    text = "default" if value is None else _format_number(value)
    if field in BARE_LABELS:
        return text
    return f"{FIELD_LABELS.get(field, field)}: {text}"


# ------------------------------------------------------------------------------------------- typed axes
class AxisSpec(BaseModel):
    """One axis: a request field (or ``loras`` / ``prompt_sr``) and its values.

    Numeric values given as text may be WebUI ranges; LoRA values are sets (lists of LoraSpec) or their
    text form. Values are checked against GenerateRequest by :meth:`GridRequest.plan`."""

    model_config = ConfigDict(frozen=True)

    field: str = Field(..., description="GenerateRequest field, 'loras' (LoRA sets) or 'prompt_sr'")
    values: list[Any] = Field(..., min_length=1, description="values along the axis, in order")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "field" not in data:
            return data
        field = canonical_field(data["field"])
        raw = data.get("values")
        if isinstance(raw, str):
            raw = split_values(raw)
        if not isinstance(raw, (list, tuple)):
            return {**data, "field": field}
        kind = axis_fields()[field]
        values: list[Any] = []
        for v in raw:
            if field == LORAS:
                values.append(parse_lora_set(v) if isinstance(v, str)
                              else [LoraSpec.model_validate(s) for s in v])
            elif isinstance(v, str) and kind in (int, float):
                expanded = expand_range(v, kind)
                if expanded is not None:
                    values.extend(expanded)
                elif v.strip():
                    values.append(v.strip())
            elif isinstance(v, str):
                if v.strip():  # "a,b," is two values, as in WebUI
                    values.append(v.strip())
            else:
                values.append(v)
        if not values:
            raise BadRequest(f"grid axis {field} has no values")
        if len(values) > MAX_VALUES_PER_AXIS:
            raise BadRequest(f"grid axis {field} has {len(values)} values; the most is {MAX_VALUES_PER_AXIS}")
        return {**data, "field": field, "values": values}

    @classmethod
    def parse(cls, text: str) -> "AxisSpec":
        """``FIELD=V1,V2,...`` (or ``FIELD=V1 | V2``); see the module docstring for the value syntax."""
        field, eq, values = text.partition("=")
        if not eq or not field.strip():
            raise BadRequest(f"bad grid axis {text!r}: use FIELD=V1,V2,..., e.g. cfg_scale=3,5,7")
        return cls(field=field.strip(), values=split_values(values))


@dataclass(frozen=True)
class AxisPlan:
    """One validated axis: per value, its label and the typed value that goes into the requests."""
    name: AxisName
    spec: AxisSpec
    values: tuple[Any, ...]  # typed: numbers, strings, None, or tuples of LoraSpec
    labels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return [s.model_dump() for s in v] if self.spec.field == LORAS else v
        return {"field": self.spec.field, "values": [plain(v) for v in self.values], "labels": list(self.labels)}


@dataclass(frozen=True)
class PlannedCell:
    """One cell: its place (x, y, z index) and the request that makes it."""
    index: int
    xi: int
    yi: int
    zi: int
    request: GenerateRequest


@dataclass(frozen=True)
class GridPlan:
    """Every cell's request, validated; ``base`` carries the grid's resolved seed."""
    base: GenerateRequest
    x: AxisPlan | None
    y: AxisPlan | None
    z: AxisPlan | None
    cells: tuple[PlannedCell, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(columns, rows, panels)."""
        return tuple(len(a.values) if a else 1 for a in (self.x, self.y, self.z))  # type: ignore[return-value]

    def labels(self, cell: PlannedCell) -> tuple[str | None, str | None, str | None]:
        return tuple(a.labels[i] if a else None  # type: ignore[return-value]
                     for a, i in ((self.x, cell.xi), (self.y, cell.yi), (self.z, cell.zi)))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _apply(fields: dict[str, Any], axis: AxisPlan, i: int, base_loras: list[LoraSpec]) -> None:
    """Put value ``i`` of ``axis`` into a request's fields (in place)."""
    field, value = axis.spec.field, axis.values[i]
    if field == LORAS:
        merged = {s.name.lower(): s for s in [*base_loras, *value]}  # the axis weight wins over the base's
        fields[LORAS] = [s.model_dump() for s in merged.values()]
    elif field == PROMPT_SR:
        search = axis.values[0]
        fields["prompt"] = fields["prompt"].replace(search, value)
        fields["negative_prompt"] = fields["negative_prompt"].replace(search, value)
    else:
        fields[field] = value


def _coerce(field: str, value: Any) -> Any:
    if isinstance(value, str) and _optional(field) and value.lower() in NONE_WORDS:
        return None
    return value


class GridRequest(BaseModel):
    """A base request swept along up to three axes (x: columns, y: rows, z: one panel per value)."""

    base: GenerateRequest
    x: AxisSpec | None = None
    y: AxisSpec | None = None
    z: AxisSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "GridRequest":
        axes = self.axes()
        if not axes:
            raise BadRequest("a grid needs at least one axis (x, y or z)")
        seen: dict[str, str] = {}
        for name, spec in axes:
            if spec.field in seen and spec.field != PROMPT_SR:
                raise BadRequest(f"{name} axis sweeps {spec.field}, which the {seen[spec.field]} axis already sweeps")
            seen.setdefault(spec.field, name)
        if self.base.batch_size != 1 or self.base.batch_count != 1:
            raise BadRequest("a grid cell is one image: use batch_size 1 and batch_count 1 (sweep seed instead)")
        return self

    def axes(self) -> list[tuple[AxisName, AxisSpec]]:
        named: list[tuple[AxisName, AxisSpec | None]] = [("x", self.x), ("y", self.y), ("z", self.z)]
        return [(n, s) for n, s in named if s is not None]

    def plan(self) -> GridPlan:
        """Validate every value and build every cell's request; nothing is generated or written.
        Raises BadRequest naming the axis (or the cell) at the first problem."""
        base_fields = self.base.model_dump()
        if self.base.seed == -1:  # WebUI: one random seed for the whole grid
            base_fields["seed"] = random.randrange(2**32)
        if self.base.variation_strength > 0 and self.base.variation_seed in (None, -1):
            base_fields["variation_seed"] = random.randrange(2**32)
        base = GenerateRequest.model_validate(base_fields)
        base_loras = list(base.loras)
        plans: dict[str, AxisPlan] = {}
        for name, spec in self.axes():
            plans[name] = self._plan_axis(name, spec, base, base_loras)
        x, y, z = plans.get("x"), plans.get("y"), plans.get("z")
        n = math.prod(len(a.values) for a in plans.values())
        if n > MAX_CELLS:
            raise BadRequest(f"the grid has {n} cells; the most is {MAX_CELLS}")
        # Prompt S/R goes last so it also rewrites a prompt that another axis sets
        order = sorted(plans.values(), key=lambda a: a.spec.field == PROMPT_SR)
        ranges = [range(len(a.values)) if a else range(1) for a in (x, y, z)]
        cells: list[PlannedCell] = []
        for zi, yi, xi in itertools.product(ranges[2], ranges[1], ranges[0]):
            where = {"x": xi, "y": yi, "z": zi}
            fields = base.model_dump()
            for axis in order:
                _apply(fields, axis, where[axis.name], base_loras)
            try:
                req = GenerateRequest.model_validate(fields)
            except ValidationError as exc:
                at = ", ".join(f"{a.name}={a.labels[where[a.name]]!r}" for a in order)
                raise BadRequest(f"grid cell {at}: {_first_error(exc)}") from None
            cells.append(PlannedCell(len(cells), xi, yi, zi, req))
        return GridPlan(base, x, y, z, tuple(cells))

    @staticmethod
    def _plan_axis(name: AxisName, spec: AxisSpec, base: GenerateRequest, base_loras: list[LoraSpec]) -> AxisPlan:
        field = spec.field
        if field == PROMPT_SR:
            search = str(spec.values[0])
            if not search:
                raise BadRequest(f"{name} axis (prompt_sr): the first value is the text to search for; it is empty")
            if search not in base.prompt and search not in base.negative_prompt:
                raise BadRequest(f"{name} axis (prompt_sr): {search!r} is not in the prompt or the negative "
                                 "prompt (the first value is the text each value replaces)")
            values = tuple(str(v) for v in spec.values)
            return AxisPlan(name, spec, values, tuple(value_label(field, v) for v in values))
        typed: list[Any] = []
        for raw in spec.values:
            value = tuple(raw) if field == LORAS else _coerce(field, raw)
            fields = base.model_dump()
            probe = AxisPlan(name, spec, (value,), ("",))
            _apply(fields, probe, 0, base_loras)
            try:
                req = GenerateRequest.model_validate(fields)
            except ValidationError as exc:
                shown = lora_set_label(value) if field == LORAS else raw
                msg = str(exc.errors()[0].get("msg", "invalid value")).removeprefix("Value error, ")
                raise BadRequest(f"{name} axis ({field}): bad value {shown!r}: {msg}") from None
            if field == LORAS:
                typed.append(value)
            elif field == "seed" and req.seed == -1:
                typed.append(random.randrange(2**32))
            elif field == "variation_seed" and req.variation_seed == -1:
                typed.append(random.randrange(2**32))
            else:
                typed.append(getattr(req, field))
        return AxisPlan(name, spec, tuple(typed), tuple(value_label(field, v) for v in typed))


# ------------------------------------------------------------------------------------------- memory
def _ru_maxrss_bytes() -> int:
    """The process's RSS high-water mark (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now: /proc/self/statm, else psutil, else the high-water mark."""
    try:
        with open("/proc/self/statm", "rb") as fp:
            return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil  # optional; not a dependency
        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - absent or unsupported: fall back to the monotonic mark
        return _ru_maxrss_bytes()


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` and ``m.kind``: peak VRAM allocated on
    CUDA, else peak process RSS sampled by a background thread (see the module docstring)."""

    def __init__(self, device: Any, interval: float = RSS_SAMPLE_SECONDS):
        self.device = device
        self.interval = interval
        self.kind: MemoryKind = "vram" if getattr(device, "type", str(device).split(":")[0]) == "cuda" else "rss"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mark_before = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.kind == "vram":
            import torch
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._mark_before = _ru_maxrss_bytes()
        self.peak_bytes = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="grid-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "vram":
            import torch
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        mark_after = _ru_maxrss_bytes()
        if mark_after > self._mark_before:  # a new process-wide peak was reached inside this cell
            self.peak_bytes = max(self.peak_bytes, mark_after)


# ------------------------------------------------------------------------------------------- pictures
def labelled_grid(cells: Sequence[tuple[Image.Image, str]], columns: int, *, title: str = "",
                  cell: int | None = None) -> Image.Image:
    """Images in a grid, each with its caption beneath (wrapped), an optional title line on top."""
    size = cell or cells[0][0].size[0]
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=14)
    lines, line_h = 2, 13
    cw, ch = size + 8, size + 6 + lines * line_h
    rows = math.ceil(len(cells) / columns)
    top = 24 if title else 0
    sheet = Image.new("RGB", (columns * cw, top + rows * ch), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0), font=title_font)
    chars = max(10, int(size / 6.2))
    for i, (im, label) in enumerate(cells):
        x, y = (i % columns) * cw + 4, top + (i // columns) * ch + 2
        sheet.paste(im.convert("RGB").resize((size, size), Image.LANCZOS), (x, y))
        for li, line in enumerate(textwrap.wrap(label, chars)[:lines]):
            draw.text((x, y + size + 2 + li * line_h), line, fill=(20, 20, 20), font=font)
    return sheet


def stack_vertically(parts: Sequence[Image.Image]) -> Image.Image:
    """Pictures one under the other, left-aligned, on white."""
    w = max(p.size[0] for p in parts)
    out = Image.new("RGB", (w, sum(p.size[1] for p in parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.size[1]
    return out


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def label_font(size: int) -> Font:
    """NanumGothic (or DejaVu Sans) from compose.typeset, else Pillow's built-in font."""
    from ..compose.typeset import font_path
    try:
        return ImageFont.truetype(str(font_path()), size)
    except (ImagesmithError, OSError):
        return ImageFont.load_default(size=size)


def _text_w(font: Font, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _line_h(font: Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - top) + 2


def wrap_label(text: str, font: Font, max_w: int) -> list[str]:
    """Greedy wrap to ``max_w`` pixels, breaking at spaces and after ``+`` or ``,`` (LoRA sets), and
    inside a word only when it alone is too wide."""
    max_w = max(1, max_w)
    tokens: list[tuple[str, str]] = []  # (text, separator before it)
    for wi, word in enumerate(text.split()):
        for pi, piece in enumerate(re.split(r"(?<=[+,])", word)):
            if piece:
                tokens.append((piece, " " if wi and not pi else ""))
    lines: list[str] = []
    cur = ""
    for piece, sep in tokens:
        cand = cur + sep + piece if cur else piece
        if _text_w(font, cand) <= max_w:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        while _text_w(font, piece) > max_w and len(piece) > 1:
            k = len(piece) - 1
            while k > 1 and _text_w(font, piece[:k]) > max_w:
                k -= 1
            lines.append(piece[:k])
            piece = piece[k:]
        cur = piece
    if cur:
        lines.append(cur)
    return lines or [""]


class GridLayout(BaseModel):
    """Geometry of one panel: label margins (left: y labels, top: x labels) and the cell size."""
    left: int
    top: int
    cell_width: int
    cell_height: int
    columns: int
    rows: int
    font_size: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * self.cell_width, self.top + self.rows * self.cell_height


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Font, box: tuple[int, int, int, int]) -> None:
    """Lines centred in ``box`` (left, top, right, bottom)."""
    lh = _line_h(font)
    x0, y0, x1, y1 = box
    y = y0 + max(0, (y1 - y0 - lh * len(lines)) // 2)
    for line in lines:
        draw.text((x0 + (x1 - x0 - _text_w(font, line)) // 2, y), line, fill=(0, 0, 0), font=font)
        y += lh


def xy_grid(images: Sequence[Sequence[Image.Image]], x_labels: Sequence[str] | None,
            y_labels: Sequence[str] | None, *, font_size: int | None = None) -> tuple[Image.Image, GridLayout]:
    """``images[row][column]`` in a grid with WebUI-style headers: x labels above the columns, y labels
    left of the rows (either may be None). Cells are the largest image's size; smaller images are centred."""
    rows, columns = len(images), len(images[0])
    cw = max(im.size[0] for row in images for im in row)
    ch = max(im.size[1] for row in images for im in row)
    fs = font_size or max(12, min(40, (cw + ch) // 25))
    pad = max(2, fs // 3)
    font = label_font(fs)
    lh = _line_h(font)
    x_lines = [wrap_label(t, font, cw - 2 * pad) for t in x_labels] if x_labels else []
    top = max(len(ls) for ls in x_lines) * lh + 2 * pad if x_lines else 0
    left = 0
    y_lines: list[list[str]] = []
    if y_labels:
        natural = max(_text_w(font, t) for t in y_labels) + 2 * pad
        left = min(natural, max(cw, 8 * fs))
        y_lines = [wrap_label(t, font, left - 2 * pad) for t in y_labels]
    layout = GridLayout(left=left, top=top, cell_width=cw, cell_height=ch, columns=columns, rows=rows, font_size=fs)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(x_lines):
        _draw_lines(draw, lines, font, (left + c * cw + pad, pad, left + (c + 1) * cw - pad, top - pad))
    for r, lines in enumerate(y_lines):
        _draw_lines(draw, lines, font, (pad, top + r * ch, left - pad, top + (r + 1) * ch))
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            x = left + c * cw + (cw - im.size[0]) // 2
            y = top + r * ch + (ch - im.size[1]) // 2
            sheet.paste(im.convert("RGB"), (x, y))
    return sheet, layout


def titled(panel: Image.Image, title: str, font_size: int) -> Image.Image:
    """``panel`` under a header strip holding ``title`` (the z value), centred."""
    font = label_font(font_size + 2)
    pad = max(2, font_size // 3)
    lines = wrap_label(title, font, panel.size[0] - 2 * pad)
    head = Image.new("RGB", (panel.size[0], len(lines) * _line_h(font) + 2 * pad), "white")
    _draw_lines(ImageDraw.Draw(head), lines, font, (pad, pad, head.size[0] - pad, head.size[1] - pad))
    return stack_vertically([head, panel])


# ------------------------------------------------------------------------------------------- running
class GridCell(BaseModel):
    """One generated cell, as grid.json lists it."""
    index: int
    xi: int
    yi: int
    zi: int
    x: str | None = Field(None, description="x label of the cell (None without an x axis)")
    y: str | None = None
    z: str | None = None
    path: str
    seed: int
    seconds: float = Field(..., description="wall time of engine.generate for this cell")
    peak_memory_bytes: int
    memory_kind: MemoryKind = Field(..., description="vram: peak CUDA allocation; rss: peak process RSS")
    prompt: str
    loras: list[LoraSpec] = Field(default_factory=list)
    safety: dict | None = Field(None, description="the safety gate's verdict when it flagged the cell (service "
                                "grids): the cell and its place in the grid are blurred or a grey 'withheld' tile")


class GridResult(BaseModel):
    """What :func:`run_grid` made: the grid picture(s), grid.json and every cell."""
    grid_path: Path
    panel_paths: list[Path] = Field(default_factory=list, description="one picture per z value (z axis only)")
    json_path: Path
    layout: GridLayout
    cells: list[GridCell]
    device: str
    seconds: float


def check_names(engine: "Engine", plan: GridPlan) -> None:
    """Every model and LoRA a cell names exists, before the first cell runs (BadRequest otherwise)."""
    registry = getattr(engine, "registry", None)
    if registry is None:
        return
    adopted = getattr(engine, "_adopted", {})  # models served from memory via Engine.adopt
    wanted: dict[tuple[str, str], str] = {}
    for cell in plan.cells:
        where = ", ".join(f"{a.name} axis {a.labels[i]!r}" for a, i in
                          ((plan.x, cell.xi), (plan.y, cell.yi), (plan.z, cell.zi)) if a is not None)
        if cell.request.model:
            wanted.setdefault(("checkpoint", cell.request.model), where)
        if cell.request.vae:
            wanted.setdefault(("vae", cell.request.vae), where)
        for spec in cell.request.loras:
            wanted.setdefault(("lora", spec.name), where)
    for (kind, name), where in wanted.items():
        if kind == "checkpoint" and name.lower() in adopted:
            continue
        try:
            registry.get(name, kind)
        except ImagesmithError as exc:
            raise BadRequest(f"grid ({where}): {exc}") from None


def _cell_progress(progress: ProgressCallback, index: int, n: int) -> ProgressCallback:
    """Engine step events of cell ``index`` as grid events: the bar counts cells, the phase shows steps."""
    def on_step(event: ProgressEvent) -> None:
        progress(ProgressEvent(index, n, f"cell {index + 1}/{n} {event.phase} {event.step}/{event.total}"))
    return on_step


def run_grid(engine: "Engine", req: GridRequest, out_dir: str | os.PathLike[str], *,
             progress: ProgressCallback | None = None, cancel: CancelToken | None = None, gate=None) -> GridResult:
    """Generate every cell of ``req`` (see the module docstring) into ``out_dir``:
    ``cells/NNNN-xI-yJ-zK.png`` (with generation metadata), ``grid.png`` (z panels stacked under their
    headers; also ``grid-zK.png`` per panel when there is a z axis) and ``grid.json``. Cells are written through
    the one save path (core.outputs); `gate`: the safety gate (the service's), applied to every cell.
    ``progress`` gets ProgressEvent(cells done, cell count, phase) during the run."""
    start = time.perf_counter()
    plan = req.plan()
    check_names(engine, plan)
    out = Path(out_dir).expanduser()
    n = len(plan.cells)
    device = getattr(engine, "device", "cpu")
    cells: list[GridCell] = []
    images: dict[tuple[int, int, int], Image.Image] = {}
    for cell in plan.cells:
        if cancel is not None:
            cancel.raise_if_cancelled()
        on_step = None
        if progress is not None:
            progress(ProgressEvent(cell.index, n, f"cell {cell.index + 1}/{n}"))
            on_step = _cell_progress(progress, cell.index, n)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            result = engine.generate(cell.request, progress=on_step, cancel=cancel)
            seconds = time.perf_counter() - t0
        image, record = result.images[0], result.records[0]
        path = out / "cells" / f"{cell.index:04d}-x{cell.xi}-y{cell.yi}-z{cell.zi}.png"
        saved = save_image(image, path, result=result, record=record, gate=gate, placeholder=True)
        images[(cell.xi, cell.yi, cell.zi)] = saved.image
        x, y, z = plan.labels(cell)
        cells.append(GridCell(index=cell.index, xi=cell.xi, yi=cell.yi, zi=cell.zi, x=x, y=y, z=z, path=str(path),
                              seed=record.seed, seconds=seconds, peak_memory_bytes=mem.peak_bytes,
                              memory_kind=mem.kind, prompt=cell.request.prompt, loras=list(cell.request.loras),
                              safety=saved.flag))
    if progress is not None:
        progress(ProgressEvent(n, n, "drawing the grid"))
    columns, rows, panels = plan.shape
    layout: GridLayout | None = None
    pictures: list[Image.Image] = []
    for zi in range(panels):
        grid = [[images[(xi, yi, zi)] for xi in range(columns)] for yi in range(rows)]
        panel, layout = xy_grid(grid, plan.x.labels if plan.x else None, plan.y.labels if plan.y else None)
        pictures.append(titled(panel, plan.z.labels[zi], layout.font_size) if plan.z else panel)
    assert layout is not None
    panel_paths = [save_png_atomic(p, out / f"grid-z{zi}.png") for zi, p in enumerate(pictures)] if plan.z else []
    grid_path = save_png_atomic(stack_vertically(pictures) if len(pictures) > 1 else pictures[0], out / "grid.png")
    result = GridResult(grid_path=grid_path, panel_paths=panel_paths, json_path=out / "grid.json", layout=layout,
                        cells=cells, device=str(device), seconds=time.perf_counter() - start)
    write_json_atomic(result.json_path, {
        "version": __version__,
        "axes": {a.name: a.to_json() for a in (plan.x, plan.y, plan.z) if a is not None},
        "base": plan.base.model_dump(mode="json"),
        "grid": str(grid_path),
        "panels": [str(p) for p in panel_paths],
        "layout": layout.model_dump(),
        "device": str(device),
        "seconds": round(result.seconds, 3),
        "cells": [c.model_dump(mode="json") for c in cells],
    })
    return result


__all__ = [
    "AxisPlan", "AxisSpec", "GridCell", "GridLayout", "GridPlan", "GridRequest", "GridResult", "PeakMemory",
    "PlannedCell", "axis_fields", "canonical_field", "check_names", "current_rss_bytes", "expand_range",
    "format_weight", "label_font", "labelled_grid", "lora_set_label", "parse_lora_set", "run_grid",
    "split_values", "stack_vertically", "titled", "value_label", "wrap_label", "xy_grid",
]
