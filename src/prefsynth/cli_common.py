"""What the CLI's command groups share (cli.py, review_cli.py): the stderr console and how a bad input ends a
command (a message, exit 2, no traceback)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def fail(err: Exception) -> typer.Exit:
    """Print `error: MESSAGE` and return the exit (code 2) to raise."""
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # text, not markup: [local]
    return typer.Exit(2)
