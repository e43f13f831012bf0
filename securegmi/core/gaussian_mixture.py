"""Gaussian components with shared parameters and per-client weights, fitted by federated EM
from summed sufficient statistics: the density side of FedGMM (Wu et al., "Personalized
federated learning under mixture of distributions", ICML 2023), a peer of FedGMI.

Hand-written rather than scikit-learn's GaussianMixture: that estimator fits one data set with
one set of weights; here each client keeps its own weights and only sums leave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Moments:
    """Sums over records, weighted by responsibilities: counts (K,), sums (K, D), outer
    products (K, D, D). Clients' moments add up to the pooled data's."""

    counts: np.ndarray
    sums: np.ndarray
    outer: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, resp: np.ndarray) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        # One matrix product per component: a three-operand einsum runs as a plain loop.
        outer = np.stack([(x * resp[:, k, None]).T @ x for k in range(resp.shape[1])])
        return cls(resp.sum(0), resp.T @ x, outer)

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes + self.sums.nbytes + self.outer.nbytes)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.counts + other.counts, self.sums + other.sums, self.outer + other.outer)


@dataclass(frozen=True)
class GaussianComponents:
    """K full-covariance Gaussians; `ridge` is added to every covariance's diagonal (constant
    pixels would otherwise make it singular)."""

    means: np.ndarray  # (K, D)
    covariances: np.ndarray  # (K, D, D)

    @classmethod
    def from_moments(cls, moments: Moments, ridge: float) -> GaussianComponents:
        """The M-step: each component's weighted mean and covariance."""
        counts = np.maximum(moments.counts, 1e-9)
        means = moments.sums / counts[:, None]
        second = moments.outer / counts[:, None, None]
        covariances = second - np.einsum("ki,kj->kij", means, means)
        d = means.shape[1]
        return cls(means, covariances + ridge * np.eye(d)[None])

    @classmethod
    def spread(cls, pooled: Moments, k: int, ridge: float, seed: int) -> GaussianComponents:
        """A public start from the pooled mean and covariance only: K means drawn from that
        Gaussian with a public seed, each with the pooled covariance."""
        whole = cls.from_moments(pooled, ridge)
        rng = np.random.default_rng(seed)
        means = rng.multivariate_normal(whole.means[0], whole.covariances[0], size=k)
        return cls(means, np.repeat(whole.covariances, k, axis=0))

    @cached_property
    def _densities(self) -> list[Any]:
        # Frozen once: each one factorises its D x D covariance, the costly part at D = 784.
        return [
            stats.multivariate_normal(m, c, allow_singular=True)
            for m, c in zip(self.means, self.covariances, strict=True)
        ]

    def log_likelihood(self, x: np.ndarray) -> np.ndarray:
        """(n, K) log densities of each record under each component."""
        return np.stack([np.atleast_1d(d.logpdf(x)) for d in self._densities], axis=1)
