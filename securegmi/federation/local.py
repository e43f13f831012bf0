"""A client's local FedGMI work (docs/design.md §1): its records, its model copy and its mixture
estimate pi; adopting the aggregate, E-step, training, and the pre-weighted upload.

Release policies (`release`) decide which of these steps run and what of their
results may leave the client; this module computes, it never discloses.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from securegmi.core.em import infer_mixture
from securegmi.core.mixture import MixtureOfVAEs, divide_aggregate
from securegmi.core.training import e_step_elbo, train_components
from securegmi.errors import ConfigError, ProtocolViolation
from securegmi.vocabulary import FieldName

Weighting = Literal["mass", "size"]
Assignment = Literal["mixture", "cluster"]


# Adam's step size on DP-SGD's noisy gradients, for a private client built without settings
# (SimulationConfig.dp_learning_rate is the same): the default plan takes a few full-batch steps,
# where a large step pays (bench/results/tuning.md#private-densities).
DP_LEARNING_RATE = 0.05


@dataclass(frozen=True)
class ClientSettings:
    """A client's local training hyper-parameters (tuned on digits-PM: docs/benchmarks.md; the
    simulator takes a larger step for non-private training there, config.DEFAULT_LEARNING_RATE)."""

    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 2e-3
    elbo_samples: int = 4
    e_step_iterations: int = 10
    pi_floor: float = 1e-3
    weighting: Weighting = "mass"  # "size": FedEM's weighting by client size, for comparison
    top_b: int | None = None
    # "cluster": IFCA's hard choice of one component per client, for comparison (em_round)
    assignment: Assignment = "mixture"

    def __post_init__(self) -> None:
        positive = ("local_epochs", "batch_size", "elbo_samples", "e_step_iterations")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"ClientSettings.{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not 0 <= self.pi_floor < 1:
            raise ConfigError("ClientSettings needs learning_rate > 0 and pi_floor in [0, 1)")


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_torch(*parts: int) -> np.random.Generator:
    """Seed torch's global generator for this unit of work; return a numpy generator beside it."""
    seed = derive_seed(*parts)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def client_stream(client_id: str) -> int:
    """The index of a client's public random streams: i for the simulator's `client-<i>` ids
    (so simulated runs keep their streams), otherwise a stable hash of the id."""
    match = re.fullmatch(r"client-(\d+)", client_id)
    if match:
        return int(match.group(1))
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:4], "big")


def adopt_aggregate(model: MixtureOfVAEs, inbound: Mapping[str, np.ndarray]) -> None:
    """theta_k = S_k / W_k where `inbound` (a decoded broadcast) carries the sums."""
    if FieldName.COMPONENT_SUMS in inbound:
        current = model.get_component_vectors()
        sums, masses = inbound[FieldName.COMPONENT_SUMS], inbound[FieldName.COMPONENT_MASSES]
        model.set_component_vectors(divide_aggregate(sums.reshape(current.shape), masses, current))


class LocalLearner:
    """Holds one client's records, model copy and pi. Ground truth never enters it."""

    def __init__(
        self, client_id: str, x: np.ndarray, model: MixtureOfVAEs, settings: ClientSettings, seed: int
    ) -> None:
        self.client_id = client_id
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.model = model
        self.settings = settings
        self.seed = seed  # the federation's public seed: ELBO draws and minibatch order
        self.stream = client_stream(client_id)
        k = model.n_components
        self.pi = np.full(k, 1.0 / k)

    def public_randomness(self, round_index: int) -> np.random.Generator:
        """Seed this round's public draws (ELBO samples, minibatch order)."""
        return seed_torch(self.seed, round_index, self.stream)

    def adopt(self, inbound: Mapping[str, np.ndarray]) -> None:
        """theta_k = S_k / W_k from a broadcast; nothing to adopt from a `start`."""
        adopt_aggregate(self.model, inbound)

    def em_round(self, round_index: int, temperature: float) -> np.ndarray:
        """Non-private: E-step with this client's pi as prior, pi update, M-step; returns the
        soft counts."""
        s = self.settings
        rng = self.public_randomness(round_index)
        if s.assignment == "cluster":
            resp, masses, self.pi = self._choose_cluster()
        else:
            resp, masses, self.pi = infer_mixture(
                self.elbo(), self.pi, temperature, s.e_step_iterations, s.pi_floor
            )
        self.train(resp, rng)
        return masses

    def _choose_cluster(self) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """IFCA (Ghosh et al., NeurIPS 2020, Algorithm 1): the client takes the one cluster
        model whose loss on its data is lowest (here the mean negative ELBO) and trains only it;
        its pi is that choice (floored, so the evaluation's prior stays finite)."""
        k = int(self.elbo().mean(0).argmax())
        resp = torch.zeros(len(self.x), self.model.n_components)
        resp[:, k] = 1.0
        pi = np.full(self.model.n_components, self.settings.pi_floor)
        pi[k] = 1.0
        return resp, resp.sum(0).numpy().astype(np.float64), pi / pi.sum()

    def elbo(self) -> Tensor:
        return e_step_elbo(self.model, self.x, self.settings.elbo_samples)

    def train(self, resp: Tensor, rng: np.random.Generator) -> None:
        """Non-private M-step: Adam on sum_k r_k(x) (-ELBO_k(x))."""
        s = self.settings
        # A fresh Adam each round: moments kept across rounds go stale once the parameters are
        # replaced by the aggregate (figures: bench/results/tuning.md#fresh-adam).
        optimiser = torch.optim.Adam(self.model.parameters(), lr=s.learning_rate)
        train_components(
            self.model, self.x, resp, optimiser, epochs=s.local_epochs, batch_size=s.batch_size, generator=rng
        )

    def upload(self, masses: np.ndarray) -> dict[str, np.ndarray]:
        """u_ck = w_ck theta_ck for the B heaviest components, pre-weighted so the server only adds."""
        k = self.model.n_components
        weights = (
            np.full(k, float(len(self.x))) if self.settings.weighting == "size" else np.maximum(masses, 0.0)
        )
        b = k if self.settings.top_b is None else self.settings.top_b
        index = np.sort(np.argsort(-weights, kind="stable")[:b]).astype(np.int64)
        sent = np.zeros(k)
        sent[index] = weights[index]
        vectors = self.model.get_component_vectors()[index]
        return {
            FieldName.MASSES: sent,
            FieldName.COMPONENT_INDEX: index,
            FieldName.WEIGHTED_COMPONENTS: (weights[index, None] * vectors).astype(np.float32),
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"components": self.model.get_component_vectors(), "pi": self.pi.copy()}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        pi = np.asarray(arrays["pi"], dtype=np.float64)
        if pi.shape != self.pi.shape:
            raise ProtocolViolation(
                f"{self.client_id}: saved pi has shape {pi.shape}, expected {self.pi.shape}"
            )
        self.model.set_component_vectors(np.asarray(arrays["components"], dtype=np.float32))
        self.pi = pi
