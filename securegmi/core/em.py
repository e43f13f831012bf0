"""E-step and M-step maths of FedGMI (docs/design.md §1), as pure functions of tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from securegmi.errors import ConfigError


def temperature_at(round_index: int, rounds: int, initial: float, anneal_fraction: float) -> float:
    """Likelihood temperature for a round: geometric from `initial` down to 1, then 1.

    Tempering r = softmax(log pi_c + ELBO / T) keeps the client's own prior audible while
    components are still close; at T = 1 ELBO gaps of tens of nats drown a few nats of log pi and
    EM only polishes its initial split (docs/design.md §1: 0.69 without, 0.93 with, on digits).
    """
    anneal_rounds = max(1, math.floor(rounds * anneal_fraction))
    if initial <= 1.0 or round_index >= anneal_rounds:
        return 1.0
    return float(initial ** (1.0 - round_index / anneal_rounds))


def responsibilities(elbo: Tensor, log_prior: Tensor, temperature: float = 1.0) -> Tensor:
    """r_k(x) = softmax_k(log pi_k + l_k(x) / T), computed with a stable log-sum-exp.

    `elbo` is (batch, K); `log_prior` is (K,) for one client or (batch, K) for pooled clients.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    return torch.softmax(log_prior + elbo / temperature, dim=-1)


def mixture_loss(elbo: Tensor, resp: Tensor) -> Tensor:
    """Per-sample M-step loss sum_k r_k(x) * (-ELBO_k(x)); responsibilities are constants."""
    return -(resp.detach() * elbo).sum(-1)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al., ICML 2008, Fig. 1).

    Written out because it is six lines and scipy has no simplex projection.
    """
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    ks = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u * ks > css - 1.0)[0][-1])
    theta = (css[rho] - 1.0) / (rho + 1)
    projected: np.ndarray = np.maximum(v - theta, 0.0)
    return projected


def mixture_estimate(masses: np.ndarray, floor: float) -> np.ndarray:
    """A client's pi from its (possibly noisy) soft counts: simplex projection of the
    normalised counts, floored so that log pi stays finite and no component dies for good."""
    m = np.asarray(masses, dtype=np.float64)
    total = max(float(np.maximum(m, 0.0).sum()), 1e-12)
    pi = project_to_simplex(m / total)
    pi = np.maximum(pi, floor)
    normalised: np.ndarray = pi / pi.sum()
    return normalised


def log_prior(pi: np.ndarray) -> Tensor:
    return torch.as_tensor(np.log(pi), dtype=torch.float32)


# EM on frozen scores converges linearly, slowly where components overlap (50 iterations stop
# 1e-5 short on two unit Gaussians 0.8 apart): iterate to a fixed point rather than a count,
# capped for near-identical components, towards whose boundary EM creeps (an iteration on a
# site's scores takes microseconds).
PI_ITERATIONS = 10_000
PI_TOLERANCE = 1e-10


def fixed_point_pi(
    scores: Tensor,
    start: np.ndarray,
    floor: float,
    iterations: int = PI_ITERATIONS,
    tolerance: float = PI_TOLERANCE,
) -> np.ndarray:
    """The mixture proportions of one set of records on frozen components: EM's fixed point
    pi = floor(mean_x softmax(log pi + scores(x))) from `start`, where `scores` is the (n, K)
    matrix of per-component log-likelihoods (ELBOs, or an identifier's log P(cluster | k)).

    Iterated in float64: float32 responsibilities move pi by ulps forever and never settle
    within `tolerance`. Stops once no proportion moves by more than `tolerance`."""
    if len(scores) == 0:
        raise ConfigError("estimating a mixture needs at least one record")
    s = scores.detach().double()
    pi = mixture_estimate(start, floor)
    for _ in range(iterations):
        r = responsibilities(s, torch.log(torch.as_tensor(pi, dtype=torch.float64)))
        new = mixture_estimate(r.sum(0).numpy(), floor)
        moved = float(np.abs(new - pi).max())
        pi = new
        if moved < tolerance:
            break
    return pi


def infer_mixture(
    elbo: Tensor, pi: np.ndarray, temperature: float, iterations: int, floor: float
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Alternate r = softmax(log pi + ELBO / T) and pi = normalised sum_x r on a fixed ELBO matrix.

    The ELBOs are computed once, so the fixed-point iterations are cheap; they let a client's
    prior catch up with its data within a round instead of lagging one round per step (on
    digits-PM, 1 -> 5 iterations lifted source accuracy from 0.63 to 0.88 at equal rounds).
    Returns the final responsibilities, their soft counts and the resulting pi.
    """
    resp = responsibilities(elbo, log_prior(pi), temperature)
    for _ in range(iterations - 1):
        pi = mixture_estimate(resp.sum(0).numpy(), floor)
        resp = responsibilities(elbo, log_prior(pi), temperature)
    masses = resp.sum(0).numpy().astype(np.float64)
    return resp, masses, mixture_estimate(masses, floor)
