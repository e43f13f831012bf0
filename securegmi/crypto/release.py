"""The one path by which a decrypted value leaves a client (an exported model, say).

CKKS decryptions carry noise that depends on the secret key: Li and Micciancio (EUROCRYPT 2021)
recover the key from exact decryptions. Rounding to a grid far coarser than that noise removes
it from what is shared.
"""

from __future__ import annotations

import numpy as np

from securegmi.errors import CryptoError

# The grid of every decrypted value a client uses or exports: far above CKKS error (about 1e-9
# at the shipped parameters, bench/he_cost.py) and far below what matters for a model.
RELEASE_PRECISION = 1e-6


def release_decrypted(values: np.ndarray, precision: float) -> np.ndarray:
    """Round decrypted values to multiples of `precision` (which must exceed the CKKS error)."""
    if precision <= 0:
        raise CryptoError("release precision must be positive")
    rounded: np.ndarray = np.round(np.asarray(values, dtype=np.float64) / precision) * precision
    return rounded
