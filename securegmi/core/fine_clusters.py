"""Fine clusters grouped by co-occurrence: the statistics that identify the K components.

Class-group sources are not separable by density alone (docs/design.md §1): what identifies them is
which records occur together inside a client. So the records are cut into J >> K fine clusters
(k-means in a low-dimensional projection), each client's counts over the fine clusters form a
client x cluster matrix, and a rank-K factorisation of that matrix groups fine clusters into
components by which clients hold them together. Every step needs only *sums over records* of
bounded per-record contributions, which is what makes it cheap to release under DP
(docs/design.md §2; Park et al., "DP-EM", AISTATS 2017; Scott et al., federated DP k-means, ICML 2025).

This module is pure maths: the contributions a client computes, and what anyone computes from
their (noisy) totals. Who adds noise, and how much, is `securegmi.privacy`'s business.

Every per-record contribution here has L2 norm at most sqrt(2) (moments: sqrt(3)), see
`MOMENTS_SENSITIVITY` and `CLUSTER_SENSITIVITY`; the histogram has sensitivity 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securegmi.core.source_classifier import SourceClassifier
from securegmi.errors import ConfigError

# Per-record L2 norm of a moments contribution (a, b u, c triu(u u^T)) with ||u|| = 1:
# a^2 + b^2 ||u||^2 + c^2 ||triu(u u^T)||_F^2 <= a^2 + b^2 + c^2, since
# sum_{i<=j} u_i^2 u_j^2 <= (sum_i u_i^2)^2 = 1. Every plan's weights are held to
# a^2 + b^2 + c^2 <= 3 (`check_moments_weights`), so sqrt(3) bounds them all.
MOMENTS_SENSITIVITY = math.sqrt(3.0)
# The weights (a, b, c) of the count, the sum and the second moments. The projection is the top
# eigenvectors of the covariance, so the second moments should carry most of the sensitivity: the
# count and the mean are a few numbers over ~1,000 records, precise even at a small weight.
# Digits-PM at epsilon 8, tuning seeds 10-17, 2 noise draws: 0.837 -> 0.859 source accuracy
# against (1, 1, 1) (bench/results/tuning.md#weighted-moments).
def _within_sensitivity(a: float, b: float) -> tuple[float, float, float]:
    """(a, b, c) with c the largest float whose squares with a and b sum to at most 3 exactly."""
    c = math.sqrt(3.0 - a * a - b * b)
    while math.fsum((a * a, b * b, c * c)) > 3.0:
        c = math.nextafter(c, 0.0)
    return a, b, c


MOMENTS_WEIGHTS = _within_sensitivity(0.3, 0.6)
# The weights of plans written before the moments were weighted.
UNWEIGHTED_MOMENTS = (1.0, 1.0, 1.0)
# The temperature of a record's soft assignment to the fine clusters when it is scored: its
# weights over clusters are softmax(-||z - c_j||^2 / SOFT_ASSIGNMENT), z in the unit ball.
# Post-processing of released values; a hard nearest cluster throws away how close a record lies
# to its neighbours (same tuning runs: 0.859 -> 0.870; bench/results/tuning.md#soft-assignment).
SOFT_ASSIGNMENT = 0.02
CLASSIFIER_PREFIX = "stats.classifier."  # the distilled classifier's arrays in a model file
# Per-record L2 norm of a cluster contribution: z (||z|| <= 1) added to one cluster's sum and 1
# to one cluster's count.
CLUSTER_SENSITIVITY = math.sqrt(2.0)
# A client's histogram over fine clusters: one record moves one count by one.
HISTOGRAM_SENSITIVITY = 1.0

_EPS = 1e-12


def on_sphere(x: np.ndarray, centre: float, sketch: np.ndarray | None = None) -> np.ndarray:
    """Each record as a unit vector around a public centre: a per-record map that bounds every
    contribution's norm without a clipping bound to tune, and keeps the directions the
    projection needs (bench/results/tuning.md#unit-sphere).
    `sketch` first maps the centred record to fewer dimensions."""
    u = np.asarray(x, dtype=np.float64) - centre
    if sketch is not None:
        u = u @ sketch
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    # A row with a non-finite norm maps to zero too: a NaN in a release would tell it exists.
    keep = np.isfinite(norms) & (norms > _EPS)
    out: np.ndarray = np.where(keep, np.nan_to_num(u) / np.where(keep, norms, 1.0), 0.0)
    return out


def public_sketch(dim: int, size: int, seed: int) -> np.ndarray | None:
    """A data-independent Gaussian random projection (Johnson-Lindenstrauss) to `size`
    dimensions, None when the data has no more. The moments release has D(D+1)/2 entries, each
    with its own noise: at D = 784 the noise drowns the principal directions, which a public
    sketch to 64 dimensions first keeps (bench/results/tuning.md#public-sketch)."""
    if dim <= size:
        return None
    out: np.ndarray = np.random.default_rng([seed, 0x5CE7C4]).normal(size=(dim, size)) / math.sqrt(size)
    return out


def moments_size(dim: int) -> int:
    return 1 + dim + dim * (dim + 1) // 2


# The least weight: below it, dividing the weight out of the noisy sum multiplies its noise
# past any use (and zero would release a part nobody can read back).
MIN_MOMENTS_WEIGHT = 1e-3


def check_moments_weights(weights: tuple[float, ...]) -> None:
    """`ConfigError` unless `weights` are three finite numbers of at least `MIN_MOMENTS_WEIGHT`
    whose squares sum to at most 3 exactly: the sensitivity every moments release is calibrated
    to (`MOMENTS_SENSITIVITY`)."""
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    ok = len(weights) == 3 and numbers and all(math.isfinite(w) and w >= MIN_MOMENTS_WEIGHT for w in weights)
    if not ok or math.fsum(w * w for w in weights) > 3.0:
        raise ConfigError(
            f"moments weights {weights!r} are not three numbers of at least {MIN_MOMENTS_WEIGHT:g} whose "
            "squares sum to at most 3: a larger weight would release the moments with less noise than "
            "the plan accounts for"
        )


def _moments_scale(dim: int, weights: tuple[float, ...]) -> np.ndarray:
    a, b, c = weights
    return np.concatenate([[a], np.full(dim, b), np.full(dim * (dim + 1) // 2, c)])


def moments_contribution(u: np.ndarray, weights: tuple[float, ...] = MOMENTS_WEIGHTS) -> np.ndarray:
    """sum over records of (a, b u, c triu(u u^T)), flat, for weights (a, b, c)."""
    d = u.shape[1]
    rows, cols = np.triu_indices(d)
    second = (u.T @ u)[rows, cols]
    out: np.ndarray = np.concatenate([[float(len(u))], u.sum(0), second]) * _moments_scale(d, weights)
    return out


@dataclass(frozen=True)
class Projection:
    """z = clip((u - mean) V / scale, 1): the top principal directions of the released moments,
    scaled so that the projected records fill the unit ball."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, d)
    scale: float

    @classmethod
    def from_moments(
        cls, total: np.ndarray, dim: int, components: int, weights: tuple[float, ...] = MOMENTS_WEIGHTS
    ) -> Projection:
        """From the (noisy) sum of `moments_contribution`s made with `weights`."""
        check_moments_weights(weights)
        total = np.asarray(total, dtype=np.float64) / _moments_scale(dim, weights)
        n = max(float(total[0]), 1.0)
        mean = total[1 : 1 + dim] / n
        second = np.zeros((dim, dim))
        rows, cols = np.triu_indices(dim)
        second[rows, cols] = total[1 + dim :]
        second = second + np.triu(second, 1).T
        cov = second / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1][:components]
        variance = float(np.maximum(values[order], 0.0).sum())
        # 1.5 standard deviations of the projected norm: most records unclipped.
        return cls(mean, vectors[:, order], 1.5 * math.sqrt(max(variance, _EPS)))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        z = (u - self.mean) @ self.basis / self.scale
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        clipped: np.ndarray = z * np.minimum(1.0, 1.0 / np.maximum(norms, _EPS))
        return clipped

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])


def initial_centroids(clusters: int, dim: int, seed: int) -> np.ndarray:
    """A public start for k-means: random points inside the unit ball."""
    rng = np.random.default_rng(seed)
    out: np.ndarray = 0.5 * rng.normal(size=(clusters, dim)) / math.sqrt(dim)
    return out


def nearest(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d2 = (z * z).sum(1)[:, None] - 2 * z @ centroids.T + (centroids * centroids).sum(1)[None]
    out: np.ndarray = d2.argmin(1)
    return out


def cluster_contribution(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per fine cluster, the sum of its records' z and their count, flat (J x (d + 1))."""
    j, d = centroids.shape
    assigned = nearest(z, centroids)
    sums = np.zeros((j, d + 1))
    np.add.at(sums, assigned, np.hstack([z, np.ones((len(z), 1))]))
    return sums.ravel()


def update_centroids(total: np.ndarray, centroids: np.ndarray, min_count: float, reseed: int) -> np.ndarray:
    """Lloyd's update from (noisy) totals; a cluster whose count is too small to trust is
    restarted at a public random point."""
    j, d = centroids.shape
    table = total.reshape(j, d + 1)
    counts = table[:, d]
    ok = counts > min_count
    out = initial_centroids(j, d, reseed)
    out[ok] = table[ok, :d] / counts[ok, None]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    result: np.ndarray = out * np.minimum(1.0, 1.0 / np.maximum(norms, _EPS))
    return result


def histogram(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.bincount(nearest(z, centroids), minlength=len(centroids)).astype(np.float64)


@dataclass(frozen=True)
class Grouping:
    """cluster_given_component[k, j] = P(fine cluster j | component k); pi[c] the clients'
    mixture proportions, both from a factorisation of the client x cluster count matrix."""

    cluster_given_component: np.ndarray  # (K, J)
    pi: np.ndarray  # (C, K)
    sizes: np.ndarray  # (C,) each client's (noisy) record count


def group_clusters(counts: np.ndarray, components: int, seed: int, restarts: int = 5) -> Grouping:
    """Rank-K non-negative factorisation of the (C, J) count matrix under the KL divergence:
    the maximum-likelihood fit of counts[c, j] ~ n_c sum_k pi_ck P(j | k) (PLSA; Hofmann 1999),
    so it is the mixture model itself. scikit-learn's NMF, best of `restarts` random starts."""
    # Imported here: scikit-learn takes about a second to import, and a Flower ClientApp that
    # starts a process per message and never groups clusters should not pay it every time.
    from sklearn.decomposition import NMF

    if restarts < 1:
        raise ConfigError(f"grouping the fine clusters needs at least one restart, got {restarts}")
    m = np.maximum(np.asarray(counts, dtype=np.float64), 0.0) + 1e-3
    fits: list[tuple[float, np.ndarray, np.ndarray]] = []
    for r in range(restarts):
        nmf = NMF(
            components,
            beta_loss="kullback-leibler",
            solver="mu",
            init="random",
            random_state=seed + r,
            max_iter=1000,
        )
        w = nmf.fit_transform(m)
        fits.append((float(nmf.reconstruction_err_), w, nmf.components_))
    _, w, h = min(fits, key=lambda fit: fit[0])  # the first of the best, as restarts are seeded
    scale = h.sum(1) + _EPS
    mass = w * scale[None]
    sizes = mass.sum(1)
    return Grouping(h / scale[:, None], mass / np.maximum(sizes, _EPS)[:, None], sizes)


@dataclass(frozen=True)
class FineClusterModel:
    """Source identification from released statistics: log sum_j w_j(x) P(j | k), w(x) a
    record's soft assignment to the fine clusters. Computed locally from released values only."""

    centre: float
    sketch: np.ndarray | None  # public, see public_sketch
    projection: Projection
    centroids: np.ndarray  # (J, d)
    cluster_given_component: np.ndarray  # (K, J)
    # 0: the nearest cluster only (models saved before soft assignment); see SOFT_ASSIGNMENT.
    softness: float = SOFT_ASSIGNMENT
    # The classifier distilled from this model's responsibilities, where the run trained one: its
    # log q(k | u) - log prior is added to the scores (core.source_classifier).
    classifier: SourceClassifier | None = None

    def log_likelihood(self, x: np.ndarray) -> np.ndarray:
        """(n, K): log sum_j w_j(x) P(j | k), w(x) the record's soft assignment to the fine
        clusters (its nearest cluster alone at softness 0), plus the classifier's log ratio."""
        u = on_sphere(x, self.centre, self.sketch)
        out = self._cluster_scores(self.projection(u))
        if self.classifier is not None:
            out = out + self.classifier.log_likelihood_ratio(u)
        return out

    def _cluster_scores(self, z: np.ndarray) -> np.ndarray:
        if self.softness <= 0:
            hard: np.ndarray = np.log(self.cluster_given_component.T[nearest(z, self.centroids)] + 1e-6)
            return hard
        c = self.centroids
        d2 = (z * z).sum(1)[:, None] - 2 * z @ c.T + (c * c).sum(1)[None]
        # Shifted by each row's nearest first, so that no softness makes a row all -inf (NaN).
        w = np.exp(-(d2 - d2.min(1, keepdims=True)) / self.softness)
        w /= w.sum(1, keepdims=True)
        out: np.ndarray = np.log(w @ self.cluster_given_component.T + 1e-6)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        p = self.projection
        sketch = {} if self.sketch is None else {"stats.sketch": self.sketch}
        return sketch | {
            "stats.centre": np.asarray([self.centre]),
            "stats.mean": p.mean,
            "stats.basis": p.basis,
            "stats.scale": np.asarray([p.scale]),
            "stats.centroids": self.centroids,
            "stats.cluster_given_component": self.cluster_given_component,
            "stats.softness": np.asarray([self.softness]),
        } | ({} if self.classifier is None else self.classifier.arrays(CLASSIFIER_PREFIX))

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> FineClusterModel:
        return cls(
            float(a["stats.centre"][0]),
            a.get("stats.sketch"),
            Projection(a["stats.mean"], a["stats.basis"], float(a["stats.scale"][0])),
            a["stats.centroids"],
            a["stats.cluster_given_component"],
            _softness(a),
            SourceClassifier.from_arrays(a, CLASSIFIER_PREFIX),
        )


def _softness(a: dict[str, np.ndarray]) -> float:
    """A saved model's softness: 0 where it has none (saved before soft assignment)."""
    if "stats.softness" not in a:
        return 0.0
    value = np.asarray(a["stats.softness"], dtype=np.float64)
    softness = float(value.ravel()[0]) if value.shape == (1,) else math.nan
    if not (softness == 0.0 or 1e-6 <= softness <= 10.0):
        raise ValueError(f"softness {value!r} is not 0 or within [1e-6, 10]")
    return softness
