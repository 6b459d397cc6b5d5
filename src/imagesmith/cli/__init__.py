"""imagesmith command line: parse -> typed request -> engine -> files and a summary (or --json). One module per
command group (generate, models, house, train, dataset, vision, workflows, evaluate, service) registers its
commands on the root app of :mod:`.common`.

Bad input never shows a traceback: one line on stderr and exit code 2 (IMAGESMITH_DEBUG=1 shows it)."""

from __future__ import annotations

import os
import sys

# each module registers its commands on the root app; this order is the order of `imagesmith --help`
from . import generate, models, vision, workflows, evaluate, service, dataset, house, train  # noqa: F401, I001
from .common import _Exit, _validation_line, app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from ..core.errors import ImagesmithError
    try:
        app(args=argv, standalone_mode=False)
    except ImagesmithError as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(_validation_line(exc))
    except _Exit as exc:
        _fail(exc.message, exc.code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as exc:  # usage errors and anything unexpected: one line, no traceback
        # Typer vendors its own click (typer._click), so recognise click's usage errors by interface
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _fail(exc.format_message(), exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            _fail("aborted", 1)
        if os.environ.get("IMAGESMITH_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set IMAGESMITH_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int = 2) -> None:
    if os.environ.get("IMAGESMITH_DEBUG") and sys.exc_info()[0] is not None:
        import traceback
        traceback.print_exc()
    print(f"imagesmith: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)
