"""The statistics phase of a private run, as a client plays it (docs/design.md §2).

A client answers each round's aggregate with its next release: moments, then per-fine-cluster
sums and counts, then its histogram. Everything it computes from its records depends on the
record itself and on released aggregates only, and every release is a Gaussian mechanism on a
sum of bounded contributions, with the noise share the plan's placement gives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from securegmi.core import fine_clusters as fc
from securegmi.errors import ProtocolViolation
from securegmi.privacy.calibration import PrivateMixturePlan, StatisticsPlan
from securegmi.privacy.mechanisms import gaussian_release
from securegmi.vocabulary import EventName, FieldName, Stage

# Each release's uplink stage (which carries one field of the same name: the server adds that
# field) and the downlink stage that carries its sum back.
UPLINK = {
    EventName.MOMENTS: Stage.MOMENTS,
    EventName.CLUSTERS: Stage.CLUSTER_STATS,
    EventName.HISTOGRAM: Stage.HISTOGRAM,
}
DOWNLINK = {
    EventName.MOMENTS: Stage.MOMENT_TOTALS,
    EventName.CLUSTERS: Stage.CLUSTER_TOTALS,
    EventName.HISTOGRAM: Stage.HISTOGRAMS,
}
SENSITIVITY = {
    EventName.MOMENTS: fc.MOMENTS_SENSITIVITY,
    EventName.CLUSTERS: fc.CLUSTER_SENSITIVITY,
    EventName.HISTOGRAM: fc.HISTOGRAM_SENSITIVITY,
}


def statistics_dims(
    plan: PrivateMixturePlan, clients: int, gradient_size: int, components: int
) -> dict[str, int]:
    """The sizes a protocol's private phases need, and N, the plan's minimum cohort (the
    fewest releases an aggregate may sum, for split noise to carry its full scale);
    `gradient_size` (K x P) where DP-SGD's noise is split (one gradient release per round), and
    the source classifier's size I where the plan distils one."""
    stats = plan.statistics
    dims = {
        "M": fc.moments_size(stats.sketch_dim),
        "S": stats.clusters * (stats.projection_dim + 1),
        "H": clients * stats.clusters,
        "N": stats.min_clients,
    }
    if plan.identifier_steps:
        dims["I"] = plan.identifier_size(components)
    return dims | ({"G": gradient_size} if plan.split_sgd else {})


T = TypeVar("T")


def released(value: T | None, what: str) -> T:
    """`value`, once the statistics phase has released what it is built from; ProtocolViolation
    (never an `assert`, which `python -O` drops) for a message that needs it sooner: messages
    out of order, or a state saved before that round."""
    if value is None:
        raise ProtocolViolation(
            f"this message needs {what}, which the statistics phase has not released yet: the "
            "server's messages are out of order, or the client's saved state predates that release"
        )
    return value


def downlink_stage(plan: StatisticsPlan, round_index: int) -> Stage:
    """The stage that carries round `round_index - 1`'s aggregate to the clients."""
    return Stage.START if round_index == 0 else DOWNLINK[plan.release_at(round_index - 1)]


@dataclass
class StatisticsState:
    projection: fc.Projection | None = None
    centroids: np.ndarray | None = None
    model: fc.FineClusterModel | None = None
    grouping: fc.Grouping | None = None


class StatisticsRole:
    """One client's part in the statistics phase: it turns each released aggregate into its next
    contribution, and the released histograms into the fine-cluster model and its pi."""

    def __init__(
        self,
        x: np.ndarray,
        plan: StatisticsPlan,
        components: int,
        slot: int,
        cohort: int,
        seed: int,
        noise_rng: np.random.Generator,
    ) -> None:
        self.sketch = fc.public_sketch(x.shape[1], plan.sketch_dim, plan.sketch_seed)
        self.u = fc.on_sphere(x, plan.centre, self.sketch)
        self.plan, self.components, self.slot, self.cohort = plan, components, slot, cohort
        self.seed, self.noise_rng = seed, noise_rng
        self.state = StatisticsState()

    def absorb(self, round_index: int, total: np.ndarray | None) -> None:
        """Post-processing of the aggregate of round `round_index - 1` (None in round 0)."""
        if total is None:
            return
        plan, state = self.plan, self.state
        release = plan.release_at(round_index - 1)
        if release == EventName.MOMENTS:
            state.projection = fc.Projection.from_moments(
                total, self.u.shape[1], plan.projection_dim, plan.moments_weights
            )
            state.centroids = fc.initial_centroids(plan.clusters, plan.projection_dim, self.seed)
        elif release == EventName.CLUSTERS:
            centroids = released(state.centroids, "the fine clusters' centroids")
            # A count below a few noise standard deviations is noise, not a cluster.
            floor = 3.0 * plan.cluster_noise * fc.CLUSTER_SENSITIVITY
            state.centroids = fc.update_centroids(total, centroids, floor, self.seed + round_index)
        else:
            projection = released(state.projection, "the projection")
            centroids = released(state.centroids, "the fine clusters' centroids")
            counts = total.reshape(self.cohort, plan.clusters)
            state.grouping = fc.group_clusters(counts, self.components, self.seed)
            state.model = fc.FineClusterModel(
                plan.centre, self.sketch, projection, centroids, state.grouping.cluster_given_component
            )

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What the phase has learnt so far, to rebuild the client in a fresh process."""
        st, out = self.state, dict[str, np.ndarray]()
        if st.projection is not None:
            out |= {
                "stats.mean": st.projection.mean,
                "stats.basis": st.projection.basis,
                "stats.scale": np.asarray([st.projection.scale]),
            }
        if st.centroids is not None:
            out["stats.centroids"] = st.centroids
        if st.grouping is not None:
            g = st.grouping
            out |= {
                "stats.cluster_given_component": g.cluster_given_component,
                "stats.pi": g.pi,
                "stats.sizes": g.sizes,
            }
        return out

    def load_state(self, a: Mapping[str, np.ndarray]) -> None:
        st = self.state = StatisticsState()
        if "stats.mean" in a:
            st.projection = fc.Projection(a["stats.mean"], a["stats.basis"], float(a["stats.scale"][0]))
        if "stats.centroids" in a:
            st.centroids = np.asarray(a["stats.centroids"])
        if "stats.pi" in a:
            st.grouping = fc.Grouping(a["stats.cluster_given_component"], a["stats.pi"], a["stats.sizes"])
            st.model = identifier_from_state(self.plan, a, self.sketch)

    def exact(self, round_index: int) -> np.ndarray:
        """The sum this round's Gaussian mechanism releases (for the histogram, this client's
        own row): returned and never kept."""
        release = self.plan.release_at(round_index)
        if release == EventName.MOMENTS:
            return fc.moments_contribution(self.u, self.plan.moments_weights)
        z = released(self.state.projection, "the projection")(self.u)
        centroids = released(self.state.centroids, "the fine clusters' centroids")
        if release == EventName.HISTOGRAM:
            return fc.histogram(z, centroids)
        return fc.cluster_contribution(z, centroids)

    def contribution(self, round_index: int) -> tuple[Stage, FieldName, np.ndarray]:
        """(stage, field, noisy value) of this round's release."""
        plan = self.plan
        release = plan.release_at(round_index)
        sigma = plan.noise_multiplier(release) * plan.share_scale(release)
        stage = UPLINK[release]
        noisy = gaussian_release(self.exact(round_index), sigma, SENSITIVITY[release], self.noise_rng)
        if release == EventName.HISTOGRAM:
            # The client's own block of the clients x clusters vector carries its release;
            # the other blocks stay exact zeros, so the sum is every client's row.
            out = np.zeros(self.cohort * plan.clusters)
            out[self.slot * plan.clusters : (self.slot + 1) * plan.clusters] = noisy
            noisy = out
        return stage, FieldName(stage), noisy


def identifier_from_state(
    plan: StatisticsPlan, a: Mapping[str, np.ndarray], sketch: np.ndarray | None
) -> fc.FineClusterModel | None:
    """The source identifier from a client's saved statistics state; None before the phase ends."""
    if "stats.cluster_given_component" not in a:
        return None
    projection = fc.Projection(a["stats.mean"], a["stats.basis"], float(a["stats.scale"][0]))
    return fc.FineClusterModel(
        plan.centre, sketch, projection, np.asarray(a["stats.centroids"]), a["stats.cluster_given_component"]
    )
