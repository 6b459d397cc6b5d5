"""The one save path of every generated image: the CLI's `generate`, the service's jobs, grid cells, storyboard
panels and restyle results all write through :func:`save_image` (or :func:`save_result` for a whole
GenerationResult), so every output gets

- the same metadata: A1111's ``parameters`` infotext and imagesmith's JSON payload (`core.metadata`), or the
  chunks the caller gives for an image that is not one generation's (a sheet, a composite);
- the same safety behaviour, the gate's policy (``IMAGESMITH_SAFETY_ACTION``: ``withhold`` writes nothing,
  ``blur`` writes the blurred image and says so in an ``imagesmith-safety`` chunk), whoever saves;
- the same naming: WebUI's ``NNNNN-<seed>.png`` in a folder, numbered after what is there
  (:func:`core.imageio.output_paths`), wherever a caller does not give a path of its own;
- an atomic write (`core.imageio.save_png_atomic`): a file is complete or absent.

The gate is anything with ``check_image(image) -> verdict`` (``.flagged``, ``.reason``, ``.score``), ``apply(image)``
and ``policy.action``: `vision.safety.SafetyGate`, passed in by the caller (core imports nothing above it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageDraw

from .imageio import output_paths, save_png_atomic
from .metadata import write_metadata_chunks

SAFETY_KEY = "imagesmith-safety"


class ImageGate(Protocol):
    policy: Any

    def check_image(self, image: Image.Image) -> Any: ...

    def apply(self, image: Image.Image) -> Image.Image: ...


@dataclass
class Screened:
    """An image after the gate: ``image`` is None when it was withheld; ``flag`` says why, when it was flagged."""
    image: Image.Image | None
    flag: dict | None = None


@dataclass
class SavedImage:
    path: Path | None
    """None: withheld by the safety gate"""
    seed: int | None = None
    infotext: str | None = None
    width: int = 0
    height: int = 0
    flag: dict | None = None
    image: Image.Image | None = None
    """what was written (blurred, or the withheld tile, when the gate said so)"""

    def file_entry(self) -> dict:
        """The entry of a job's ``files`` list (the worker's result shape)."""
        out: dict[str, Any] = {"path": str(self.path), "width": self.width, "height": self.height}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.infotext is not None:
            out["infotext"] = self.infotext
        return out


def screen(image: Image.Image, gate: ImageGate | None, *, placeholder: bool = False) -> Screened:
    """The gate's verdict applied: the image itself, its blurred form (``blur``), or nothing (``withhold``;
    with ``placeholder``, a grey tile of the same size saying so, for sheets and grids that keep their layout)."""
    if gate is None:
        return Screened(image)
    verdict = gate.check_image(image)
    if not verdict.flagged:
        return Screened(image)
    action = gate.policy.action
    flag = {"reason": verdict.reason, "score": verdict.score, "action": action}
    if action == "blur":
        return Screened(gate.apply(image), flag)
    if placeholder:
        return Screened(withheld_tile(image.size), flag)
    return Screened(None, flag)


def withheld_tile(size: tuple[int, int]) -> Image.Image:
    tile = Image.new("RGB", size, (96, 96, 96))
    ImageDraw.Draw(tile).text((8, 8), "withheld", fill=(220, 220, 220))
    return tile


def safety_chunks(flag: dict | None) -> dict[str, str]:
    """The ``imagesmith-safety`` chunk of a flagged image (``blurred: <reason>`` / ``withheld: <reason>``)."""
    if flag is None:
        return {}
    return {SAFETY_KEY: f"{'blurred' if flag['action'] == 'blur' else 'withheld'}: {flag['reason']}"}


def save_image(image: Image.Image, path: str | os.PathLike[str], *, result: Any = None, record: Any = None,
               chunks: dict[str, str] | None = None, gate: ImageGate | None = None,
               placeholder: bool = False, screened: Screened | None = None) -> SavedImage:
    """Write one output image (see the module's docstring). `result`/`record`: the GenerationResult and
    ImageRecord it came from (their metadata is written); `chunks`: other text chunks, for images that are not
    one generation's. A withheld image writes nothing and returns ``path=None`` (unless `placeholder`).
    `screened`: the gate's verdict, when the caller screened the image already (to lay it out first)."""
    text = dict(write_metadata_chunks(result, record)) if result is not None and record is not None else {}
    text.update(chunks or {})
    seen = screened if screened is not None else screen(image, gate, placeholder=placeholder)
    seed = getattr(record, "seed", None)
    infotext = getattr(record, "infotext", None)
    if seen.image is None:
        return SavedImage(None, seed, infotext, image.width, image.height, seen.flag)
    text.update(safety_chunks(seen.flag))
    written = save_png_atomic(seen.image, path, text_chunks=text)
    return SavedImage(written, seed, infotext, seen.image.width, seen.image.height, seen.flag, seen.image)


def save_result(result: Any, output: str | os.PathLike[str] | None, *, default_dir: str | os.PathLike[str],
                gate: ImageGate | None = None) -> list[SavedImage]:
    """Every image of a GenerationResult, each with its metadata, named by :func:`core.imageio.output_paths`
    (`output`: a ``.png`` file, a folder, or None for `default_dir`)."""
    paths = output_paths(output, len(result.images), default_dir, "image", seeds=[r.seed for r in result.records])
    return [save_image(image, path, result=result, record=record, gate=gate)
            for image, record, path in zip(result.images, result.records, paths)]


def flagged(saved: list[SavedImage]) -> list[dict]:
    """What the gate flagged, for a job's result or the CLI's summary."""
    return [{"seed": s.seed, **s.flag} for s in saved if s.flag is not None]


def save_control_maps(result: Any, beside: str | os.PathLike[str] | None) -> list[dict]:
    """A1111's detected maps: each ControlNet unit's preprocessed control image (``result.control_maps``) written
    beside the first saved image as ``<its name>-control-<unit>.png``; their entries (path, unit,
    preprocessor, size). Nothing when no image was saved or no unit preprocessed its image."""
    maps = getattr(result, "control_maps", None) or []
    if beside is None or not maps:
        return []
    first = Path(beside)
    out = []
    for m in maps:
        path = first.with_name(f"{first.stem}-control-{m['unit']}.png")
        save_png_atomic(m["image"], path)
        out.append({"path": str(path), "unit": m["unit"], "preprocessor": m["preprocessor"],
                    "width": m["image"].width, "height": m["image"].height})
    return out
