"""Evaluation: metrics of models and tools, and the X/Y/Z grid."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import app, _Exit, _engine, _progress_bar, _segmenter

eval_app = typer.Typer(no_args_is_help=True, help="Evaluation: metrics of models and tools.")
app.add_typer(eval_app, name="eval")


@eval_app.command("cutout")
def eval_cutout(segmenter: Optional[str] = typer.Option(None, "--segmenter", help="default house-cutout"),
                which: str = typer.Option("hard,real", "--set", help="comma list of hard (held-out composites "
                                          "on real photos, textures, clutter...), real (hand-masked photographs), "
                                          "house (the old easy renders)"),
                per_kind: int = typer.Option(30, "--per-kind", min=1, help="hard samples per source kind"),
                size: int = typer.Option(512, "--size", min=64, max=2048, help="hard composites' side in px"),
                seed: int = typer.Option(0, "--seed"),
                out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON report here"),
                as_json: bool = typer.Option(False, "--json")):
    """Cut-out MAE, IoU and boundary F on inputs the model was not trained on, per source kind (build the sources
    once: imagesmith house data --cutout)."""
    from ..train import cutout_eval as EC
    sets = [w.strip() for w in which.split(",") if w.strip()]
    unknown = sorted(set(sets) - {"hard", "real", "house"})
    if unknown or not sets:
        raise _Exit(f"--set takes hard, real and/or house, not {which!r}")
    seg = _segmenter(segmenter)
    report: dict = {"segmenter": str(getattr(seg, "name", segmenter or "house-cutout"))}
    if "hard" in sets:
        from ..train.house_data import HouseDataError
        try:
            from ..core.progress import ProgressEvent
            with _progress_bar(not as_json and sys.stderr.isatty(), "cut-out eval") as on_progress:
                tick = (lambda done, total: on_progress(ProgressEvent(done, total, "hard composites"))) \
                    if on_progress else None
                report["hard"] = EC.evaluate_hard(seg, per_kind=per_kind, size=size, seed=seed, progress=tick)
        except HouseDataError as exc:
            raise _Exit(str(exc)) from None
    if "real" in sets:
        report["real"] = EC.evaluate_real(seg)
    if "house" in sets:
        from ..train.house_cutout import HouseCutoutConfig, evaluate as evaluate_cutout, house_eval_datasets
        native, large = house_eval_datasets(HouseCutoutConfig(), None, getattr(seg, "size", 128))
        report["house"] = evaluate_cutout(seg, native, large_dataset=large)
    if out:
        out.write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(EC.format_table(report))
        if "house" in report:
            print(f"house renders: {report['house']}")


@eval_app.command("report")
def eval_report(config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="prompts, seeds, configurations (see examples/report/house-styles.yaml)"),
                output: Optional[Path] = typer.Option(None, "-o", "--output", help="report folder (default: the config's output)"),
                as_json: bool = typer.Option(False, "--json", help="print report.json's summary part")):
    """Render prompts x seeds under several configurations; write report.html, report.md, report.json."""
    import time as _time

    from ..core.settings import Settings
    from ..eval.report import ReportConfig, run_report
    cfg = ReportConfig.from_yaml(config)
    cfg.requests()  # every request is valid: fail before loading anything
    out = output or cfg.output or Settings.from_env().home / "outputs" / "reports" / _time.strftime("%Y%m%d-%H%M%S")
    engine = _engine()
    with _progress_bar(not as_json and sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1",
                       "report") as on_progress:
        report = run_report(engine, cfg, out, progress=on_progress)
    if as_json:
        print(json.dumps({k: report[k] for k in ("title", "per_configuration", "winners", "summary")}, indent=1))
    else:
        print(report["summary"])
        print(f"{out / 'report.html'}\n{out / 'report.md'}")


@eval_app.command("ads")
def eval_ads(manifests: List[str] = typer.Argument(..., help="manifest.json files or folders holding them"),
             as_json: bool = typer.Option(False, "--json")):
    """Layout and legibility statistics over finished ads: mean Occ/Rea, contrast pass rate, file sizes."""
    from ..eval.ads import summarize_ads
    stats = summarize_ads(manifests)
    if as_json:
        print(json.dumps(stats, indent=2))
    else:
        for k, v in stats.items():
            print(f"{k}: {v}")


@app.command()
def grid(
    prompt: str = typer.Argument(..., help="base prompt in WebUI syntax"),
    x: Optional[str] = typer.Option(None, "--x", help="x axis (columns): FIELD=V1,V2,... e.g. 'cfg_scale=3,5,7', "
                                    "'steps=10-30 (+10)', 'loras=a(1.0) | a(0.7)+b(0.5) | none', 'prompt_sr=red,blue'"),
    y: Optional[str] = typer.Option(None, "--y", help="y axis (rows), same syntax"),
    z: Optional[str] = typer.Option(None, "--z", help="z axis (one panel per value), same syntax"),
    negative: str = typer.Option("", "--negative", "-n", help="negative prompt"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (imagesmith models list)"),
    lora: List[str] = typer.Option([], "--lora", help="NAME:WEIGHT in every cell, repeatable"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale"),
    sampler: str = typer.Option("Euler a", "--sampler", help="WebUI sampler name, e.g. 'DPM++ 2M'"),
    schedule: str = typer.Option("normal", "--schedule", "--scheduler", help="normal, karras, exponential"),
    seed: int = typer.Option(-1, "--seed", help="-1: one random seed for every cell"),
    width: Optional[int] = typer.Option(None, "--width", "-W"),
    height: Optional[int] = typer.Option(None, "--height", "-H"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for the cells, grid.png, grid.json"),
    as_json: bool = typer.Option(False, "--json", help="print grid.json's summary on stdout"),
):
    """X/Y/Z plot: sweep request fields along up to three axes into one labelled grid (+ grid.json)."""
    import time as _time

    from ..core.requests import GenerateRequest, LoraSpec
    from ..core.settings import Settings
    from ..eval.grid import AxisSpec, GridRequest, run_grid

    base = GenerateRequest(prompt=prompt, negative_prompt=negative, model=model,
                           loras=[LoraSpec.parse(v) for v in lora], steps=steps, cfg_scale=cfg,
                           sampler_name=sampler, scheduler=schedule, seed=seed, width=width, height=height)
    req = GridRequest(base=base, x=AxisSpec.parse(x) if x else None, y=AxisSpec.parse(y) if y else None,
                      z=AxisSpec.parse(z) if z else None)
    req.plan()  # every cell's request is valid: fail before loading anything
    out_dir = output or Settings.from_env().home / "outputs" / "grids" / _time.strftime("%Y%m%d-%H%M%S")
    engine = _engine()
    with _progress_bar(not as_json and sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1",
                       "grid") as on_progress:
        result = run_grid(engine, req, out_dir, progress=on_progress)
    if as_json:
        print(result.json_path.read_text(encoding="utf-8"))
    else:
        print(f"{result.grid_path}  ({len(result.cells)} cells in {result.seconds:.1f}s)")
        print(f"{result.json_path}")
