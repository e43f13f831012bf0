"""`securegmi` console script: the composition root and the only place with terminal I/O.

The commands live in `simulate` and `runs`; importing them registers them on the app."""

from __future__ import annotations

from . import runs, simulate
from .app import app

__all__ = ["app", "main", "runs", "simulate"]


def main() -> None:
    app()
