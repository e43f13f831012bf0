"""Probabilistic-mixture (PM) clients with ground truth.

K inherent distributions are built from a base dataset, each client draws proportions
pi* ~ Dirichlet(alpha) and its samples source by source. The per-sample source is ground truth
for evaluation only: it is kept beside a client's data and never passed to a client object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from securegmi.data.datasets import Dataset
from securegmi.errors import DataError

SourceKind = Literal["class-groups", "transforms"]


@dataclass(frozen=True)
class ClientData:
    x_train: np.ndarray
    x_test: np.ndarray
    source_train: np.ndarray  # ground truth, evaluation only
    source_test: np.ndarray  # ground truth, evaluation only
    pi_target: np.ndarray  # the Dirichlet draw the client was generated from

    @property
    def pi_true(self) -> np.ndarray:
        """The client's true source frequencies over all its samples (the pi metrics compare to)."""
        sources = np.concatenate([self.source_train, self.source_test])
        return np.bincount(sources, minlength=self.pi_target.size) / max(sources.size, 1)


@dataclass(frozen=True)
class FederatedData:
    dataset: str
    source_kind: SourceKind
    source_names: tuple[str, ...]
    clients: tuple[ClientData, ...]
    likelihood: str
    data_dim: int

    @property
    def n_sources(self) -> int:
        return len(self.source_names)


def class_groups(n_classes: int, n_sources: int) -> list[np.ndarray]:
    """Contiguous groups of classes, e.g. digits with 3 sources -> {0-3}, {4-6}, {7-9}."""
    return [g for g in np.array_split(np.arange(n_classes), n_sources)]


def _source_pools(
    data: Dataset, kind: SourceKind, n_sources: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[str]]:
    if kind == "class-groups":
        if n_sources > data.n_classes:
            raise DataError(
                f"{n_sources} class-group sources need at least as many classes; "
                f"{data.name} has {data.n_classes}"
            )
        groups = class_groups(data.n_classes, n_sources)
        pools = [data.x[np.isin(data.labels, g)] for g in groups]
        names = [f"classes {g[0]}-{g[-1]}" if g.size > 1 else f"class {g[0]}" for g in groups]
        return [rng.permutation(p) for p in pools], names
    # Transforms: a sanity check only (every method, k-means included, separates these).
    if data.image_side is None:
        raise DataError(f"transform sources need image data; {data.name} is not an image set")
    if n_sources > 3:
        raise DataError("transform sources are identity, rotation and inversion: at most 3")
    side = data.image_side
    order = rng.permutation(len(data.x))
    parts = np.array_split(order, n_sources)

    def rotate(a: np.ndarray) -> np.ndarray:
        return np.rot90(a.reshape(-1, side, side), axes=(1, 2)).reshape(len(a), -1)

    transforms: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
        ("identity", lambda a: a),
        ("rotation", rotate),
        ("inversion", lambda a: 1.0 - a),
    ]
    pools = [np.ascontiguousarray(transforms[k][1](data.x[idx])) for k, idx in enumerate(parts)]
    return pools, [transforms[k][0] for k in range(n_sources)]


def make_federated_data(
    data: Dataset,
    *,
    clients: int,
    sources: int,
    alpha: float,
    seed: int,
    source_kind: SourceKind = "class-groups",
    test_fraction: float = 0.2,
    samples_per_client: int | None = None,
) -> FederatedData:
    """Split `data` into PM clients; all randomness comes from `seed`.

    Every client gets the same number of samples n; its per-source counts are multinomial(n,
    pi*), drawn without replacement from each source's pool. n is the largest size (at most
    `samples_per_client`) for which the pools can serve every client.
    """
    if clients < 1 or sources < 1 or alpha <= 0 or not 0 < test_fraction < 1:
        raise DataError("need clients >= 1, sources >= 1, alpha > 0 and 0 < test_fraction < 1")
    rng = np.random.default_rng(seed)
    pools, names = _source_pools(data, source_kind, sources, rng)
    pi = rng.dirichlet(np.full(sources, alpha), size=clients)
    pool_sizes = np.array([len(p) for p in pools])
    n = int(np.floor(np.min(pool_sizes / np.maximum(pi.sum(0), 1e-12))))
    if samples_per_client is not None:
        n = min(n, samples_per_client)
    while True:
        counts = np.stack([rng.multinomial(n, p) for p in pi])
        if np.all(counts.sum(0) <= pool_sizes):
            break
        n = int(n * 0.95)
    if n < 10:
        raise DataError(
            f"{data.name} is too small for {clients} clients ({n} samples each); use fewer clients"
        )

    offsets = np.zeros(sources, dtype=np.int64)
    out = []
    for c in range(clients):
        xs, ss = [], []
        for k in range(sources):
            xs.append(pools[k][offsets[k] : offsets[k] + counts[c, k]])
            ss.append(np.full(counts[c, k], k, dtype=np.int64))
            offsets[k] += counts[c, k]
        x, s = np.concatenate(xs), np.concatenate(ss)
        order = rng.permutation(n)
        x, s = x[order], s[order]
        n_test = max(1, round(n * test_fraction))
        out.append(ClientData(x[n_test:], x[:n_test], s[n_test:], s[:n_test], pi[c]))
    return FederatedData(data.name, source_kind, tuple(names), tuple(out), data.likelihood, data.x.shape[1])
