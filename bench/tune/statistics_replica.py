"""A fast central replica of the statistics design, for ablations on tuning seeds.

One curator over the pooled records, with the noise the federation's split releases carry
(each aggregate's variance m / (m - 1) sigma^2, `split_share`) and the package's own
`core.fine_clusters` functions, so a variant costs seconds instead of a federated run:

    python bench/tune/statistics_replica.py '{"exact": ["moments"]}' 10,11,12,13,14,15,16,17 2

Options (JSON): `eps`; `exact` (releases made without noise: moments, clusters, histogram);
`weights` (the moments weights, default the package's); `softness` (0: nearest cluster);
`clusters`, `dims`, `iterations`; `shares`. It prints the
mean and sd of source accuracy and pi TV (released pi) over seeds x noise draws. Figures it gave
are in bench/results/tuning.md; reported figures come from bench/utility.py, never from here.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np

from securegmi.config import SimulationConfig
from securegmi.core import fine_clusters as fc
from securegmi.core.metrics import map_proportions, match_components, source_accuracy, total_variation
from securegmi.privacy.calibration import PrivateMixturePlan, statistics_noise
from securegmi.simulation.study import dp_plan, load_federated_data


def run(seed: int, draw: int, opts: dict[str, Any]) -> tuple[float, float]:
    config = SimulationConfig(epsilon=opts.get("eps", 8.0), protocol="secure", seed=seed, dp_noise="seeded")
    data = load_federated_data(config)
    plan = dp_plan(config, data)
    assert isinstance(plan, PrivateMixturePlan)
    st = plan.statistics
    exact = set(opts.get("exact", ()))
    rng = np.random.default_rng([draw, seed])
    inflation = math.sqrt(st.min_clients / (st.min_clients - 1))

    def noisy(value: np.ndarray, multiplier: float, sensitivity: float, name: str) -> np.ndarray:
        if name in exact:
            return value
        return value + rng.normal(0, multiplier * sensitivity * inflation, size=value.shape)

    mn, cn, hn = st.moments_noise, st.cluster_noise, st.histogram_noise
    iterations = opts.get("iterations", st.iterations)
    if "shares" in opts:
        total = 1 / math.sqrt(1 / mn**2 + st.iterations / cn**2 + 1 / hn**2)
        mn, cn, hn = statistics_noise(total, st.iterations, tuple(opts["shares"]))
    cn *= math.sqrt(iterations / st.iterations)
    sketch = fc.public_sketch(data.data_dim, st.sketch_dim, st.sketch_seed)
    us = [fc.on_sphere(c.x_train, st.centre, sketch) for c in data.clients]
    dim = us[0].shape[1]
    weights = tuple(opts.get("weights", fc.MOMENTS_WEIGHTS))
    moments = noisy(
        sum(fc.moments_contribution(u, weights) for u in us), mn, fc.MOMENTS_SENSITIVITY, "moments"
    )
    projection = fc.Projection.from_moments(moments, dim, opts.get("dims", st.projection_dim), weights)
    zs = [projection(u) for u in us]
    centroids = fc.initial_centroids(opts.get("clusters", st.clusters), projection.dim, seed)
    for i in range(iterations):
        sums = noisy(
            sum(fc.cluster_contribution(z, centroids) for z in zs), cn, fc.CLUSTER_SENSITIVITY, "clusters"
        )
        centroids = fc.update_centroids(sums, centroids, 3.0 * cn * fc.CLUSTER_SENSITIVITY, seed + i + 1)
    counts = np.stack([noisy(fc.histogram(z, centroids), hn, 1.0, "histogram") for z in zs])
    grouping = fc.group_clusters(counts, config.n_sources, seed)
    model = fc.FineClusterModel(
        st.centre,
        sketch,
        projection,
        centroids,
        grouping.cluster_given_component,
        opts.get("softness", fc.SOFT_ASSIGNMENT),
    )
    assigned = []
    for i, client in enumerate(data.clients):
        scores = model.log_likelihood(client.x_test)
        assigned.append((scores + np.log(np.maximum(grouping.pi[i], 1e-6))).argmax(1))
    k = config.n_sources
    truth = np.concatenate([c.source_test for c in data.clients])
    mapping = match_components(truth, np.concatenate(assigned), k, k)
    tv = np.mean(
        [
            total_variation(map_proportions(grouping.pi[i], mapping, k), c.pi_true)
            for i, c in enumerate(data.clients)
        ]
    )
    return source_accuracy(truth, np.concatenate(assigned), mapping), float(tv)


def main() -> None:
    opts = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "10,11,12,13,14").split(",")]
    draws = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    runs = [run(s, 100 + d, opts) for s in seeds for d in range(draws)]
    acc, tv = np.array(runs).T
    print(json.dumps(opts), f"source accuracy {acc.mean():.3f} ± {acc.std():.3f}, pi TV {tv.mean():.3f}")


if __name__ == "__main__":
    main()
