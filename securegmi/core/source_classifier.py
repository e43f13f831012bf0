"""A small classifier of sources, distilled from the fine-cluster model's responsibilities.

The fine-cluster model (`core.fine_clusters`) scores a record by the released clusters near it:
coarse, since 20 clusters in 10 dimensions is all a private release can afford. A one-hidden-
layer MLP trained on every client's records to predict those responsibilities generalises past
them (the teacher's errors are not the student's: Papernot et al., "Semi-supervised knowledge
transfer for deep learning from private training data", ICLR 2017, with released targets in
place of an ensemble). Its training is DP-SGD on the records with released targets only
(`federation.release`); this module is the model and its forward pass.

The classifier learns q(k | u) under the pooled prior, the clients' released pis averaged by
their released sizes (`prior`): a client scores with log q(k | u) - log prior + its own log pi,
so its own mixture replaces the pooled one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from securegmi.errors import ConfigError

if TYPE_CHECKING:  # torch only where the classifier is trained: scoring is numpy
    from torch import nn

# Its arrays' names in a model file, after the identifier's "stats." prefix.
_NAMES = ("w1", "b1", "w2", "b2", "prior")
MAX_WEIGHT = 1e3


def classifier_module(features: int, hidden: int, components: int, seed: int) -> nn.Sequential:
    """The torch module DP-SGD trains, from a public seed (every client starts from the same)."""
    import torch
    from torch import nn

    if min(features, hidden, components) < 1:
        raise ConfigError(
            f"a source classifier needs positive sizes, got features {features}, hidden {hidden}, "
            f"components {components}"
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, components))
    finally:
        torch.random.set_rng_state(generator_state)


def parameter_count(features: int, hidden: int, components: int) -> int:
    return features * hidden + hidden + hidden * components + components


@dataclass(frozen=True)
class SourceClassifier:
    """The trained classifier as arrays: log q(k | u) = log_softmax(relu(u W1 + b1) W2 + b2)."""

    w1: np.ndarray  # (features, hidden)
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (hidden, K)
    b2: np.ndarray  # (K,)
    prior: np.ndarray  # (K,) the pooled prior it was trained under, a released value

    def __post_init__(self) -> None:
        if self.w1.ndim != 2 or self.w2.ndim != 2:
            raise ConfigError(
                f"source classifier weights must be matrices: w1 {self.w1.shape}, w2 {self.w2.shape}"
            )
        h, k = self.w1.shape[1], self.w2.shape[1]
        shapes = (self.b1.shape, self.w2.shape, self.b2.shape, self.prior.shape)
        if shapes != ((h,), (h, k), (k,), (k,)):
            raise ConfigError(
                f"source classifier arrays do not fit together: w1 {self.w1.shape}, b1 {self.b1.shape}, "
                f"w2 {self.w2.shape}, b2 {self.b2.shape}, prior {self.prior.shape}"
            )
        if not (self.prior > 0).all():
            raise ConfigError("a source classifier's prior must be positive in every component")
        # Forty Adam steps of 0.1 move a weight by at most 4: anything near MAX_WEIGHT is not a
        # trained classifier, and weights of 1e308 made finite records score NaN (a review).
        if not all(
            np.isfinite(a).all() and np.abs(a).max() <= MAX_WEIGHT
            for a in (self.w1, self.b1, self.w2, self.b2)
        ):
            raise ConfigError(
                f"a source classifier's weights must be finite and at most {MAX_WEIGHT:g} in size"
            )

    @classmethod
    def from_module(cls, module: nn.Sequential, prior: np.ndarray) -> SourceClassifier:
        w1, b1, w2, b2 = (p.detach().double().numpy().copy() for p in module.parameters())
        return cls(w1.T.copy(), b1, w2.T.copy(), b2, np.asarray(prior, dtype=np.float64))

    def log_posterior(self, u: np.ndarray) -> np.ndarray:
        """(n, K): log q(k | u)."""
        logits = np.maximum(u @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2
        logits -= logits.max(1, keepdims=True)
        out: np.ndarray = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return out

    def log_likelihood_ratio(self, u: np.ndarray) -> np.ndarray:
        """(n, K): log q(k | u) - log prior_k, what a client adds to its scores."""
        out: np.ndarray = self.log_posterior(u) - np.log(self.prior)[None]
        return out

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{name}": getattr(self, name) for name in _NAMES}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], prefix: str) -> SourceClassifier | None:
        """None where the file holds no classifier (a model saved before it, or without one)."""
        if f"{prefix}w1" not in a:
            return None
        return cls(*(np.asarray(a[f"{prefix}{name}"], dtype=np.float64) for name in _NAMES))
