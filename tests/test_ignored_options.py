"""A setting the run would not use is refused on construction, naming what does apply, instead of
being written to config.json and ignored (issue 24: under --epsilon, --rounds 12 was recorded
and the run had its own 11 rounds)."""

from __future__ import annotations

from typing import Any

import pytest

from securegmi.config import SimulationConfig
from securegmi.errors import ConfigError

SECURE = {"epsilon": 8.0, "protocol": "secure"}  # what `securegmi simulate --epsilon 8` builds
EM = {"epsilon": 8.0, "protocol": "dp", "private_training": "em"}
CENTRAL = {"method": "central-dp", "epsilon": 8.0}

# (settings, the option refused, what the message points to instead)
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({**SECURE, "rounds": 12}, "--rounds", "--vae-rounds"),
    ({**SECURE, "temperature": 5.0}, "--temperature", "released statistics"),
    ({"vae_rounds": 3}, "--vae-rounds", "--rounds"),
    ({**EM, "vae_rounds": 3}, "--vae-rounds", "--rounds"),
    ({"delta": 1e-6}, "--delta", "--epsilon"),
    ({"min_clients": 3}, "--min-clients", "--epsilon"),
    ({"private_training": "em"}, "--private-training", "--epsilon"),
    ({"noise_placement": "local"}, "--noise-placement", "--epsilon"),
    ({"sgd_placement": "split"}, "--sgd-placement", "--epsilon"),
    ({**EM, "min_clients": 3}, "--min-clients", "statistics design"),
    ({"method": "fedavg", "components": 5}, "--components", "one shared VAE"),
    ({"method": "fedgmm", "local_epochs": 2}, "--local-epochs", "no local training"),
    ({"method": "oracle", "temperature": 5.0}, "--temperature", "no E-step"),
    ({"method": "fedgmm", "temperature": 5.0}, "--temperature", "temperature 1"),
    ({"method": "ifca", "temperature": 5.0}, "--temperature", "one cluster"),
    ({"method": "fedavg", "temperature": 5.0}, "--temperature", "one component"),
    ({**CENTRAL, "rounds": 12}, "--rounds", "--vae-rounds"),
    ({**CENTRAL, "protocol": "secure"}, "--protocol", "one trusted curator"),
    ({**CENTRAL, "min_clients": 3}, "--min-clients", "one trusted curator"),
    ({**CENTRAL, "noise_placement": "local"}, "--noise-placement", "one trusted curator"),
    ({**CENTRAL, "protocol": "secure", "sgd_placement": "split"}, "--protocol", "one trusted curator"),
    ({**CENTRAL, "sgd_placement": "split"}, "--sgd-placement", "pooled records"),
    # Was an AssertionError deep in the run (exit 70): central-dp is the statistics design's reference.
    ({**CENTRAL, "private_training": "em"}, "private_training must be 'statistics'", "central-dp"),
]


@pytest.mark.parametrize(("settings", "option", "instead"), REFUSED)
def test_a_setting_the_run_would_ignore_is_refused(settings, option, instead):
    with pytest.raises(ConfigError) as caught:
        SimulationConfig(**settings)
    message = str(caught.value)
    assert message.startswith(option) and instead in message, message
    assert "\n" not in message


# Negative controls: the same settings where they apply are accepted and change the run.
APPLIED: list[tuple[dict[str, Any], str, Any]] = [
    # Under secure, DP-SGD is split by default: each VAE round is its 5 full-batch steps.
    ({**SECURE, "vae_rounds": 3}, "planned_rounds", 4 + 2 + 40 + 3 * 5),  # + the classifier's steps
    ({**SECURE}, "planned_rounds", 4 + 2 + 40 + 1 * 5),
    ({**SECURE, "identifier_steps": 0}, "planned_rounds", 4 + 2 + 1 * 5),
    ({**EM, "rounds": 12}, "planned_rounds", 12),
    ({"rounds": 12}, "planned_rounds", 12),
    ({"method": "fedgmm", "rounds": 12}, "planned_rounds", 12),
    ({"temperature": 5.0}, "initial_temperature", 5.0),
    ({**EM, "temperature": 5.0}, "initial_temperature", 5.0),
    ({"method": "central-em", "temperature": 5.0}, "initial_temperature", 5.0),
    ({"components": 5}, "model_components", 5),
    ({"method": "fedavg"}, "model_components", 1),
    ({"local_epochs": 2, "method": "oracle"}, "local_epochs", 2),
    ({**SECURE, "min_clients": 3}, "cohort_minimum", 3),
    ({**SECURE, "protocol": "dp", "min_clients": 3}, "cohort_minimum", 3),
    ({**SECURE, "delta": 1e-6}, "delta", 1e-6),
    ({**SECURE, "noise_placement": "local"}, "placement", "local"),
    ({**SECURE, "sgd_placement": "split"}, "split_sgd", True),
    ({**CENTRAL}, "statistics_design", True),
    ({**CENTRAL, "vae_rounds": 2}, "planned_rounds", 4 + 2 + 40 + 2),
]


@pytest.mark.parametrize(("settings", "prop", "value"), APPLIED)
def test_the_same_setting_where_it_applies_is_kept_and_used(settings, prop, value):
    config = SimulationConfig(**settings)
    assert getattr(config, prop) == value
    # A run directory's config.json loads again, e.g. for `securegmi resume`.
    assert SimulationConfig.from_dict(config.to_dict()) == config


def test_every_default_is_accepted_as_config_json_holds_it():
    """Every field is written to config.json, the ones that did not apply at their defaults:
    a run directory written before the refusals existed loads unchanged."""
    for settings in ({}, SECURE, EM, CENTRAL, {"method": "fedavg"}, {"method": "fedgmm"}):
        config = SimulationConfig(**settings)
        assert SimulationConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("settings", [{}, EM, {"method": "fedgmm"}])
def test_a_config_json_written_with_the_earlier_defaults_loads(settings):
    """Before full-batch split DP-SGD became the default (issue 26) every config.json held
    vae_rounds 5 and sgd_placement "local", applicable or not: where they did not apply, they
    read back as what the run used, so an earlier run can still be audited and scored."""
    earlier = {**SimulationConfig(**settings).to_dict(), "vae_rounds": 5, "sgd_placement": "local"}
    config = SimulationConfig.from_dict(earlier)
    assert config.vae_rounds == 1 and not config.split_sgd
    # Negative control: the same value set today, where it does not apply, is still refused.
    with pytest.raises(ConfigError, match="--vae-rounds"):
        SimulationConfig(**settings, vae_rounds=5)


@pytest.mark.parametrize("settings", [SECURE, CENTRAL])
def test_earlier_defaults_where_they_apply_are_the_run_s_own_settings(settings):
    """Under the statistics design vae_rounds 5 (and sgd_placement "local") were what ran."""
    earlier = {**SimulationConfig(**settings).to_dict(), "vae_rounds": 5, "sgd_placement": "local"}
    config = SimulationConfig.from_dict(earlier)
    assert config.vae_rounds == 5 and not config.split_sgd
