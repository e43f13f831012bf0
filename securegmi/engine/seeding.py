"""Deterministic per-(run, round, party) seeds, so equal configs give equal runs."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch


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
