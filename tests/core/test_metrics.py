from __future__ import annotations

import numpy as np
import pytest

from securegmi.core.metrics import map_proportions, match_components, source_accuracy, total_variation


def test_hungarian_undoes_a_permutation():
    truth = np.array([0, 0, 1, 1, 2, 2])
    assigned = np.array([2, 2, 0, 0, 1, 1])
    mapping = match_components(truth, assigned, 3, 3)
    assert mapping.tolist() == [1, 2, 0]
    assert source_accuracy(truth, assigned, mapping) == 1.0


def test_hungarian_on_a_hand_made_confusion():
    # Component 0 holds 3 of source 1 and 1 of source 0; component 1 holds 2 of source 0.
    truth = np.array([1, 1, 1, 0, 0, 0])
    assigned = np.array([0, 0, 0, 0, 1, 1])
    mapping = match_components(truth, assigned, 2, 2)
    assert mapping.tolist() == [1, 0]
    assert source_accuracy(truth, assigned, mapping) == pytest.approx(5 / 6)


def test_greedy_matching_would_be_worse_than_hungarian():
    # Greedy on the largest cell picks (0 -> 0) = 5 then (1 -> 1) = 0: 5 correct.
    # The optimum is (0 -> 1) = 4 plus (1 -> 0) = 4: 8 correct.
    truth = np.array([0] * 5 + [1] * 4 + [0] * 4)
    assigned = np.array([0] * 5 + [0] * 4 + [1] * 4)
    mapping = match_components(truth, assigned, 2, 2)
    assert source_accuracy(truth, assigned, mapping) == pytest.approx(8 / 13)


def test_unmatched_component_mass_counts_as_error():
    mapping = np.array([1, 0, -1])  # three components, two sources
    pi_hat = np.array([0.5, 0.3, 0.2])
    mapped = map_proportions(pi_hat, mapping, 2)
    assert mapped == pytest.approx([0.3, 0.5])
    assert total_variation(mapped, np.array([0.4, 0.6])) == pytest.approx(0.5 * (0.1 + 0.1))


def test_fewer_components_than_sources():
    truth = np.array([0, 1, 2, 2])
    assigned = np.zeros(4, dtype=np.int64)
    mapping = match_components(truth, assigned, 3, 1)
    assert mapping.tolist() == [2]
    assert source_accuracy(truth, assigned, mapping) == 0.5
