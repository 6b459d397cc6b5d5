"""LoRA training data: a kohya-style folder (image + same-name .txt caption, ``N_name`` sub-folders repeat
their images N times) or a folder with ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line, the
Hugging Face imagefolder convention), with aspect-ratio buckets.

:func:`scan_folder` reads what is there without failing on the first problem, so ``imagesmith dataset check``
can list every problem; :func:`load_lora_dataset` refuses a folder with any problem, naming the file."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.errors import DatasetError
from ..core.imageio import IMAGE_EXTS

_REPEATS = re.compile(r"^(\d+)_(.+)$")





@dataclass
class Sample:
    path: Path
    caption: str
    size: tuple[int, int]
    repeats: int = 1


@dataclass
class FolderReport:
    """What :func:`scan_folder` found: usable samples and every problem, one line each."""

    folder: Path
    samples: list[Sample] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    orphan_captions: list[Path] = field(default_factory=list)
    outliers: list[tuple[Path, str]] = field(default_factory=list)
    source: str = "captions"

    @property
    def problems(self) -> list[str]:
        out = [f"{p}: no caption ({p.with_suffix('.txt').name} is missing)" for p in self.missing_captions]
        out += [f"{p}: empty caption" for p in self.empty_captions]
        out += [f"{p}: unreadable image ({why})" for p, why in self.unreadable]
        return out

    def to_dict(self) -> dict:
        sizes = [s.size for s in self.samples]
        return {"folder": str(self.folder), "source": self.source, "images": len(self.samples),
                "with_repeats": sum(s.repeats for s in self.samples),
                "missing_captions": [str(p) for p in self.missing_captions],
                "empty_captions": [str(p) for p in self.empty_captions],
                "unreadable": [{"file": str(p), "error": e} for p, e in self.unreadable],
                "orphan_captions": [str(p) for p in self.orphan_captions],
                "size_outliers": [{"file": str(p), "why": w} for p, w in self.outliers],
                "min_side": min((min(s) for s in sizes), default=None),
                "max_side": max((max(s) for s in sizes), default=None),
                "ok": not self.problems}


def _read_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def scan_folder(folder: str | Path, *, min_side: int = 0) -> FolderReport:
    """Every image under ``folder`` (recursive) with its caption; problems are collected, not raised. Size
    outliers: a side below ``min_side``, an aspect ratio beyond 4:1, or an area under a tenth of the median."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    report = FolderReport(folder)
    meta = folder / "metadata.jsonl"
    entries: list[tuple[Path, str | None, int]] = []
    if meta.is_file():
        report.source = "metadata.jsonl"
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entries.append((folder / row["file_name"], str(row.get("text", row.get("caption", ""))), 1))
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"{meta}: line {n} is not JSON with 'file_name' and 'text'") from None
    else:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        for p in images:
            m = _REPEATS.match(p.parent.name) if p.parent != folder else None
            cap = p.with_suffix(".txt")
            text = cap.read_text(encoding="utf-8", errors="replace") if cap.is_file() else None
            if text is None:
                report.missing_captions.append(p)
                continue
            entries.append((p, text, int(m.group(1)) if m else 1))
        stems = {p.with_suffix("") for p in images}
        report.orphan_captions = sorted(c for c in folder.rglob("*.txt") if c.with_suffix("") not in stems)
    for path, text, repeats in entries:
        if text is not None and not " ".join(text.split()):
            report.empty_captions.append(path)
            continue
        try:
            size = _read_size(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable"
            report.unreadable.append((path, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__))
            continue
        report.samples.append(Sample(path, " ".join(str(text).split()), size, repeats))
    if report.samples:
        areas = sorted(w * h for w, h in (s.size for s in report.samples))
        median = areas[len(areas) // 2]
        for s in report.samples:
            w, h = s.size
            if min_side and min(w, h) < min_side:
                report.outliers.append((s.path, f"{w}x{h} is smaller than {min_side} px on a side"))
            elif max(w, h) / min(w, h) > 4:
                report.outliers.append((s.path, f"{w}x{h}: aspect ratio beyond 4:1"))
            elif w * h < median / 10:
                report.outliers.append((s.path, f"{w}x{h}: under a tenth of the median image area"))
    return report


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets, multiples of ``step``, area <= resolution^2, aspect within ``max_ratio``."""
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then centre-crop to it."""
    bw, bh = bucket
    w, h = image.size
    k = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * k)), max(bh, round(h * k))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


class LoraDataset:
    """The samples of a folder (with repeats), each assigned a bucket; :meth:`batches` gives a seeded epoch
    plan of same-bucket batches and :meth:`load` the pixels ([-1, 1], optionally flipped)."""

    def __init__(self, folder: str | Path, *, resolution: int, bucketing: bool = True, bucket_step: int = 64,
                 trigger_word: str | None = None):
        report = scan_folder(folder)
        if report.problems:
            extra = f" (and {len(report.problems) - 1} more; run: imagesmith dataset check {folder})" \
                if len(report.problems) > 1 else ""
            raise DatasetError(report.problems[0] + extra)
        if not report.samples:
            raise DatasetError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
        self.folder, self.report = Path(folder), report
        self.items: list[Sample] = [s for s in report.samples for _ in range(s.repeats)]
        self.trigger_word = trigger_word
        self.buckets = make_buckets(resolution, bucket_step) if bucketing else [(resolution, resolution)]
        self.bucket_of = [nearest_bucket(s.size, self.buckets) for s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, i: int) -> str:
        text = self.items[i].caption
        if self.trigger_word and not re.search(rf"(?<!\w){re.escape(self.trigger_word)}(?!\w)", text):
            text = f"{self.trigger_word}, {text}"
        return text

    def batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """One epoch: every item once, in batches that share a bucket, in a seeded order."""
        rng = np.random.default_rng([seed, epoch])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            groups.setdefault(b, []).append(i)
        plan: list[list[int]] = []
        for b in sorted(groups):
            idx = [groups[b][j] for j in rng.permutation(len(groups[b]))]
            plan += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        return [plan[j] for j in rng.permutation(len(plan))]

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.batches(0, batch_size, 0))

    def load(self, i: int, flip: bool = False) -> torch.Tensor:
        with Image.open(self.items[i].path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        image = fit_to_bucket(image, self.bucket_of[i])
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
