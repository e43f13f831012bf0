"""Test doubles that see the un-noised values a client's release path computes.

Production objects keep no un-noised value (a client's state, and anything a debugger or a
crash dump of it shows, holds releases only). A law test that needs the exact sum behind a
release wraps, on one object, the method that computes it: the shipped path still runs, and
each exact value is copied here as it passes to the Gaussian mechanism.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from securegmi.federation.release import CountsRelease
from securegmi.federation.statistics import StatisticsRole
from securegmi.privacy.dpsgd import PerSampleLoss, PrivateTrainer


def record_exact(role: StatisticsRole) -> list[np.ndarray]:
    """Every exact statistic `role` releases from now on (for the histogram, the client's own
    row), in order."""
    seen: list[np.ndarray] = []
    exact = role.exact

    def recorded(round_index: int) -> np.ndarray:
        value = exact(round_index)
        seen.append(np.array(value, copy=True))
        return value

    role.exact = recorded  # type: ignore[method-assign]
    return seen


def record_counts(policy: CountsRelease | Any) -> list[np.ndarray]:
    """Every exact soft-count vector sum_x r(x) `policy` (the em design's) releases from now
    on, in order."""
    if not isinstance(policy, CountsRelease):
        raise TypeError(f"a {type(policy).__name__} releases no soft counts")
    seen: list[np.ndarray] = []
    exact = policy.exact_counts

    def recorded(elbo: Tensor, temperature: float) -> np.ndarray:
        value = exact(elbo, temperature)
        seen.append(np.array(value, copy=True))
        return value

    policy.exact_counts = recorded  # type: ignore[method-assign]
    return seen


def record_clipped_sums(trainer: PrivateTrainer) -> list[list[torch.Tensor]]:
    """Every clipped per-sample gradient sum `trainer` forms from now on, before its noise (a
    local step's, or a split step's share), one tensor per parameter, in order."""
    seen: list[list[torch.Tensor]] = []
    accumulate = trainer._accumulate_clipped

    def recorded(loss_fn: PerSampleLoss, batch: Tensor) -> None:
        accumulate(loss_fn, batch)
        seen.append([p.grad.detach().clone() for p in trainer.module.parameters() if p.grad is not None])

    trainer._accumulate_clipped = recorded  # type: ignore[method-assign]
    return seen


def record_shares(trainer: PrivateTrainer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every split-noise share `trainer` releases from now on, as (the clipped sum it was drawn
    on, flattened; the released share)."""
    shares: list[tuple[np.ndarray, np.ndarray]] = []
    real_share, seen = trainer.noisy_share, record_clipped_sums(trainer)

    def recorded(loss_fn: PerSampleLoss, batch: Tensor, share: float) -> np.ndarray:
        released = real_share(loss_fn, batch, share)
        (grads,) = seen  # the one clipped sum this share was drawn on
        seen.clear()
        pre = np.concatenate([g.reshape(-1).numpy() for g in grads]).astype(np.float64)
        shares.append((pre, released))
        return released

    trainer.noisy_share = recorded  # type: ignore[method-assign]
    return shares
