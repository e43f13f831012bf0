"""Deterministic per-(run, round, party) seeds, so equal configs give equal runs."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_torch(*parts: int) -> np.random.Generator:
    """Seed torch's global generator for this unit of work; return a numpy generator beside it."""
    seed = derive_seed(*parts)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
