"""Evaluation metrics. Components are identified only up to permutation, so every score first
matches components to true sources with the Hungarian algorithm (scipy)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_components(
    true_sources: np.ndarray, assigned: np.ndarray, n_sources: int, n_components: int
) -> np.ndarray:
    """The component -> source map that maximises agreement; -1 for an unmatched component."""
    confusion = np.zeros((n_components, n_sources), dtype=np.int64)
    np.add.at(confusion, (assigned, true_sources), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(n_components, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def source_accuracy(true_sources: np.ndarray, assigned: np.ndarray, mapping: np.ndarray) -> float:
    """Share of samples whose component maps to their true source."""
    if true_sources.size == 0:
        return float("nan")
    return float(np.mean(mapping[assigned] == true_sources))


def map_proportions(pi_hat: np.ndarray, mapping: np.ndarray, n_sources: int) -> np.ndarray:
    """Component proportions re-indexed by source; an unmatched component's mass goes nowhere
    and so counts fully as error."""
    out = np.zeros((*pi_hat.shape[:-1], n_sources))
    for k, s in enumerate(mapping):
        if s >= 0:
            out[..., s] += pi_hat[..., k]
    return out


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """0.5 * ||p - q||_1 along the last axis."""
    tv: np.ndarray = 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)
    return tv
