"""Empirical privacy auditing of DP-SGD in one training run (Steinke, Nasr and Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023).

m canaries are each included in the training data with probability 1/2, independently; after
one run the auditor scores every canary from the released parameters, guesses "in" for the k
highest scores and "out" for the k lowest, and counts its correct guesses. Under (eps, delta)-DP
the number correct is dominated by a binomial (their Theorem 5.2), which turns a count into a
lower bound on epsilon at a chosen confidence. A sound implementation gives a bound below its
claim (with that confidence); a broken one can give a bound above it.

The canaries here are gradient-space ("Dirac") canaries, the paper's white-box setting: each is a
record whose per-sample gradient is one coordinate of a probe layer, so its clipped gradient is
exactly the clipping norm along that coordinate. They run through the same `PrivateTrainer` as
a client's VAE records (Opacus ghost clipping, Poisson sampling, the client's optimiser and
noise), in the same batches. Only the final parameters are observed, as a client releases them.

Hand-written rather than taken from jax_privacy's `auditing` module: that package brings JAX,
which this project does not otherwise need, for two short formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from securegmi.errors import ConfigError
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer
from securegmi.privacy.noise import NoiseSource


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (epsilon, delta)-DP algorithm on m canaries.

    Steinke et al. 2023, Theorem 5.2 and their Algorithm (appendix D): the binomial tail at
    the randomised-response accuracy e^eps / (1 + e^eps), plus 2 m delta times the largest
    average of the binomial's mass just below v."""
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= Binomial(r, q) < v]
    alpha = float(np.max(below / i))
    return min(1.0, beta + alpha * delta * 2 * m)


def empirical_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that `v` correct of `r` guesses on `m` canaries rejects at
    `confidence`: the algorithm is not (epsilon, delta)-DP for any smaller epsilon, except with
    probability 1 - confidence. 0 when the guesses show nothing."""
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    # 64 is far above any bound a feasible number of guesses can show (a million guesses, all
    # right, show about 12.7), so the bisection starts from a bracket.
    low, high = 0.0, 64.0
    for _ in range(50):  # bisection: p_value is increasing in epsilon
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


@dataclass(frozen=True)
class CanaryAudit:
    canaries: int
    guesses: int
    correct: int
    empirical_epsilon: float  # a lower bound at `confidence`
    confidence: float


class _WithProbe(nn.Module):
    """The audited module beside a probe layer with one weight per canary."""

    def __init__(self, module: nn.Module, canaries: int) -> None:
        super().__init__()
        self.inner = module
        self.probe = nn.Linear(canaries, 1, bias=False)
        nn.init.zeros_(self.probe.weight)

    def forward(self, x: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner(x), self.probe(onehot).squeeze(-1)


RecordLoss = Callable[[Tensor, Tensor], Tensor]  # (module output, record indices) -> (batch,) losses


def audit_dp_sgd(
    module: nn.Module,
    x: Tensor,
    record_loss: RecordLoss,
    config: DpSgdConfig,
    steps: int,
    *,
    canaries: int,
    guesses: int,
    delta: float,
    learning_rate: float,
    seed: int,
    noise: NoiseSource | None = None,
    confidence: float = 0.95,
) -> CanaryAudit:
    """Train `module` on the records `x` for `steps` DP-SGD steps with Dirac canaries among
    them, then bound epsilon from the final probe weights (top and bottom `guesses` each).

    `config` is what the trainer runs; the claim to compare with is the caller's (a broken
    twin runs a config whose noise differs from its claim)."""
    if not 0 < 2 * guesses <= canaries:
        raise ConfigError(f"guesses per side ({guesses}) must be positive and at most half of {canaries}")
    rng = np.random.default_rng(seed)
    members = np.nonzero(rng.random(canaries) < 0.5)[0]
    n = len(x)
    wrapped = _WithProbe(module, canaries)
    trainer = PrivateTrainer(wrapped, torch.optim.Adam(wrapped.parameters(), lr=learning_rate), config, noise)
    canary_of = torch.as_tensor(members)
    # Any loss slope above the clipping norm is clipped to exactly the norm: the strongest
    # canary a record can be.
    slope = 10.0 * config.clip_norm

    def per_sample_loss(gsm: nn.Module, batch: Tensor) -> Tensor:
        real = batch < n
        rows = torch.where(real, batch, 0)
        onehot = torch.zeros(len(batch), canaries)
        fake = (~real).nonzero().squeeze(-1)
        onehot[fake, canary_of[batch[fake] - n]] = 1.0
        out, probe = gsm(x[rows], onehot)
        # A canary's VAE loss and a real record's probe output are multiplied by 0: each record
        # has a gradient in its own part of the parameters only.
        return torch.where(real, record_loss(out, rows), -slope * probe)

    trainer.module.train()
    for _ in range(steps):
        trainer.step(per_sample_loss, trainer.poisson_batch(n + len(members)))
    scores = wrapped.probe.weight.detach().reshape(-1).numpy()
    order = np.argsort(scores)
    guessed_in, guessed_out = order[-guesses:], order[:guesses]
    included = np.zeros(canaries, dtype=bool)
    included[members] = True
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return CanaryAudit(
        canaries,
        2 * guesses,
        correct,
        empirical_epsilon(canaries, 2 * guesses, correct, delta, confidence),
        confidence,
    )
