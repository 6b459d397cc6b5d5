"""House models: dataset, styles, sample sheet, metrics, objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import app, _Exit, _checkpoint_ref, _engine

house_app = typer.Typer(no_args_is_help=True, help="House models: dataset, sample sheet, metrics.")
app.add_typer(house_app, name="house")


@house_app.command("data")
def house_data(cache: Optional[Path] = typer.Option(None, "--cache", help="default: ~/.cache/imagesmith"),
               seed: int = typer.Option(0, "--seed"),
               preview: Optional[Path] = typer.Option(None, "--preview", help="also write a sample sheet PNG here"),
               cutout: bool = typer.Option(False, "--cutout", help="also fetch the cut-out sources: Debian wallpaper "
                                           "packages (apt-get download) and flat emoji sets (npm), split train/eval"),
               as_json: bool = typer.Option(False, "--json")):
    """Build the house dataset (fetches the Fluent Emoji 3D npm package into a cache outside git)."""
    from ..train.house_data import build_house_dataset, default_cache_dir, save_preview_sheet
    cache_dir = cache or default_cache_dir()
    ds = build_house_dataset(cache_dir, seed=seed, progress=not as_json)
    if cutout:
        from ..train.cutout_data import build_sources
        record = build_sources(cache_dir, progress=not as_json)
        n_bg = {sp: sum(b["split"] == sp for b in record["backgrounds"]) for sp in ("train", "eval")}
        if not as_json:
            print(f"cut-out sources: backgrounds train {n_bg['train']} / eval {n_bg['eval']} (disjoint groups), "
                  f"flat sets {', '.join(f['set'] + ' (' + f['split'] + ')' for f in record['flat_sets'])}")
    counts: dict[str, int] = {}
    for obj in ds.objects:
        counts[obj.split] = counts.get(obj.split, 0) + 1
    if preview:
        save_preview_sheet(preview, cache_dir=cache_dir, seed=seed, progress=not as_json)
    summary = {"cache": str(cache_dir), "objects": len(ds.objects), "splits": counts,
               "preview": str(preview) if preview else None}
    print(json.dumps(summary, indent=2) if as_json else
          f"{len(ds.objects)} objects in {cache_dir} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


@house_app.command("styles")
def house_styles(styles: Optional[List[str]] = typer.Argument(None, help="fluent-flat, noto, openmoji (default: all)"),
                 train: bool = typer.Option(False, "--train", help="also train each style's LoRA on house-ldm"),
                 ship: bool = typer.Option(False, "--ship", help="with --train: copy the LoRAs into the package (maintainers)"),
                 as_json: bool = typer.Option(False, "--json")):
    """Build the house style datasets from their npm icon sets (and train the style LoRAs)."""
    from ..core.settings import Settings
    from ..train.house_styles import STYLES, build_style_dataset, train_style
    chosen = styles or list(STYLES)
    unknown = [s for s in chosen if s not in STYLES]
    if unknown:
        raise _Exit(f"unknown style {unknown[0]!r}; known: {', '.join(STYLES)}")
    settings = Settings.from_env()
    results = {}
    for style in chosen:
        if train:
            results[style] = train_style(style, settings, ship=ship)
        else:
            results[style] = {"dataset": str(build_style_dataset(style, cache_dir=settings.home / "cache"))}
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        for style, r in results.items():
            print(f"{style}: " + (r.get("shipped") or r.get("lora") or r["dataset"]))


@house_app.command("sheet")
def house_sheet(output: Path = typer.Option(Path("docs/house-ldm-samples.png"), "-o", "--output"),
                model: Optional[str] = typer.Option(None, "--model", help="checkpoint name or folder path (default: house-ldm)"),
                steps: int = typer.Option(20, "--steps"), cfg_scale: float = typer.Option(5.0, "--cfg-scale"),
                sampler: str = typer.Option("DPM++ 2M", "--sampler"), schedule: str = typer.Option("karras", "--scheduler"),
                seed: int = typer.Option(1, "--seed")):
    """Draw the house-ldm sample sheet: 32 objects, outside wording, backdrops, colours, seeds."""
    from ..train.house_eval import SheetSettings, render_sheet
    st = SheetSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, scheduler=schedule, seed=seed)
    engine = _engine()
    print(render_sheet(engine, output, settings=st, model=_checkpoint_ref(engine, model)))


@house_app.command("eval")
def house_eval(which: str = typer.Argument("ldm", help="ldm, clip, cutout or all"),
               n: int = typer.Option(64, "--n", help="held-out samples (ldm)"),
               model: Optional[str] = typer.Option(None, "--model", help="checkpoint for ldm name or folder path (default: house-ldm)"),
               steps: int = typer.Option(20, "--steps", min=1, max=150, help="ldm: sampling steps"),
               cfg: float = typer.Option(5.0, "--cfg", min=0.0, max=30.0, help="ldm: CFG scale"),
               sheet_seeds: int = typer.Option(4, "--sheet-seeds", min=0, max=16,
                                               help="ldm: seeds per bare sheet prompt for the 'sheet' metrics "
                                               "(recognition and seed variety); 0 skips them"),
               as_json: bool = typer.Option(False, "--json")):
    """Held-out metrics of the house models (val_views / val_objects splits of the house dataset); for ldm
    also the sample sheet's bare prompts ("a teapot") over several seeds."""
    from ..train import house_eval as E
    if which not in ("ldm", "clip", "cutout", "all"):
        raise _Exit(f"which must be ldm, clip, cutout or all, not {which!r}")
    results: dict = {}
    if which in ("clip", "all"):
        from ..models.house_clip import load_house_clip
        from ..train.house_clip import HouseClipConfig, evaluate as evaluate_clip
        clip = load_house_clip()
        cfg = HouseClipConfig().model_copy(update={"image_size": clip.arch.image_size})
        results["house-clip"] = evaluate_clip(clip, config=cfg, progress=not as_json)
    if which in ("cutout", "all"):
        from ..models.segment import HouseCutout, house_cutout_dir
        from ..train.house_cutout import HouseCutoutConfig, evaluate as evaluate_cutout, house_eval_datasets
        seg = HouseCutout(house_cutout_dir())
        native, large = house_eval_datasets(HouseCutoutConfig(), None, seg.size)
        results["house-cutout"] = evaluate_cutout(seg, native, large_dataset=large)
    if which in ("ldm", "all"):
        from ..models.house_clip import load_house_clip
        from ..models.segment import load_segmenter
        engine, clip, st = _engine(), load_house_clip(), E.SheetSettings(steps=steps, cfg_scale=cfg)
        model = _checkpoint_ref(engine, model)
        results["house-ldm"] = E.evaluate_ldm(engine, clip, cutout=load_segmenter("house-cutout"), n=n, model=model,
                                              progress=not as_json, settings=st)
        if sheet_seeds:
            results["house-ldm"]["sheet"] = E.sheet_metrics(engine, clip, settings=st, model=model,
                                                            seeds=tuple(range(1, sheet_seeds + 1)),
                                                            progress=not as_json)
    print(json.dumps(results, indent=2))


@house_app.command("objects")
def house_objects(output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                        help="write the report (ranks per object) as JSON here"),
                  weights: Optional[Path] = typer.Option(None, "--weights", help="write hard-object visit weights "
                                                         "(the object_weights training key) as JSON here"),
                  model: Optional[str] = typer.Option(None, "--model", help="checkpoint name or folder path (default: house-ldm)"),
                  seeds: int = typer.Option(1, "--seeds", min=1, max=16, help="images per object (seeds 1..N)"),
                  steps: int = typer.Option(20, "--steps", min=1, max=150),
                  cfg: float = typer.Option(5.0, "--cfg", min=0.0, max=30.0),
                  as_json: bool = typer.Option(False, "--json")):
    """Draw every training object from its bare name and rank it with house-clip: which objects the model
    draws badly (and, with --weights, a curriculum that visits them more often in the next fine-tune)."""
    import numpy as np

    from ..core.imageio import write_json_atomic
    from ..models.house_clip import load_house_clip
    from ..train import house_eval as E
    for path in (output, weights):
        if path is not None and not path.parent.is_dir():
            raise _Exit(f"{path.parent}: no such folder")
    st = E.SheetSettings(steps=steps, cfg_scale=cfg)
    engine = _engine()
    report = E.object_recognition(engine, load_house_clip(), settings=st, model=_checkpoint_ref(engine, model),
                                  seeds=tuple(range(1, seeds + 1)), progress=not as_json)
    if output is not None:
        write_json_atomic(output, report)
    summary = {k: v for k, v in report.items() if k != "ranks"}
    if weights is not None:
        w = E.hard_object_weights(report)
        write_json_atomic(weights, dict(sorted(w.items())))
        summary["weights"] = {str(k): sum(1 for v in w.values() if v == k) for k in sorted(set(w.values()))}
    worst = sorted(report["ranks"].items(), key=lambda kv: -float(np.mean(kv[1])))[:10]
    summary["worst"] = [name for name, _ in worst]
    print(json.dumps(summary) if as_json else json.dumps(summary, indent=2))
