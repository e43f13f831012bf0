"""CKKS parameters, validated on construction against security and numerical headroom."""

from __future__ import annotations

import math
from dataclasses import dataclass

from securegmi.errors import CryptoError

# HomomorphicEncryption.org security standard (Albrecht et al. 2018), Table 1, classical 128-bit
# security, ternary secret: the largest total coefficient modulus (bits) for each ring degree N.
MAX_MODULUS_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParameters:
    """A CKKS parameter set for an additions-only circuit.

    The last prime of `coeff_mod_bit_sizes` is SEAL's special (key-switching) prime; values are
    encrypted modulo the others. `value_bound` bounds |x| of one client's plaintext and
    `max_clients` the number of ciphertexts summed: their sum, times the scale, must stay below
    the data modulus, or it wraps silently into garbage.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 40
    value_bound: float = 2.0**12
    max_clients: int = 100

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS_128:
            raise CryptoError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS_128)}, got {n}")
        total = sum(self.coeff_mod_bit_sizes)
        if total > MAX_MODULUS_BITS_128[n]:
            raise CryptoError(
                f"a {total}-bit coefficient modulus with N={n} is below 128-bit security (at most "
                f"{MAX_MODULUS_BITS_128[n]} bits, HomomorphicEncryption.org standard); use fewer or "
                "smaller primes, or a larger N"
            )
        if len(self.coeff_mod_bit_sizes) < 2 or any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise CryptoError("need a data prime and a special prime, each of 20 to 60 bits")
        if self.value_bound <= 0 or self.max_clients < 1:
            raise CryptoError("value_bound must be positive and max_clients at least 1")
        needed = self.scale_bits + math.log2(self.value_bound * self.max_clients) + 1  # +1: sign
        if needed > self.data_modulus_bits:
            raise CryptoError(
                f"no headroom: the sum of {self.max_clients} values of magnitude {self.value_bound:g} at "
                f"scale 2^{self.scale_bits} needs {needed:.1f} bits, the data modulus has "
                f"{self.data_modulus_bits}; lower the scale or the bound, or add modulus bits"
            )
        if self.scale_bits > self.coeff_mod_bit_sizes[-1]:
            raise CryptoError("the scale must not exceed the special prime's bits (SEAL encodes at it)")

    @classmethod
    def for_cohort(cls, clients: int) -> CkksParameters:
        """The smallest set this package ships whose data modulus holds the sum of `clients`
        values at the bound: N=4096 with one 60-bit data prime up to 128 clients, beyond that
        N=8192 with 60 + 40 data bits (160 of the 218 bits 128-bit security allows), which
        doubles the bytes per value."""
        try:
            return cls(max_clients=clients)
        except CryptoError:
            return cls(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), max_clients=clients)

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def data_primes(self) -> int:
        """SEAL's coeff_modulus_size of a fresh ciphertext: the primes without the special one."""
        return len(self.coeff_mod_bit_sizes) - 1

    def release_grid(self) -> float:
        """The step of the grid every decrypted value is rounded to before a client uses or
        exports it (crypto.release; Li & Micciancio, EUROCRYPT 2021).

        A sum of fresh encryptions decrypts to the plaintext sum plus an error e, |e| <=
        `precision()` (for additions e does not grow with the values, only with the count).
        Rounding to a grid of step g returns exactly the rounded plaintext unless the plaintext
        lies within |e| of a midpoint between grid points: at most a 2|e|/g share of values, the
        only ones whose release still depends on the key's noise. g = the smallest power of ten
        >= 100 x precision() bounds that share by 2% at the worst-case bound and by about 2e-5
        at the error measured at the shipped parameters (~1e-9, bench/he_cost.py); a power of
        ten keeps released values readable. 1e-4 at the shipped parameters."""
        return float(10.0 ** math.ceil(math.log10(100 * self.precision())))

    def precision(self) -> float:
        """A conservative absolute error bound of a decrypted sum of `max_clients` fresh
        encryptions: CKKS encoding and encryption noise grow with sqrt(N) per ciphertext and add
        up across summands, relative to the scale."""
        return float(self.max_clients * 64.0 * math.sqrt(self.poly_modulus_degree) / self.scale)
