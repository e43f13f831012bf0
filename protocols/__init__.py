"""Protocol declarations, one module per protocol (installed as ``securegmi.protocols``)."""

from __future__ import annotations

from collections.abc import Callable

from securegmi.errors import ConfigError
from securegmi.protocol import ProtocolSpec

from . import dp, plain, secure

Builder = Callable[..., ProtocolSpec]
PROTOCOLS: dict[str, Builder] = {plain.NAME: plain.build, dp.NAME: dp.build, secure.NAME: secure.build}


def builder(name: str) -> Builder:
    """The builder of the named protocol; it takes the run's dimensions (K, P, B)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; available: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]
