"""DP events of FedGMI, built from dp-accounting's `DpEvent` algebra, and their JSON form.

The JSON form is our own allow-list of event types: dp-accounting's `from_named_tuple` imports
whatever module a record names, which a ledger file read back for an audit must never do.
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting

from securegmi.errors import PrivacyError


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` DP-SGD steps: each a Poisson-subsampled Gaussian mechanism (Abadi et al. 2016)."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps,
    )


def gaussian_event(noise_multiplier: float) -> dp_accounting.DpEvent:
    """One Gaussian release with sigma = noise_multiplier * L2 sensitivity."""
    return dp_accounting.GaussianDpEvent(noise_multiplier)


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return {"type": "gaussian", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return {
            "type": "poisson_sampled",
            "sampling_probability": float(event.sampling_probability),
            "event": event_to_json(event.event),
        }
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return {"type": "self_composed", "count": int(event.count), "event": event_to_json(event.event)}
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return {"type": "composed", "events": [event_to_json(e) for e in event.events]}
    raise PrivacyError(f"event type {type(event).__name__} has no ledger form")


def event_from_json(data: dict[str, Any]) -> dp_accounting.DpEvent:
    if not isinstance(data, dict):
        raise PrivacyError(f"malformed ledger event {data!r}: not an object")
    kind = data.get("type")
    try:
        if kind == "gaussian":
            return dp_accounting.GaussianDpEvent(_finite(data["noise_multiplier"], "noise_multiplier"))
        if kind == "poisson_sampled":
            return dp_accounting.PoissonSampledDpEvent(
                _finite(data["sampling_probability"], "sampling_probability"), event_from_json(data["event"])
            )
        if kind == "self_composed":
            return dp_accounting.SelfComposedDpEvent(event_from_json(data["event"]), int(data["count"]))
        if kind == "composed":
            return dp_accounting.ComposedDpEvent([event_from_json(e) for e in data["events"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivacyError(f"malformed ledger event {data!r}: {exc}") from exc
    raise PrivacyError(f"unknown ledger event type {kind!r}")


def _finite(value: Any, name: str) -> float:
    """A ledger's number: JSON as Python reads it admits NaN and Infinity, which no release has."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} {value!r} is not a finite non-negative number")
    return number
