"""Discrete split noise with an honest account: the distributed discrete Gaussian (Kairouz, Liu
and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021).

Under pairwise masks (crypto.masking) the clients' uploads are integers modulo 2^b, so the split
noise must be integer too, and the sum of the shares must have a known privacy analysis. Each
client adds N_Z(0, sigma^2)^d, the discrete Gaussian (Canonne, Kamath and Steinke, "The Discrete
Gaussian for Differential Privacy", NeurIPS 2020), to its fixed-point integers. A sum of h such
shares is not itself a discrete Gaussian, but it is within a tiny, computable distance of one:
Kairouz et al., Prop. 14, bound its Renyi divergence (`ddg_rdp`), and `epsilon_ddg` composes that
over rounds and converts it to (epsilon, delta) with dp-accounting's RDP conversion.

Against the server and any c colluding clients, what protects an honest client's record is the
shares the coalition does not know: h = (cohort - c) shares. With the masks, the server alone
sees only ciphertexts and any one client only the sum; the shares are sized as today's split
noise (`privacy.calibration.split_share`): any min_clients - 1 of them carry the whole noise.

Sampling is exact: CKS's algorithms (Bernoulli(exp(-gamma)), discrete Laplace, then rejection)
use only uniform integers and rational arithmetic, no floating point, so the pmf drawn is the
pmf analysed. The uniform integers come from the client's `NoiseSource` (ChaCha20 keyed with 256
bits of OS entropy), read as raw 64-bit words with rejection: never torch's generator, never
numpy's floating-point samplers.

Rounding to the integer grid is deterministic (round(x 2^f)), and its effect is in the
sensitivity (`IntegerSensitivity.of_clipped`): a neighbour moves the real vector by at most C in
L2, each coordinate's rounding by less than one step more, so the integer vector moves by less
than C 2^f + sqrt(d) in L2. Kairouz et al.'s randomised conditional rounding gives a smaller
term (about sqrt(d)/2 with high probability) but adds a failure probability to delta and a
second secret draw per value; at the grids used here (C 2^f >> sqrt(d)) the deterministic
bound costs a few per cent of noise and needs no extra randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from securegmi.errors import PrivacyError
from securegmi.privacy.accounting import RDP_ORDERS
from securegmi.privacy.noise import NoiseSource

_WORD = 1 << 64
_BUFFER = 4096


class SecureIntegers:
    """Uniform integers below any bound from a NoiseSource's raw ChaCha20 words, exactly (by
    rejection: no modulo bias)."""

    def __init__(self, source: NoiseSource) -> None:
        if not isinstance(source, NoiseSource):
            raise PrivacyError("discrete noise is drawn from a NoiseSource (ChaCha20 on OS entropy) only")
        self._bits = source.generator.bit_generator
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            self._words = self._bits.random_raw(_BUFFER).tolist()
        return self._words.pop()

    def below(self, n: int) -> int:
        """Uniform on {0, ..., n - 1}."""
        if n < 1:
            raise PrivacyError("a uniform integer needs a positive bound")
        words = max(1, -(-n.bit_length() // 64))
        span = _WORD**words
        limit = span - span % n  # accept below the largest multiple of n: exactly uniform
        while True:
            value = 0
            for _ in range(words):
                value = (value << 64) | self._word()
            if value < limit:
                return value % n


def _bernoulli_exp(rng: SecureIntegers, num: int, den: int) -> bool:
    """True with probability exp(-num/den), num >= 0, den >= 1 (CKS 2020, Algorithm 1). Integer
    pairs, not Fractions: the sampler's cost is in these loops (Fraction arithmetic was ~3x
    slower)."""
    while num > den:  # exp(-gamma) = exp(-1)^floor(gamma) exp(-(gamma - floor(gamma)))
        if not _bernoulli_exp(rng, 1, 1):
            return False
        num -= den
    k = 1
    while rng.below(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _discrete_laplace(rng: SecureIntegers, t: int) -> int:
    """P(y) proportional to exp(-|y| / t), integer t >= 1 (CKS 2020, Algorithm 2)."""
    while True:
        u = rng.below(t)
        if not _bernoulli_exp(rng, u, t):
            continue
        v = 0
        while _bernoulli_exp(rng, 1, 1):
            v += 1
        y = u + t * v
        negative = rng.below(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def discrete_gaussian(source: NoiseSource | SecureIntegers, sigma_squared: Fraction, size: int) -> np.ndarray:
    """`size` independent draws of N_Z(0, sigma^2): P(y) proportional to exp(-y^2 / (2 sigma^2))
    on the integers (CKS 2020, Algorithm 3: discrete Laplace of scale t = floor(sigma) + 1, then
    accept with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)))."""
    rng = source if isinstance(source, SecureIntegers) else SecureIntegers(source)
    s2 = Fraction(sigma_squared)
    if s2 <= 0:
        raise PrivacyError("a discrete Gaussian needs a positive sigma^2")
    p, q = s2.numerator, s2.denominator
    t = math.isqrt(p // q) + 1  # floor(sqrt(p/q)) + 1
    # (|y| - p/(q t))^2 / (2 p/q) = (q t |y| - p)^2 / (2 p q t^2)
    den = 2 * p * q * t * t
    out = np.empty(size, dtype=np.int64)
    for i in range(size):
        while True:
            y = _discrete_laplace(rng, t)
            if _bernoulli_exp(rng, (q * t * abs(y) - p) ** 2, den):
                out[i] = y
                break
    return out


def sigma_squared_of(sigma: float, denominator: int = 2**20) -> Fraction:
    """A rational sigma^2 at least `sigma`^2 (never below: rounding up only adds noise)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise PrivacyError(f"sigma must be positive and finite, got {sigma!r}")
    # Exact rational arithmetic: the float product sigma * sigma can round below the true
    # square onto a multiple of 1/denominator, and the ceiling would then not lift it.
    return Fraction(math.ceil(Fraction(sigma) ** 2 * denominator), denominator)


@dataclass(frozen=True)
class IntegerSensitivity:
    """L2 and L1 sensitivity of a release on the integer grid, and its dimension."""

    l2: float
    l1: float
    dimension: int

    def __post_init__(self) -> None:
        if not (self.l2 > 0 and self.l1 >= self.l2 and self.dimension >= 1):
            raise PrivacyError("sensitivities are positive with l1 >= l2, the dimension at least 1")
        if self.l1 > math.sqrt(self.dimension) * self.l2 * (1 + 1e-12):
            raise PrivacyError("an L1 sensitivity above sqrt(d) times the L2 one is not a sensitivity")

    @classmethod
    def of_clipped(cls, clip: float, dimension: int, frac_bits: int) -> IntegerSensitivity:
        """A sum of records each of L2 norm <= `clip`, rounded to the grid 2^-frac_bits:
        ||round(a) - round(b)||_2 < ||a - b||_2 2^f + sqrt(d) (each coordinate's rounding errors
        differ by less than 1), and ||.||_1 < sqrt(d) C 2^f + d."""
        if not (clip > 0 and dimension >= 1 and frac_bits >= 0):
            raise PrivacyError("a clipping norm > 0, a dimension >= 1 and frac_bits >= 0")
        scaled = clip * 2.0**frac_bits
        root = math.sqrt(dimension)
        return cls(scaled + root, root * scaled + dimension, dimension)


def ddg_tau(sigma: float, shares: int) -> float:
    """Kairouz et al. 2021's tau: 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), the
    distance of a sum of n discrete Gaussians from one discrete Gaussian (0 for one share)."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, shares))


def ddg_rdp(alpha: float, sensitivity: IntegerSensitivity, sigma: float, shares: int) -> float:
    """Renyi divergence of order alpha between the sums of `shares` iid N_Z(0, sigma^2)^d noises
    shifted by neighbouring integer vectors (Kairouz, Liu & Steinke 2021, arXiv:2102.06387,
    Prop. 14; sigma >= 1/2), with n = shares, s = sigma, D2/D1 the L2/L1 sensitivities:

        min{ alpha D2^2 / (2 n s^2) + tau d,
             alpha/2 (D2^2 / (n s^2) + 2 D1 tau / (sqrt(n) s) + tau^2 d),
             alpha/2 (D2 / (sqrt(n) s) + tau sqrt(d))^2 }.
    """
    if sigma < 0.5 or shares < 1 or alpha < 1:
        raise PrivacyError("the distributed discrete Gaussian's bound needs sigma >= 1/2, shares, alpha >= 1")
    tau, d = ddg_tau(sigma, shares), sensitivity.dimension
    n_s2 = shares * sigma**2
    l2, l1 = sensitivity.l2, sensitivity.l1
    return min(
        alpha * l2**2 / (2 * n_s2) + tau * d,
        alpha / 2 * (l2**2 / n_s2 + 2 * l1 * tau / math.sqrt(n_s2) + tau**2 * d),
        alpha / 2 * (l2 / math.sqrt(n_s2) + tau * math.sqrt(d)) ** 2,
    )


def epsilon_ddg(
    sensitivity: IntegerSensitivity,
    sigma: float,
    shares: int,
    rounds: int,
    delta: float,
    orders: Sequence[float] = RDP_ORDERS,
) -> float:
    """Epsilon at `delta` of `rounds` releases, each the sum of `shares` discrete Gaussian shares
    of parameter `sigma` (integer units) on a query of integer `sensitivity`: RDP composes by
    addition over rounds, then dp-accounting converts it (the same conversion as the ledger's RDP
    cross-check)."""
    if rounds < 0:
        raise PrivacyError("rounds must be non-negative")
    if rounds == 0:
        return 0.0
    rdp = [rounds * ddg_rdp(a, sensitivity, sigma, shares) for a in orders]
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(list(orders), rdp, delta)
    return float(epsilon)


def sigma_for_epsilon(
    sensitivity: IntegerSensitivity, epsilon: float, shares: int, rounds: int, delta: float
) -> float:
    """The smallest per-share sigma (to 0.1%) whose `epsilon_ddg` is at most `epsilon`."""
    low, high = 0.5, max(1.0, sensitivity.l2)
    while epsilon_ddg(sensitivity, high, shares, rounds, delta) > epsilon:
        high *= 2
        if high > 1e15:
            raise PrivacyError(f"no sigma reaches epsilon {epsilon:g}")
    if epsilon_ddg(sensitivity, low, shares, rounds, delta) <= epsilon:
        return low
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        within = epsilon_ddg(sensitivity, mid, shares, rounds, delta) <= epsilon
        low, high = (low, mid) if within else (mid, high)
    return high


def wrap_headroom(sigma: float, shares: int, dimension: int, failure: float) -> int:
    """An integer T with P(some coordinate of the summed noise has |.| >= T) <= `failure`: the
    discrete Gaussian N_Z(0, s^2) is s^2-subgaussian (CKS 2020), a sum of n of them
    n s^2-subgaussian, so P(|Z_i| >= T) <= 2 exp(-T^2 / (2 n s^2)), union over d coordinates.
    What crypto.masking.FixedPoint reserves above the values' range (a wrap costs accuracy,
    never privacy: it is post-processing)."""
    if not 0 < failure < 1:
        raise PrivacyError("the failure probability is in (0, 1)")
    return math.ceil(math.sqrt(2 * shares * sigma**2 * math.log(2 * dimension / failure)))
