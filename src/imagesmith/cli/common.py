"""What every command group shares: the root Typer app, the one-line error, progress bars, the engine."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Self-hosted image generation: engine, models, tools.")


class _Exit(Exception):
    def __init__(self, message: str, code: int = 2):
        self.message, self.code = message, code


def _validation_line(exc) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@contextmanager
def _progress_bar(enabled: bool, label: str):
    """Yields a callback for engine progress events; draws a rich bar on stderr when enabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def on_progress(event):
            bar.update(task, total=event.total, completed=event.step, description=f"{label} [{event.phase}]")
        yield on_progress


def _engine():
    # our own bar covers the job; the libraries' per-component loading bars would only clutter stderr
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    from ..engine.generate import Engine
    return Engine()


def _checkpoint_ref(engine, model: Optional[str]) -> Optional[str]:
    """`--model` takes a registered name or a path to a checkpoint file or diffusers folder (a training
    export); a path is listed in the engine's registry and its resolved form returned as the name to use."""
    if not model:
        return model
    path = Path(model).expanduser()
    if not (model.startswith(("/", "./", "../", "~")) or path.exists()):
        return model
    return engine.registry.add_path(path, "checkpoint").rel_path


def _check_output(output: Optional[Path], count: int) -> None:
    from ..core.imageio import output_paths
    if output is not None:
        output_paths(output, count, output, "image")


def _segmenter(name: Optional[str]):
    from ..models.segment import resolve_segmenter
    return resolve_segmenter(name)
