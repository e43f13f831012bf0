"""Protocols found by name: each protocol module registers its builder under the entry-point
group `securegmi.protocols` (the built-ins `plain`, `dp` and `secure` in securegmi's own
pyproject.toml), so a third-party package ships a protocol by declaring one entry point,
as pytest and Flower find their plugins, and nothing in the library imports `protocols/`.

A builder is `build(*, components, parameters, top_b=None[, statistics=None]) -> ProtocolSpec`.
This module is the one place a protocol is bound to a run's dimensions: `bind` from the sizes
a run knows, `rebind` from the dimensions a recorded `ProtocolSpec` carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from securegmi.errors import ConfigError
from securegmi.protocol.spec import ProtocolBuilder, ProtocolSpec

GROUP = "securegmi.protocols"
# The statistics phase's sizes (protocols/_round.py): a spec binding "M" was built with them.
STATISTICS_DIMS = ("M", "S", "H", "N", "I", "G")


# securegmi's own protocols, and the one entry point each may have: another package (or a
# *.dist-info in the working directory, which `python -c` puts on sys.path) claiming one of
# these names would otherwise decide what the audit checks a run against.
BUILT_IN = {name: f"securegmi.protocols.{name}:build" for name in ("plain", "dp", "secure")}


def _entry_points() -> dict[str, list[EntryPoint]]:
    # Read on every call, not cached: a plugin installed (or put on sys.path) after import is
    # found, and the scan of installed metadata costs milliseconds next to binding a run.
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=GROUP):
        claims = found.setdefault(point.name, [])
        if all(point.value != c.value for c in claims):
            claims.append(point)
    return found


def _entry_point(name: str) -> EntryPoint | None:
    """The one entry point of `name`; a `ConfigError` where two packages claim the name, or
    where a built-in name points anywhere but at securegmi's own module."""
    claims = _entry_points().get(name, [])
    if not claims:
        return None
    values = ", ".join(sorted(repr(c.value) for c in claims))
    if len(claims) > 1 or (name in BUILT_IN and claims[0].value != BUILT_IN[name]):
        raise ConfigError(
            f"protocol {name!r} is claimed by {values} in entry-point group {GROUP!r}"
            + (f", where securegmi's own is {BUILT_IN[name]!r}" if name in BUILT_IN else "")
            + ": a run cannot be bound or audited under a name two packages claim; uninstall the "
            "package that should not register it (or leave the directory whose *.dist-info does)"
        )
    return claims[0]


def available() -> tuple[str, ...]:
    """The names of every registered protocol, sorted."""
    return tuple(sorted(_entry_points()))


def _where(point: EntryPoint) -> str:
    return f"protocol {point.name!r} (entry point {point.value!r} in group {GROUP!r})"


def builder(name: str) -> ProtocolBuilder:
    """The builder registered under `name`; a `ConfigError` says why when there is none."""
    point = _entry_point(name)
    if point is None:
        registered = available()
        names = ", ".join(registered) or "none"
        stale = "plain" not in registered  # securegmi's own protocols are always registered
        raise ConfigError(
            f"unknown protocol {name!r}; registered protocols: {names}. A protocol is registered by "
            f'an entry point in group {GROUP!r} ([project.entry-points."{GROUP}"] in its package\'s '
            "pyproject.toml): install the package that provides it, or pick a registered one"
            + (
                "; securegmi's own plain/dp/secure are missing too, so the metadata Python reads is "
                "stale (a securegmi.egg-info in the working directory shadows the installed one): "
                "delete it, or reinstall with `pip install -e .`"
                if stale
                else ""
            )
        )
    try:
        loaded = point.load()
    except Exception as exc:  # a plugin's import may fail any way: say which plugin and why
        raise ConfigError(
            f"{_where(point)} fails to load ({type(exc).__name__}: {exc}); fix or reinstall the "
            "package that provides it"
        ) from exc
    if not callable(loaded):
        raise ConfigError(
            f"{_where(point)} names a {type(loaded).__name__}, not a builder; it must name a function "
            "build(*, components, parameters, top_b=None) returning a ProtocolSpec"
        )
    return loaded  # type: ignore[no-any-return]


def bind(
    name: str,
    *,
    components: int,
    parameters: int,
    top_b: int | None = None,
    statistics: Mapping[str, int] | None = None,
) -> ProtocolSpec:
    """The protocol registered under `name`, bound to K components of P parameters (B sent
    per client, all K unless `top_b`) and, for the private statistics design, its sizes."""
    build = builder(name)
    extra = {} if statistics is None else {"statistics": dict(statistics)}
    try:
        spec = build(components=components, parameters=parameters, top_b=top_b, **extra)
    except TypeError as exc:  # the builder does not take these arguments
        raise ConfigError(
            f"{_where(_entry_points()[name][0])} cannot be bound to these dimensions ({exc}); a builder "
            "takes components=, parameters=, top_b= and, for the statistics design, statistics="
        ) from exc
    if not isinstance(spec, ProtocolSpec):
        raise ConfigError(
            f"{_where(_entry_points()[name][0])} returned a {type(spec).__name__}, not a ProtocolSpec; "
            "fix the package that provides it"
        )
    if spec.name != name:
        # config.json, the plan's placement and the audit all read the name: a protocol under
        # another name would be audited as the one it is not.
        raise ConfigError(
            f"{_where(_entry_points()[name][0])} builds a protocol named {spec.name!r}; the name it is "
            "registered under and the name it declares must be the same"
        )
    return spec


def rebind(name: str, dims: Mapping[str, int]) -> ProtocolSpec:
    """The protocol registered under `name` bound at the dimensions a bound spec records
    (K, P, B and the statistics phase's), the way `bind` bound it."""
    try:
        components, parameters, sent = int(dims["K"]), int(dims["P"]), int(dims["B"])
    except KeyError as exc:
        raise ConfigError(f"protocol {name!r}: the recorded dimensions lack {exc}") from None
    statistics = {d: int(dims[d]) for d in STATISTICS_DIMS if d in dims} if "M" in dims else None
    return bind(
        name,
        components=components,
        parameters=parameters,
        top_b=None if sent == components else sent,
        statistics=statistics,
    )
