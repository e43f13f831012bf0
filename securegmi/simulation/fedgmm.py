"""FedGMM's density side (Wu et al., ICML 2023) as a peer of FedGMI: K shared full-covariance
Gaussians, each client's own mixture weights, federated EM on summed moments.

Round 0: each client sends its record count, sum and sum of outer products (the pooled mean and
covariance give a public start, `GaussianComponents.spread`). Every later round: each client
computes responsibilities under its own weights, updates them, and sends its responsibility-
weighted moments; the server sums them and takes the M-step. The sums travel in the clear, in
process (a comparison, not a protocol: nothing of it is private).
"""

from __future__ import annotations

import operator
import time
from functools import reduce

import numpy as np
import torch

from securegmi.core.em import infer_mixture
from securegmi.core.gaussian_mixture import GaussianComponents, Moments
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.simulation.recorder import Recorder
from securegmi.simulation.study import new_model

# Added to every covariance's diagonal (records in [0, 1]): a small ridge lets a Gaussian fit
# pixel noise, a large one blurs the sources (tuned on digits-PM:
# bench/results/tuning.md#fedgmm-ridge).
RIDGE = 0.3


def run_fedgmm(recorder: Recorder) -> tuple[list[MixtureOfVAEs], list[np.ndarray], float]:
    """The placeholder models, each client's weights, and the bytes a client sends per round."""
    config, data = recorder.config, recorder.data
    k = config.components
    xs = [np.asarray(c.x_train, dtype=np.float64) for c in data.clients]
    pis = [np.full(k, 1.0 / k) for _ in xs]
    # The evaluation scores records with the Gaussians; the untrained VAEs only fill its slots.
    placeholders = [new_model(config, data)] * len(xs)
    t0 = time.perf_counter()
    pooled = sum(
        (Moments.of(x, np.ones((len(x), 1))) for x in xs[1:]), Moments.of(xs[0], np.ones((len(xs[0]), 1)))
    )
    gaussians = GaussianComponents.spread(pooled, k, RIDGE, config.seed)
    recorder.scorer = gaussians.log_likelihood
    uplink = 0.0
    recorder.finish_round(0, t0, placeholders, pis)
    for t in range(1, config.rounds):
        t0 = time.perf_counter()
        sent = []
        for i, x in enumerate(xs):
            ll = torch.as_tensor(gaussians.log_likelihood(x))
            resp, _, pis[i] = infer_mixture(ll, pis[i], 1.0, 1, config.pi_floor)
            sent.append(Moments.of(x, resp.numpy()))
        gaussians = GaussianComponents.from_moments(reduce(operator.add, sent), RIDGE)
        recorder.scorer = gaussians.log_likelihood
        uplink = float(sent[0].nbytes)
        recorder.finish_round(t, t0, placeholders, pis, uplink=int(uplink * len(xs)))
    return placeholders, pis, uplink
