"""The distributed discrete Gaussian: exact sampling from secret bits, and its account checked
against independent computations (the summed pmf's own Renyi and hockey-stick divergences, and
dp-accounting's discrete-Gaussian PLD), each check with a negative control."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special, stats

from securegmi.errors import PrivacyError
from securegmi.privacy import noise as noise_module
from securegmi.privacy.accounting import RDP_ORDERS
from securegmi.privacy.discrete_noise import (
    IntegerSensitivity,
    SecureIntegers,
    ddg_rdp,
    ddg_tau,
    discrete_gaussian,
    epsilon_ddg,
    sigma_for_epsilon,
    sigma_squared_of,
    wrap_headroom,
)
from securegmi.privacy.noise import NoiseSource

from .test_noise import truncation_survives


def _pmf(sigma_squared: float, half_width: int) -> np.ndarray:
    k = np.arange(-half_width, half_width + 1, dtype=np.float64)
    weights = np.exp(-(k**2) / (2 * sigma_squared))
    return weights / weights.sum()


def _gof_pvalue(samples: np.ndarray, sigma_squared: float) -> float:
    """Chi-square goodness of fit of integer samples against N_Z(0, sigma^2), tails pooled."""
    width = int(6 * math.sqrt(sigma_squared)) + 1
    pmf = _pmf(sigma_squared, 60 * width)
    centre = pmf.size // 2
    inner = pmf[centre - width : centre + width + 1]
    expected = np.concatenate([inner, [1 - inner.sum()]]) * samples.size
    clipped = np.where(np.abs(samples) <= width, samples + width, 2 * width + 1)
    observed = np.bincount(clipped, minlength=2 * width + 2)
    keep = expected > 5
    observed = np.concatenate([observed[keep], [observed[~keep].sum()]])
    expected = np.concatenate([expected[keep], [expected[~keep].sum()]])
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("sigma_squared", [Fraction(1), Fraction(7, 3)])
def test_the_sampler_draws_the_discrete_gaussian_pmf(sigma_squared):
    samples = discrete_gaussian(NoiseSource(seed=11), sigma_squared, 40_000)
    assert _gof_pvalue(samples, float(sigma_squared)) > 1e-4


def test_negative_control_a_rounded_continuous_gaussian_fails_the_same_fit():
    rounded = np.rint(np.random.default_rng(3).normal(0.0, 1.0, 40_000)).astype(np.int64)
    assert _gof_pvalue(rounded, 1.0) < 1e-6


def test_discrete_noise_depends_on_every_bit_of_a_256_bit_key(monkeypatch):
    def draws(key: int) -> np.ndarray:
        monkeypatch.setattr(noise_module.secrets, "randbits", lambda bits: key & ((1 << bits) - 1))
        return discrete_gaussian(NoiseSource(), Fraction(10_000), 16)

    for bits in (32, 64, 128, 255):
        assert not truncation_survives(draws, bits)

    def torch_draws(seed: int) -> np.ndarray:  # negative control: integer noise from torch
        generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
        return torch.round(100 * torch.randn(16, generator=generator)).numpy()

    assert truncation_survives(torch_draws, 32)
    with pytest.raises(PrivacyError, match="NoiseSource"):
        SecureIntegers(np.random.default_rng(0))  # type: ignore[arg-type]


def test_uniform_integers_are_exact_beyond_one_word():
    rng = SecureIntegers(NoiseSource(seed=5))
    draws = np.array([rng.below(3) for _ in range(30_000)])
    assert stats.chisquare(np.bincount(draws)).pvalue > 1e-4
    big = 3 * 2**70
    assert all(0 <= rng.below(big) < big for _ in range(200))
    assert max(rng.below(big) for _ in range(200)) > 2**70  # the high word is used


def _summed_pmf(sigma: float, shares: int, half_width: int) -> np.ndarray:
    one = _pmf(sigma**2, half_width)
    total = one
    for _ in range(shares - 1):
        total = np.convolve(total, one)
    return total


def _log_summed_pmf(sigma: float, shares: int, half_width: int) -> np.ndarray:
    """log pmf of a sum of `shares` N_Z(0, sigma^2) on [-shares w, shares w], in the log domain
    (the tails that Renyi divergences of high order weigh underflow a float pmf)."""
    k = np.arange(-half_width, half_width + 1, dtype=np.float64)
    one = -(k**2) / (2 * sigma**2)
    one -= special.logsumexp(one)
    total = one
    for _ in range(shares - 1):
        out = np.full(total.size + one.size - 1, -np.inf)
        for j, value in enumerate(one):
            out[j : j + total.size] = np.logaddexp(out[j : j + total.size], total + value)
        total = out
    return total


def _renyi(log_p: np.ndarray, shift: int, alpha: float) -> float:
    """D_alpha(P || P shifted by `shift`), over the support of both."""
    lp, lq = log_p[shift:], log_p[:-shift]
    return float(special.logsumexp(alpha * lp + (1 - alpha) * lq) / (alpha - 1))


CASES = [(0.8, 3, 1), (0.8, 1, 2), (2.0, 4, 3), (5.0, 2, 7), (10.0, 3, 12)]


@pytest.mark.parametrize(("sigma", "shares", "shift"), CASES)
def test_the_renyi_bound_holds_against_the_summed_pmfs_own_divergence(sigma, shares, shift):
    """Kairouz et al.'s bound (with its tau term) against a direct computation on the exact pmf
    of a sum of `shares` discrete Gaussians. Negative control: a bound that counts one share too
    many (a coalition that forgets it knows one) falls below the truth."""
    sensitivity = IntegerSensitivity(shift, shift, 1)
    orders = (2, 3, 4, 6, 8, 12, 16)
    log_p = _log_summed_pmf(sigma, shares, int(12 * sigma + 20 * shift) + 10)
    numeric = [_renyi(log_p, shift, a) for a in orders]
    bound = [ddg_rdp(a, sensitivity, sigma, shares) for a in orders]
    assert all(n <= b * (1 + 1e-9) + 1e-12 for n, b in zip(numeric, bound, strict=True))
    wrong = [ddg_rdp(a, sensitivity, sigma, shares + 1) for a in orders]
    assert any(n > w for n, w in zip(numeric, wrong, strict=True))


def _rdp_with_unscaled_tau(alpha: float, l2: float, l1: float, sigma: float, shares: int) -> float:
    """The broken variant of Kairouz et al.'s Prop. 14: the tau terms as if d were 1."""
    tau, n_s2 = ddg_tau(sigma, shares), shares * sigma**2
    return min(
        alpha * l2**2 / (2 * n_s2) + tau,
        alpha / 2 * (l2**2 / n_s2 + 2 * l1 * tau / math.sqrt(n_s2) + tau**2),
        alpha / 2 * (l2 / math.sqrt(n_s2) + tau) ** 2,
    )


def _d_dimensional(sigma: float, shares: int, dimension: int, orders: tuple[int, ...]):
    """A shift of one step in every one of d independent coordinates (D2 = sqrt(d), D1 = d):
    the product's divergence is d times the 1-d divergence of the exact summed pmf."""
    sensitivity = IntegerSensitivity(math.sqrt(dimension), dimension, dimension)
    log_p = _log_summed_pmf(sigma, shares, int(12 * sigma) + 30)
    return sensitivity, [dimension * _renyi(log_p, 1, a) for a in orders]


@pytest.mark.parametrize(
    ("sigma", "shares", "dimension"), [(0.5, 2, 16), (0.5, 3, 16), (0.6, 2, 64), (0.8, 4, 100), (1.0, 2, 256)]
)
def test_the_renyi_bound_holds_in_d_dimensions(sigma, shares, dimension):
    orders = (2, 3, 4, 6, 8)
    sensitivity, truth = _d_dimensional(sigma, shares, dimension, orders)
    bound = [ddg_rdp(a, sensitivity, sigma, shares) for a in orders]
    assert all(t <= b * (1 + 1e-9) for t, b in zip(truth, bound, strict=True))


@pytest.mark.parametrize(("sigma", "shares", "dimension"), [(0.5, 2, 16), (0.5, 3, 16)])
def test_negative_control_tau_not_scaled_by_d_falls_below_the_truth(sigma, shares, dimension):
    """Where tau is not negligible (small sigma), the tau terms taken as if d were 1 understate
    the d-dimensional divergence: the test above would catch that variant."""
    orders = (2, 3, 4, 6, 8)
    sensitivity, truth = _d_dimensional(sigma, shares, dimension, orders)
    unscaled = [_rdp_with_unscaled_tau(a, sensitivity.l2, sensitivity.l1, sigma, shares) for a in orders]
    assert any(t > u for t, u in zip(truth, unscaled, strict=True))
    assert truth[2] > unscaled[2]  # alpha = 4


def _hockey_stick_epsilon(p: np.ndarray, shift: int, delta: float) -> float:
    """The smallest epsilon with sum max(0, P - e^eps Q) <= delta, Q = P shifted (symmetric)."""
    q = np.roll(p, shift)
    q[:shift] = 0.0

    def excess(eps: float) -> float:
        return float(np.sum(np.maximum(0.0, p - math.exp(eps) * q)))

    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if excess(mid) <= delta else (mid, high)
    return high


@pytest.mark.parametrize(("sigma", "shares", "shift"), [(2.0, 4, 3), (5.0, 2, 7), (30.0, 5, 40)])
def test_epsilon_is_above_the_summed_pmfs_exact_epsilon(sigma, shares, shift):
    delta = 1e-5
    p = _summed_pmf(sigma, shares, int(20 * sigma * math.sqrt(shares) + 20 * shift) + 10)
    exact = _hockey_stick_epsilon(p, shift, delta)
    ours = epsilon_ddg(IntegerSensitivity(shift, shift, 1), sigma, shares, 1, delta)
    assert exact <= ours <= 1.2 * exact  # RDP's conversion: ~9% above the exact figure here
    # Negative control: crediting the colluders' shares as well (twice the shares) understates.
    assert epsilon_ddg(IntegerSensitivity(shift, shift, 1), sigma, 2 * shares, 1, delta) < exact


@pytest.mark.parametrize(("sigma", "shift", "rounds"), [(3.0, 1, 1), (20.0, 5, 10), (200.0, 100, 50)])
def test_one_share_matches_dp_accountings_discrete_gaussian_pld(sigma, shift, rounds):
    delta = 1e-5
    pld = privacy_loss_distribution.from_discrete_gaussian_mechanism(sigma, sensitivity=shift)
    reference = pld.self_compose(rounds).get_epsilon_for_delta(delta)
    ours = epsilon_ddg(IntegerSensitivity(shift, shift, 1), sigma, 1, rounds, delta)
    assert reference <= ours <= 1.2 * reference
    assert epsilon_ddg(IntegerSensitivity(shift, shift, 1), sigma, 2, rounds, delta) < reference


def test_rounding_to_the_grid_is_in_the_sensitivity():
    """A neighbour at distance exactly `clip` whose every coordinate rounds the far way moves the
    integer vector by more than clip 2^f: the integer L2 sensitivity needs the rounding term,
    and has it."""
    d, f, clip = 400, 8, 1.0
    a = np.full(d, 0.5 + 1e-6) / 2**f  # rounds up
    b = a - clip / math.sqrt(d)  # 12.8 grid steps lower per coordinate: rounds 13 steps lower
    assert np.linalg.norm(a - b) == pytest.approx(clip)
    moved = float(np.linalg.norm(np.rint(a * 2**f) - np.rint(b * 2**f)))
    sensitivity = IntegerSensitivity.of_clipped(clip, d, f)
    assert moved <= sensitivity.l2
    assert moved > clip * 2**f  # the naive bound (no rounding term) is broken here
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(0, 3, d)
        step = rng.normal(0, 1, d)
        y = x + step / np.linalg.norm(step) * clip * rng.uniform()
        diff = np.rint(x * 2**f) - np.rint(y * 2**f)
        assert np.linalg.norm(diff) <= sensitivity.l2 and np.abs(diff).sum() <= sensitivity.l1


def test_shares_sized_as_split_noise_give_the_whole_noises_epsilon_to_a_one_client_coalition():
    """Any min_clients - 1 shares of sigma / sqrt(min_clients - 1) carry sigma: the server with
    one client faces the remaining shares, and gets the figure of one curator's noise."""
    sensitivity = IntegerSensitivity.of_clipped(1.0, 1000, 10)
    sigma_total, min_clients, rounds, delta = 4 * sensitivity.l2, 5, 20, 1e-5
    share = sigma_total / math.sqrt(min_clients - 1)
    coalition = epsilon_ddg(sensitivity, share, min_clients - 1, rounds, delta)
    central = epsilon_ddg(sensitivity, sigma_total, 1, rounds, delta)
    assert coalition == pytest.approx(central, rel=1e-6)
    # The continuous Gaussian at the same sigma and the real (unrounded) sensitivity, by the
    # same RDP orders and conversion: the discrete figure is the price of the grid only.
    z = sigma_total / (2**10 * 1.0)
    rdp = [rounds * a / (2 * z**2) for a in RDP_ORDERS]
    continuous, _ = rdp_privacy_accountant.compute_epsilon(list(RDP_ORDERS), rdp, delta)
    assert continuous < central < 1.1 * continuous
    # One share alone (a client that saw the others' shares) is the old coalition's exposure.
    assert epsilon_ddg(sensitivity, share, 1, rounds, delta) > 1.9 * central


def test_sigma_for_epsilon_inverts_the_account():
    sensitivity = IntegerSensitivity.of_clipped(1.0, 64, 12)
    sigma = sigma_for_epsilon(sensitivity, 2.0, 4, 10, 1e-5)
    assert epsilon_ddg(sensitivity, sigma, 4, 10, 1e-5) <= 2.0
    assert epsilon_ddg(sensitivity, sigma / 1.002, 4, 10, 1e-5) > 2.0


def _awkward_sigmas() -> list[float]:
    """Square roots of integers and of grid multiples, and their neighbouring floats: where
    sigma * sigma in floating point lands on (or just below) a multiple of 2^-20."""
    out = [0.5, 1.0, 1e-3, 1e6, 0.1, 1 / 3, math.pi]
    for k in range(1, 3000):
        for root in (math.sqrt(k), math.sqrt(k / 1024), math.sqrt(k / 2**20)):
            out += [root, math.nextafter(root, math.inf), math.nextafter(root, 0.0)]
    return out


def test_sigma_squared_is_never_below_sigma_squared_exactly():
    """The sampled variance must be at least the one the account used: compared as exact
    rationals (Fraction(s) is the float exactly). Negative control: the float product rounded
    down to the grid falls below, on the same grid; the float product ceiled (the previous
    code) falls below too, where its rounding lands on a grid point."""
    sigmas = _awkward_sigmas()
    assert all(sigma_squared_of(s) >= Fraction(s) ** 2 for s in sigmas)
    assert all(sigma_squared_of(s) >= s * s for s in sigmas)
    denominator = 2**20
    floored = [Fraction(math.floor(s * s * denominator), denominator) for s in sigmas]
    assert any(f < Fraction(s) ** 2 for f, s in zip(floored, sigmas, strict=True))
    ceiled_float = [Fraction(math.ceil(s * s * denominator), denominator) for s in sigmas]
    assert any(c < Fraction(s) ** 2 for c, s in zip(ceiled_float, sigmas, strict=True))
    assert sigma_squared_of(4.123105625617661) >= Fraction(4.123105625617661) ** 2  # sqrt(17)


def test_wrap_headroom_bounds_the_summed_noise():
    sigma, shares, d = 50.0, 4, 2000
    headroom = wrap_headroom(sigma, shares, d, 1e-6)
    source = NoiseSource(seed=2)
    total = sum(discrete_gaussian(source, sigma_squared_of(sigma), d) for _ in range(shares))
    assert np.max(np.abs(total)) < headroom
    # Negative control: two standard deviations is no headroom for 2,000 coordinates.
    assert np.max(np.abs(total)) > 2 * sigma * math.sqrt(shares)
