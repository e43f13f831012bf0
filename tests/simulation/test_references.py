"""The references that exchange no messages are what their names say."""

from __future__ import annotations

import numpy as np
import pytest

from securegmi.config import SimulationConfig
from securegmi.errors import ConfigError
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import load_federated_data

SMALL = {"dataset": "synthetic", "clients": 6, "rounds": 3, "local_epochs": 2, "hidden": 32, "latent": 2}


def test_the_oracle_trains_each_component_on_its_source_and_knows_every_clients_shares():
    config = SimulationConfig(**SMALL, method="oracle")
    result = run_simulation(config)
    for client, row in zip(load_federated_data(config).clients, result.evaluation.per_client, strict=True):
        shares = np.maximum(
            np.bincount(client.source_train, minlength=3) / len(client.source_train), config.pi_floor
        )
        np.testing.assert_allclose(
            row["pi_estimate"], shares / shares.sum(), atol=1e-3
        )  # rows round to 3 places
    # Control: centralised EM on the same records and rounds must find the components itself.
    central = run_simulation(SimulationConfig(**SMALL, method="central-em"))
    # Measured controls: assigning every record to every component scores 0.44, and component
    # k trained on source k+1 keeps the accuracy (matching relabels) but puts pi TV at 0.69.
    assert result.evaluation.source_accuracy > 0.95 and result.evaluation.pi_tv_error < 0.05
    assert result.evaluation.source_accuracy >= central.evaluation.source_accuracy


def test_the_oracle_needs_one_component_per_source():
    with pytest.raises(ConfigError, match="must equal n_sources"):
        SimulationConfig(**SMALL, method="oracle", components=4)
