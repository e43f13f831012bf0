"""The run configurations tests share: a small synthetic study, plain or private.

Plain functions rather than fixtures, since most tests build their configuration at module
level (a module constant, a parametrize table). A test states only what it changes, so the
values its assertions depend on stand beside them.
"""

from __future__ import annotations

from typing import Any

from securegmi import SimulationConfig

# A few seconds a run: 3 clients of the synthetic mixture, one local epoch, a tiny VAE.
SMALL: dict[str, Any] = {"dataset": "synthetic", "clients": 3, "local_epochs": 1, "hidden": 16, "latent": 2}


def small_config(**overrides: Any) -> SimulationConfig:
    """The small synthetic study, plain unless `overrides` say otherwise."""
    return SimulationConfig(**{**SMALL, **overrides})


# Where the study distils a source classifier (split DP-SGD), 3 of its steps instead of 40.
IDENTIFIER_STEPS = 3


def private_config(protocol: str = "dp", epsilon: float = 4.0, **overrides: Any) -> SimulationConfig:
    """The small study under a privacy budget (the statistics design unless overridden)."""
    config = small_config(protocol=protocol, epsilon=epsilon, **overrides)
    if config.planned_identifier_steps and "identifier_steps" not in overrides:
        steps = {"identifier_steps": IDENTIFIER_STEPS}
        config = small_config(protocol=protocol, epsilon=epsilon, **steps, **overrides)
    return config
