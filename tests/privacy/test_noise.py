"""Law 2 of docs/design.md §2: DP noise and Poisson sampling come from >= 128 bits of secret state
seeded from OS entropy, through a cryptographically secure generator, never from torch's
generator (which keeps 32 bits of any seed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from securegmi.errors import PrivacyError
from securegmi.privacy import noise as noise_module
from securegmi.privacy.noise import KEY_BITS, NoiseSource

Draws = Callable[[int], np.ndarray]  # secret seed -> the first noise draws it gives


SECRET = (1 << 255) | (0xA5 << 200) | 0x1234_5678


def truncation_survives(draws: Draws, bits: int, secret: int = SECRET) -> bool:
    """True if a secret that agrees with `secret` only in its low `bits` bits draws the same
    noise: the state an adversary must search is then at most `bits` bits."""
    return bool(np.array_equal(draws(secret), draws(secret & ((1 << bits) - 1))))


def _private_source_with_key(monkeypatch: pytest.MonkeyPatch, key: int) -> NoiseSource:
    monkeypatch.setattr(noise_module.secrets, "randbits", lambda bits: key & ((1 << bits) - 1))
    return NoiseSource()


def test_private_noise_depends_on_every_bit_of_a_256_bit_key(monkeypatch):
    def draws(key: int) -> np.ndarray:
        return _private_source_with_key(monkeypatch, key).normal(1.0, (16,)).numpy()

    for bits in (32, 63, 64, 128, 255):
        assert not truncation_survives(draws, bits), f"a key cut to its low {bits} bits draws the same noise"


def test_negative_control_torch_generators_keep_32_bits():
    def draws(seed: int) -> np.ndarray:
        return torch.randn(16, generator=torch.Generator().manual_seed(seed & ((1 << 63) - 1))).numpy()

    assert truncation_survives(draws, 32)  # the generator the noise used to come from


def test_the_key_is_drawn_from_os_entropy_with_at_least_128_bits(monkeypatch):
    asked: list[int] = []
    real = noise_module.secrets.randbits

    def recorded(bits: int) -> int:
        asked.append(bits)
        return real(bits)

    monkeypatch.setattr(noise_module.secrets, "randbits", recorded)
    a, b = NoiseSource(), NoiseSource()
    assert asked == [KEY_BITS, KEY_BITS] and KEY_BITS >= 128
    assert not np.array_equal(a.normal(1.0, (8,)), b.normal(1.0, (8,)))
    assert a.generator.bit_generator.state["bit_generator"].endswith("ChaCha")
    assert a.generator.bit_generator.state["state"]["rounds"] == 20


def test_poisson_samples_come_from_the_secret_source(monkeypatch):
    first = _private_source_with_key(monkeypatch, 1 << 200).bernoulli(10_000, 0.5)
    other = _private_source_with_key(monkeypatch, (1 << 200) | 1).bernoulli(10_000, 0.5)
    assert not np.array_equal(first, other)
    assert 4_500 < len(first) < 5_500  # Bernoulli(0.5) over 10,000 records


def test_only_seeded_test_noise_has_a_state_to_write_down():
    seeded = NoiseSource(7)
    seeded.normal(1.0, (3,))
    state = seeded.state()
    again = NoiseSource(7)
    again.restore(state)
    np.testing.assert_array_equal(seeded.normal(1.0, (5,)), again.normal(1.0, (5,)))
    with pytest.raises(PrivacyError, match="never written down"):
        NoiseSource().state()
    with pytest.raises(PrivacyError, match="never restored"):
        NoiseSource().restore(state)
