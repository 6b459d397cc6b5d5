"""The model registry."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .common import app

models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(kind: Optional[str] = typer.Option(None, "--kind", help="checkpoint, vae, lora, embedding, upscaler, controlnet"),
                as_json: bool = typer.Option(False, "--json")):
    """List registered models: name, kind, architecture, path, size."""
    from ..core.settings import Settings
    from ..models.house import make_registry
    rows = make_registry(Settings.from_env()).to_table_rows(kind)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("name", "kind", "arch", "size", "path")
    for r in rows:
        size = r["size_bytes"]
        table.add_row(r["name"], r["kind"], r["arch"], f"{size / 1e6:.1f} MB" if size else "-", str(r["path"]))
    Console().print(table)
