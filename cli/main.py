"""`securegmi` console script: the composition root and the only place with terminal I/O.

The commands live in `simulate` and `runs`; importing them registers them on the app."""

from __future__ import annotations

from securegmi.cli import runs, simulate
from securegmi.cli.app import app

__all__ = ["app", "main", "runs", "simulate"]


def main() -> None:
    app()
