"""Training datasets: check and caption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import app, _Exit

dataset_app = typer.Typer(no_args_is_help=True, help="Training datasets: check and caption.")
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
def dataset_check(folder: Path = typer.Argument(..., help="kohya-style folder (image + .txt) or one with metadata.jsonl"),
                  min_side: int = typer.Option(256, "--min-side", help="flag images smaller than this on a side"),
                  as_json: bool = typer.Option(False, "--json")):
    """Find missing or empty captions, unreadable images and size outliers; exit 1 when a problem blocks training."""
    from ..train.lora_data import scan_folder
    report = scan_folder(folder, min_side=min_side)
    data = report.to_dict()
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        print(f"{folder}: {data['images']} usable images ({data['with_repeats']} with repeats), "
              f"captions from {data['source']}; sides {data['min_side']}-{data['max_side']} px")
        for line in report.problems:
            print(f"  problem: {line}")
        for p, why in report.outliers:
            print(f"  outlier: {p}: {why}")
        for p in report.orphan_captions:
            print(f"  note: {p} has no image")
        if data["ok"]:
            print("ok")
    if not data["ok"]:
        raise _Exit(f"{len(report.problems)} problem(s) in {folder}: fix them before training", 1)


@dataset_app.command("caption")
def dataset_caption(folder: Path = typer.Argument(..., help="folder of images; captions go beside them as .txt"),
                    overwrite: bool = typer.Option(False, "--overwrite", help="re-caption images that have a caption"),
                    trigger: Optional[str] = typer.Option(None, "--trigger", help="put this word first in each caption"),
                    labels: Optional[Path] = typer.Option(None, "--labels", help="a text file of object names, one a line "
                                                          "(default: house-clip's 725 training objects)"),
                    clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that names the object "
                                                       "(default house-clip; or a transformers CLIP by name/folder)"),
                    as_json: bool = typer.Option(False, "--json")):
    """Write captions with imagesmith's own models (house-clip names the object, house-cutout finds the backdrop)."""
    from ..vision.caption import caption_folder
    names = None
    if labels is not None:
        if not labels.is_file():
            raise _Exit(f"labels file {labels} does not exist")
        names = [x.strip() for x in labels.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not names:
            raise _Exit(f"labels file {labels} is empty")
    records = caption_folder(folder, overwrite=overwrite, trigger_word=trigger, labels=names, progress=not as_json,
                             clip=clip)
    if as_json:
        print(json.dumps(records, indent=1))
    else:
        for r in records:
            print(f"{'wrote' if r['written'] else 'kept '}  {r['file']}: {r.get('caption', r.get('error'))}")
