"""What `results.json` (and `simulate --json`) must hold, field by field as docs/guides/cli.md
documents it, with the ranges and the identities between fields that make the figures trustworthy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig

DOCUMENTED = {
    "method",
    "protocol",
    "dataset",
    "clients",
    "components",
    "rounds",
    "source_accuracy",
    "pi_tv_error",
    "nll",
    "uplink_bytes_per_client_round",
    "wall_seconds",
    "epsilon",
    "per_client",
    "evaluation_only",
}
# The fields that are the harness's ground truth (true sources and pi), never a client's release.
EVALUATION_ONLY = {"source_accuracy", "pi_tv_error", "nll", "per_client"}


def _simplex(p: list[float]) -> bool:
    a = np.asarray(p)
    return bool(np.all(a >= 0) and abs(a.sum() - 1) < 1e-3)


def check_results(results: dict[str, Any], config: SimulationConfig) -> None:
    """Raise AssertionError naming the first field that is missing, out of range or
    inconsistent with the others."""
    assert set(results) >= DOCUMENTED, f"missing {sorted(DOCUMENTED - set(results))}"
    marker = results["evaluation_only"]
    assert set(marker["fields"]) == EVALUATION_ONLY and "no client released" in marker["note"], marker
    assert results["method"] == config.method and results["dataset"] == config.dataset
    assert results["clients"] == config.clients and results["rounds"] >= 1
    assert config.epsilon is not None or results["rounds"] == config.rounds  # private: the plan's
    assert results["components"] == (1 if config.method == "fedavg" else config.components)
    assert 0.0 <= results["source_accuracy"] <= 1.0 and 0.0 <= results["pi_tv_error"] <= 1.0
    # fedgmm's components are Gaussians: no VAE bound to report.
    assert (results["nll"] is None) == (config.method == "fedgmm") and results["wall_seconds"] > 0
    assert results["nll"] is None or math.isfinite(results["nll"])
    federated = config.method not in ("local", "central-em", "oracle")
    assert (results["protocol"] is not None) == (federated and config.method != "fedgmm")
    assert (results["uplink_bytes_per_client_round"] > 0) == federated
    rows = results["per_client"]
    assert [r["client"] for r in rows] == list(range(config.clients))
    for r in rows:
        assert _simplex(r["pi_true"]) and _simplex(r["pi_estimate"]), r
        assert len(r["pi_estimate"]) == len(r["pi_true"])
        assert 0.0 <= r["source_accuracy"] <= 1.0 and r["test_samples"] > 0
        if config.method != "fedavg":  # TV between the rounded proportions as written
            tv = 0.5 * np.abs(np.subtract(r["pi_true"], r["pi_estimate"])).sum()
            assert abs(tv - r["pi_tv_error"]) < 5e-4 * len(r["pi_true"]), r
    # The headline figures are the per-client ones pooled: accuracy over every test record,
    # TV error averaged over clients.
    samples = sum(r["test_samples"] for r in rows)
    pooled = sum(r["source_accuracy"] * r["test_samples"] for r in rows) / samples
    assert abs(results["source_accuracy"] - pooled) < 1e-9
    assert abs(results["pi_tv_error"] - np.mean([r["pi_tv_error"] for r in rows])) < 1e-9
    epsilon = results["epsilon"]
    if config.epsilon is None:
        assert epsilon is None
    else:
        assert epsilon["target"] == config.epsilon and epsilon["delta"] == config.delta
        assert 0.9 * config.epsilon <= epsilon["max_spent"] <= config.epsilon * (1 + 1e-6)
        assert epsilon["max_spent_fallback"] >= epsilon["max_spent"] * (1 - 1e-9)
        assert epsilon["accountant"] == "pld" and epsilon["max_spent_rdp"] >= epsilon["max_spent"]
        assert epsilon["secure_rng"] is (config.dp_noise == "private") and epsilon["noise"] == config.dp_noise
