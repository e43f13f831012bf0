"""Where DP noise and Poisson sampling come from (docs/design.md §2, law 2: noise is unguessable).

Noise that anyone else can regenerate gives no privacy: whoever finds the generator's state
subtracts the noise exactly. So every client's DP noise and subsampling draws come from one
`NoiseSource`: ChaCha20 (20 rounds; `randomgen`'s bit generator behind numpy's `Generator`)
keyed with 256 bits from the OS's entropy pool (`secrets`), never from the run seed written to
config.json. ChaCha20 is a stream cipher: its output cannot be told from uniform bits, nor its
key recovered from it, without breaking the cipher, so the split-noise adversary who decrypts
one share cannot search for the state that drew it.

torch's generators are never the source: torch's CPU generator (mt19937) keeps only the low
32 bits of any seed (`manual_seed(s)` and `manual_seed(s & 0xFFFFFFFF)` draw alike), a search
of tens of core-hours. Opacus would draw its noise with such a generator; our optimiser
(`privacy.dpsgd`) draws it here instead and adds it exactly where Opacus adds its own.

"Seeded" noise (a test passes an integer) is reproducible by construction, for tests and the
neighbour checks only; the audit fails a run that used it. The figures assume ideal Gaussian
noise: numpy's ziggurat on ChaCha20 output, in floating point (Mironov, CCS 2012, on what
floating-point Laplace and Gaussian samplers may leak).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from randomgen import ChaCha

from securegmi.errors import PrivacyError

KEY_BITS = 256  # ChaCha20's key: the secret state an adversary would have to guess
ROUNDS = 20  # the cipher's standard round count; fewer trade security for speed
# What a private run prints beside its plan.
NOISE_NOTE = (
    "DP noise and Poisson sampling come from ChaCha20 keyed with 256 bits of OS entropy; the "
    "(epsilon, delta) figures assume ideal Gaussian noise (drawn in floating point)."
)


class NoiseSource:
    """One party's secret randomness: ChaCha20 keyed from OS entropy, or (tests only) a seed."""

    def __init__(self, seed: int | None = None) -> None:
        self.seeded = seed is not None
        if seed is None:
            bits = ChaCha(key=secrets.randbits(KEY_BITS), rounds=ROUNDS)
        else:
            # A test's seed goes through numpy's SeedSequence to a full key: reproducible, and
            # never to be used for a release anyone else must not reproduce.
            bits = ChaCha(seed=seed, rounds=ROUNDS)
        self.generator = np.random.Generator(bits)

    def normal(self, std: float, shape: Sequence[int]) -> torch.Tensor:
        """A float32 tensor of N(0, std^2) draws (DP-SGD's noise: the same dtype as Opacus')."""
        draws = self.generator.standard_normal(tuple(shape), dtype=np.float32)
        return torch.from_numpy(draws).mul_(std)

    def bernoulli(self, n: int, rate: float) -> np.ndarray:
        """The indices of n independent Bernoulli(rate) trials that came up: a Poisson sample."""
        return np.nonzero(self.generator.random(n) < rate)[0]

    def state(self) -> dict[str, Any]:
        """The generator's position as JSON values, to continue seeded test noise in a fresh
        process. Private noise is never written down."""
        if not self.seeded:
            raise PrivacyError("private noise is never written down: only seeded test noise has a state")
        inner = self.generator.bit_generator.state["state"]
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in inner.items()}

    def restore(self, state: Mapping[str, Any]) -> None:
        if not self.seeded:
            raise PrivacyError("private noise is never restored: a restored client draws a fresh key")
        inner = {k: np.asarray(state[k], dtype=_STATE_DTYPES[k]) for k in _STATE_DTYPES}
        bits = self.generator.bit_generator
        bits.state = {"bit_generator": bits.state["bit_generator"], "state": {**inner, "rounds": ROUNDS}}


_STATE_DTYPES = {"block": np.uint32, "keysetup": np.uint32, "ctr": np.uint64}
