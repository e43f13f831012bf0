from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from securegmi.data.datasets import load_dataset, synthetic_blobs
from securegmi.data.mixture import class_groups, make_federated_data
from securegmi.errors import DataError


def test_digits_class_groups_are_the_documented_ones():
    assert [g.tolist() for g in class_groups(10, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    fd = make_federated_data(load_dataset("digits"), clients=20, sources=3, alpha=0.5, seed=0)
    assert fd.source_names == ("classes 0-3", "classes 4-6", "classes 7-9")
    x = fd.clients[0].x_train
    assert x.dtype == np.float32 and x.shape[1] == 64 and x.min() >= 0 and x.max() <= 1


def test_generator_honours_pi_within_sampling_error():
    data = synthetic_blobs(n_classes=3, per_class=4000, dim=4)
    fd = make_federated_data(data, clients=8, sources=3, alpha=1.0, seed=3, samples_per_client=1000)
    for client in fd.clients:
        n = client.source_train.size + client.source_test.size
        # Multinomial frequencies: sd <= 0.5 / sqrt(n); allow 4 sd per coordinate.
        assert np.abs(client.pi_true - client.pi_target).max() < 4 * 0.5 / np.sqrt(n)


def test_generator_would_catch_ignored_proportions():
    # Negative control: uniform frequencies are far from a concentrated Dirichlet draw.
    data = synthetic_blobs(n_classes=3, per_class=4000, dim=4)
    fd = make_federated_data(data, clients=8, sources=3, alpha=0.2, seed=3, samples_per_client=1000)
    uniform = np.full(3, 1 / 3)
    assert max(np.abs(uniform - c.pi_target).max() for c in fd.clients) > 4 * 0.5 / np.sqrt(1000)


def test_generator_is_seeded_and_disjoint():
    data = load_dataset("digits")
    a = make_federated_data(data, clients=5, sources=3, alpha=0.5, seed=1)
    b = make_federated_data(data, clients=5, sources=3, alpha=0.5, seed=1)
    c = make_federated_data(data, clients=5, sources=3, alpha=0.5, seed=2)
    assert np.array_equal(a.clients[2].x_train, b.clients[2].x_train)
    assert not np.array_equal(a.clients[2].x_train, c.clients[2].x_train)
    rows = np.concatenate([np.concatenate([cl.x_train, cl.x_test]) for cl in a.clients])
    # No sample is used twice, across clients or across a client's train/test split (digits has a
    # few identical images, so compare against how often each row occurs in the dataset).
    used = Counter(r.tobytes() for r in rows)
    available = Counter(r.tobytes() for r in data.x)
    assert all(used[k] <= available[k] for k in used)


def test_sources_follow_class_groups():
    data = synthetic_blobs(n_classes=6, per_class=200, dim=5)
    fd = make_federated_data(data, clients=4, sources=3, alpha=1.0, seed=0)
    means = data.x.reshape(6, 200, 5).mean(1)
    for client in fd.clients:
        for x, s in zip(client.x_train, client.source_train, strict=True):
            nearest_class = int(np.argmin(((means - x) ** 2).sum(1)))
            assert nearest_class // 2 == s


def test_transform_sources_apply_transforms():
    fd = make_federated_data(
        load_dataset("digits"), clients=5, sources=3, alpha=1.0, seed=0, source_kind="transforms"
    )
    assert fd.source_names == ("identity", "rotation", "inversion")
    inverted = np.concatenate([c.x_train[c.source_train == 2] for c in fd.clients])
    assert inverted.mean() > 0.5  # digits are mostly dark background: inversion makes them light


def test_ground_truth_is_kept_beside_not_inside_the_client_features():
    fd = make_federated_data(load_dataset("digits"), clients=3, sources=3, alpha=0.5, seed=0)
    fields = {f.name for f in dataclasses.fields(fd.clients[0])}
    assert {"source_train", "source_test"} <= fields
    assert fd.clients[0].x_train.shape[1] == 64  # labels are not appended as a feature


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": 0}, "clients"),
        ({"alpha": 0.0}, "alpha"),
        ({"clients": 400}, "too small"),
        ({"sources": 11}, "classes"),
    ],
)
def test_bad_requests_are_clear_errors(kwargs, match):
    args = {"clients": 5, "sources": 3, "alpha": 0.5, "seed": 0} | kwargs
    with pytest.raises(DataError, match=match):
        make_federated_data(load_dataset("digits"), **args)


def test_unknown_dataset_and_missing_extra_are_clear_errors(monkeypatch):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="securegmi\\[mnist\\]"):
        load_dataset("mnist5k")
