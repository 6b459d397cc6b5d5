"""``imagesmith eval report CONFIG.yaml``: render a prompt set under several configurations (checkpoints, LoRA
mixes, samplers, steps...) and several seeds, and write the tables people otherwise make by hand:

- ``report.html`` (self-contained: images embedded), ``report.md`` (tables + a contact sheet) and
  ``report.json`` (every image's record);
- per configuration: CLIP score (house-clip in-domain; a transformers CLIP too when the config names a local
  one, on torchmetrics' 0-100 scale, naming the backbone), seconds per image, peak memory (VRAM on GPU, RSS on
  CPU), variation across seeds (the std of the CLIP score over seeds, and the mean pixel difference between
  seeds' images of one prompt);
- a plain-language summary of which configuration won on each measure.

CLIP score is ``100 * max(cos(image, prompt), 0)`` (Hessel et al.; torchmetrics' ``CLIPScore``), computed
against the prompt WITHOUT a configuration's prefix (a LoRA trigger word says nothing about the content)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import ImagesmithError
from ..core.requests import GenerateRequest


class ReportConfigError(ImagesmithError):
    code = "bad_config"
    http_status = 422


class Configuration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    loras: str = "none"
    """a LoRA set in grid syntax: ``a(0.7)+b(0.5)``, or ``none``"""
    prompt_prefix: str = ""
    """put before every prompt (e.g. the LoRAs' trigger words)"""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """any GenerateRequest field: model, sampler_name, steps, cfg_scale, scheduler..."""


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = "imagesmith evaluation report"
    base: dict[str, Any] = Field(default_factory=dict)
    """GenerateRequest fields every image shares (model, size, steps, sampler...)"""
    prompts: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    configurations: list[Configuration] = Field(min_length=1)
    clip_model: Path | None = None
    """a local transformers CLIP folder (e.g. openai/clip-vit-base-patch32 you downloaded) for a second,
    general-domain CLIP score"""
    output: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ReportConfig:
        import yaml
        path = Path(path)
        if not path.is_file():
            raise ReportConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "config"
            if err["type"] == "extra_forbidden":
                raise ReportConfigError(f"{path}: unknown key '{key}'") from None
            raise ReportConfigError(f"{path}: '{key}': {err['msg']}") from None
        if cfg.output is not None and not cfg.output.is_absolute():
            cfg = cfg.model_copy(update={"output": Path(os.path.normpath(path.parent / cfg.output))})
        if cfg.clip_model is not None and not cfg.clip_model.is_absolute():
            cfg = cfg.model_copy(update={"clip_model": path.parent / cfg.clip_model})
        return cfg

    def requests(self) -> list[tuple[Configuration, str, int, GenerateRequest]]:
        """Every (configuration, prompt, seed, request), validated before anything renders."""
        from .grid import parse_lora_set
        out = []
        for c in self.configurations:
            for prompt in self.prompts:
                for seed in self.seeds:
                    data = {**self.base, **c.overrides, "prompt": c.prompt_prefix + prompt, "seed": seed,
                            "loras": parse_lora_set(c.loras)}
                    try:
                        out.append((c, prompt, seed, GenerateRequest(**data)))
                    except ValidationError as exc:
                        err = exc.errors()[0]
                        raise ReportConfigError(f"configuration '{c.name}': '{'.'.join(map(str, err['loc']))}': "
                                                f"{err['msg']}") from None
        if len({c.name for c in self.configurations}) != len(self.configurations):
            raise ReportConfigError("configuration names must be unique")
        return out


def _extra_clip(folder: Path):
    """The user's local transformers CLIP (models/clip.py: no hub, safetensors only), named for the report."""
    from ..models.clip import TransformersClip
    if not folder.is_dir():
        raise ReportConfigError(f"clip_model {folder} is not a folder")
    clip = TransformersClip(folder)
    clip.name = f"transformers CLIP ({folder.name})"
    return clip


def _clip_score(cos: float) -> float:
    return round(100.0 * max(cos, 0.0), 2)


def _data_uri(image: Image.Image, size: int = 160) -> str:
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def run_report(engine, config: ReportConfig, out_dir: Path, *, progress=None) -> dict[str, Any]:
    """Render, measure and write the report; returns report.json's content."""
    from ..models.house_clip import load_house_clip
    from .grid import PeakMemory
    plan = config.requests()
    extra = _extra_clip(config.clip_model) if config.clip_model else None
    house_clip = load_house_clip()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    images: dict[tuple[str, str, int], Image.Image] = {}
    warmed: set[str | None] = set()
    for _, _, _, req in plan:  # load each checkpoint once, untimed: seconds are per image, not per load
        if req.model not in warmed:
            engine.generate(req.model_copy(update={"loras": [], "steps": 1, "hires": None}))
            warmed.add(req.model)
    for k, (c, prompt, seed, req) in enumerate(plan):
        with PeakMemory(engine.device) as mem:
            t0 = time.perf_counter()
            result = engine.generate(req)
            seconds = time.perf_counter() - t0
        image = result.images[0]
        path = out_dir / "images" / f"{k:04d}.png"
        image.save(path)
        cos = float(house_clip.score([image], [prompt])[0, 0])
        row = {"configuration": c.name, "prompt": prompt, "seed": seed, "image": str(path.relative_to(out_dir)),
               "seconds": round(seconds, 3), "peak_memory_mb": round(mem.peak_bytes / 2 ** 20, 1),
               "memory_kind": mem.kind, "clip_score_house": _clip_score(cos)}
        if extra is not None:
            row["clip_score_extra"] = _clip_score(float(extra.score([image], [prompt])[0, 0]))
        rows.append(row)
        images[(c.name, prompt, seed)] = image
        if progress:
            from ..core.progress import ProgressEvent
            progress(ProgressEvent(k + 1, len(plan), f"image {k + 1}/{len(plan)} ({c.name})"))
    summary = _summarise(config, rows, images)
    report = {"title": config.title, "base": config.base, "prompts": config.prompts, "seeds": config.seeds,
              "configurations": [c.model_dump() for c in config.configurations],
              "clip_backbones": {"clip_score_house": "house-clip (in-domain)",
                                 **({"clip_score_extra": extra.name} if extra else {})},
              "per_configuration": summary["table"], "winners": summary["winners"],
              "summary": summary["text"], "images": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    sheet = _contact_sheet(config, images, out_dir / "sheet.jpg")
    (out_dir / "report.md").write_text(_markdown(report, sheet.name))
    (out_dir / "report.html").write_text(_html(report, config, images))
    return report


def _summarise(config: ReportConfig, rows: list[dict], images: dict) -> dict[str, Any]:
    table = []
    for c in config.configurations:
        mine = [r for r in rows if r["configuration"] == c.name]
        entry: dict[str, Any] = {"configuration": c.name, "loras": c.loras, "images": len(mine)}
        for key in ("clip_score_house", "clip_score_extra"):
            if key in mine[0]:
                entry[key] = round(statistics.mean(r[key] for r in mine), 2)
                spreads = [statistics.pstdev([r[key] for r in mine if r["prompt"] == p]) for p in config.prompts]
                entry[key + "_seed_std"] = round(statistics.mean(spreads), 2)
        diffs = []
        for p in config.prompts:
            arrs = [np.asarray(images[(c.name, p, s)].convert("RGB"), np.float32) for s in config.seeds]
            diffs += [float(np.abs(a - b).mean()) for i, a in enumerate(arrs) for b in arrs[i + 1:]
                      if a.shape == b.shape]
        entry["seed_pixel_difference"] = round(statistics.mean(diffs), 2) if diffs else None
        entry["seconds_per_image"] = round(statistics.mean(r["seconds"] for r in mine), 3)
        entry["peak_memory_mb"] = round(max(r["peak_memory_mb"] for r in mine), 1)
        entry["memory_kind"] = mine[0]["memory_kind"]
        table.append(entry)
    winners: dict[str, str] = {}
    lines = []

    def pick(key: str, best: str, label: str, unit: str = "") -> None:
        vals = [t for t in table if t.get(key) is not None]
        if not vals:
            return
        win = (max if best == "max" else min)(vals, key=lambda t: t[key])
        winners[key] = win["configuration"]
        others = sorted((t[key] for t in vals if t is not win), reverse=best == "max")
        margin = f" (next best {others[0]}{unit})" if others else ""
        lines.append(f"- {label}: **{win['configuration']}** with {win[key]}{unit}{margin}.")
    pick("clip_score_house", "max", "Best prompt match by house-clip's CLIP score")
    pick("clip_score_extra", "max", "Best prompt match by the transformers CLIP score")
    pick("seconds_per_image", "min", "Fastest", " s per image")
    pick("peak_memory_mb", "min", "Least memory", " MB peak")
    pick("seed_pixel_difference", "max", "Most varied across seeds (mean pixel difference between seeds)")
    pick("clip_score_house_seed_std", "min", "Steadiest prompt match across seeds (lowest CLIP-score std)")
    base = next((t for t in table if t["loras"] in ("none", "")), None)
    if base is not None and "clip_score_house" in base:
        kept = [t["configuration"] for t in table if t is not base and t["clip_score_house"] >= base["clip_score_house"] - 2]
        lines.append(f"- Within 2 CLIP points of `{base['configuration']}` (the content survives the style): "
                     + (", ".join(kept) if kept else "none") + ".")
    return {"table": table, "winners": winners, "text": "\n".join(lines)}


def _contact_sheet(config: ReportConfig, images: dict, path: Path, cell: int = 128) -> Path:
    from .grid import labelled_grid
    cells = []
    for c in config.configurations:
        for p in config.prompts:
            im = images[(c.name, p, config.seeds[0])].convert("RGB").resize((cell, cell))
            cells.append((im, f"{c.name}: {p}"))
    sheet = labelled_grid(cells, len(config.prompts), title=f"{config.title} (seed {config.seeds[0]})", cell=cell)
    sheet.save(path, "JPEG", quality=88)
    return path


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _columns(report: dict) -> list[tuple[str, str]]:
    cols = [("configuration", "configuration"), ("loras", "LoRAs"), ("clip_score_house", "CLIP score (house-clip)"),
            ("clip_score_house_seed_std", "its std across seeds")]
    if "clip_score_extra" in report["clip_backbones"]:
        cols += [("clip_score_extra", f"CLIP score ({report['clip_backbones']['clip_score_extra']})"),
                 ("clip_score_extra_seed_std", "its std across seeds")]
    return cols + [("seed_pixel_difference", "pixel difference between seeds"),
                   ("seconds_per_image", "s / image"), ("peak_memory_mb", "peak memory MB")]


def _markdown(report: dict, sheet: str) -> str:
    cols = _columns(report)
    lines = [f"# {report['title']}", "",
             f"{len(report['prompts'])} prompts x {len(report['seeds'])} seeds (seeds {report['seeds']}) x "
             f"{len(report['per_configuration'])} configurations; shared settings: `{json.dumps(report['base'])}`. "
             "CLIP score = 100 x max(cosine, 0), against the prompt without trigger words. Memory: "
             f"{report['per_configuration'][0]['memory_kind'].upper()}.", "", "## Summary", "", report["summary"], "",
             "## Per configuration", "", "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "---|" * len(cols)]
    for t in report["per_configuration"]:
        lines.append("| " + " | ".join(_fmt(t.get(k)) for k, _ in cols) + " |")
    lines += ["", "## Images", "", f"![contact sheet]({sheet})", "", "Every image: `report.json`; with pictures: "
              "`report.html`.", ""]
    return "\n".join(lines)


def _html(report: dict, config: ReportConfig, images: dict) -> str:
    cols = _columns(report)
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(t.get(k)))}</td>" for k, _ in cols) + "</tr>"
                   for t in report["per_configuration"])
    summary = "".join(f"<li>{e(line[2:]).replace('**', '')}</li>" for line in report["summary"].splitlines())
    grid = []
    for c in config.configurations:
        cells = "".join(
            f"<td><img src='{_data_uri(images[(c.name, p, s)])}' alt='{e(p)} seed {s}'><br>"
            f"<small>seed {s}: {next(r['clip_score_house'] for r in report['images'] if r['configuration'] == c.name and r['prompt'] == p and r['seed'] == s)}</small></td>"
            for p in config.prompts for s in config.seeds)
        grid.append(f"<tr><th>{e(c.name)}<br><small>{e(c.loras)}</small></th>{cells}</tr>")
    heads = "".join(f"<th>{e(p)}<br><small>seed {s}</small></th>" for p in config.prompts for s in config.seeds)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(report['title'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:center;vertical-align:top}}img{{width:128px}}</style></head>
<body><h1>{e(report['title'])}</h1>
<p>{len(config.prompts)} prompts x {len(config.seeds)} seeds x {len(config.configurations)} configurations.
CLIP score = 100 x max(cosine, 0) against the prompt without trigger words; backbones:
{e(', '.join(report['clip_backbones'].values()))}. Memory: {e(report['per_configuration'][0]['memory_kind'].upper())}.</p>
<h2>Summary</h2><ul>{summary}</ul>
<h2>Per configuration</h2><table><tr>{head}</tr>{body}</table>
<h2>Images</h2><table><tr><th></th>{heads}</tr>{''.join(grid)}</table>
</body></html>
"""
