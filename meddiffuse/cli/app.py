"""The typer application and shared console; command modules register onto ``app``."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="meddiffuse",
    help="Train classifiers on synthetic medical images: ingest, generate, classify, explain, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# piped output (logs, CI) gets 120 columns instead of rich's 80, so result tables stay readable
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)
