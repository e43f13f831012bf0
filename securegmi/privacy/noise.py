"""Where DP noise comes from.

Noise that anyone else can regenerate gives no privacy: a run seed is written to config.json,
so noise derived from it could be subtracted by whoever holds the run directory. Clients
therefore seed their noise generators from OS entropy (`secrets`), never from the run seed.
"Seeded" noise exists for reproducible tests only; the audit fails a run that used it.

Still not a CSPRNG end to end: the seed is secret, but the samples come from torch's Philox /
Mersenne Twister and numpy's PCG64, not from a cryptographically secure generator.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def private_seed() -> int:
    return secrets.randbits(63)


def noise_generators(seed: int | None) -> tuple[np.random.Generator, torch.Generator]:
    """(numpy, torch) generators for one client's DP noise: from OS entropy unless a test
    passes a seed."""
    seed = private_seed() if seed is None else seed
    return np.random.default_rng([seed, 0]), torch.Generator().manual_seed(seed)


def private_torch_generator() -> torch.Generator:
    return torch.Generator().manual_seed(private_seed())
