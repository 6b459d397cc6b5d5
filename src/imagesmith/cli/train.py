"""Training: the house models and LoRAs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import app, _Exit

train_app = typer.Typer(no_args_is_help=True, help="Training.")
app.add_typer(train_app, name="train")
train_house_app = typer.Typer(no_args_is_help=True, help="Train the house models.")
train_app.add_typer(train_house_app, name="house")


@train_house_app.command("ldm")
def train_house_ldm(config: Optional[Path] = typer.Option(None, "--config", help="HouseLdmConfig YAML"),
                    stage: str = typer.Option("all", "--stage", help="vae or all"),
                    export: Optional[Path] = typer.Option(None, "--export", help="where the house folder goes")):
    """Train house-ldm (VAE, then UNet); re-running the same command resumes from the last checkpoint."""
    from ..train.house_ldm import HouseLdmConfig, house_dataset, run_training
    if stage not in ("vae", "all"):
        raise _Exit(f"--stage must be vae or all, not {stage!r}")
    cfg = HouseLdmConfig.from_yaml(config) if config else HouseLdmConfig()
    out = run_training(cfg, house_dataset(cfg), stage=stage, export=export)
    if out:
        print(f"house-ldm written to {out}")


@train_house_app.command("clip")
def train_house_clip(config: Optional[Path] = typer.Option(None, "--config", help="HouseClipConfig YAML"),
                     export: Optional[Path] = typer.Option(None, "--export", help="where the house-clip folder goes")):
    """Train house-clip (image tower + text head on the frozen MiniLM); re-run to resume."""
    from ..train.house_clip import main as clip_main
    args = (["--config", str(config)] if config else []) + (["--export", str(export)] if export else [])
    raise typer.Exit(clip_main(args))


@train_house_app.command("cutout")
def train_house_cutout(config: Optional[Path] = typer.Option(None, "--config", help="HouseCutoutConfig YAML"),
                       export: Optional[Path] = typer.Option(None, "--export", help="where the house-cutout folder goes")):
    """Train house-cutout (salient-object matting U-Net); re-run to resume."""
    from ..train.house_cutout import main as cutout_main
    args = (["--config", str(config)] if config else []) + (["--export", str(export)] if export else [])
    raise typer.Exit(cutout_main(args))


@train_app.command("lora")
def train_lora_cmd(config: Path = typer.Argument(..., metavar="CONFIG.yaml", help="LoRA training config (see examples/lora/lora.yaml)"),
                   as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON")):
    """Train a LoRA on a registered checkpoint or house-ldm; re-run the same command to resume."""
    from ..train.lora import train_lora
    summary = train_lora(config)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['lora']}  (registered: --lora {summary['name']}:1.0)")
        print(f"{summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}, "
              f"{summary['wall_seconds']} s; card: {summary['card']}")
