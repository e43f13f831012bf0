"""The one path by which a decrypted value leaves a client (an exported model, say).

CKKS decryptions carry noise that depends on the secret key: Li and Micciancio (EUROCRYPT 2021)
recover the key from exact decryptions. Rounding to a grid far coarser than that noise removes
it from what is shared, except for the rare values within the noise of a grid midpoint; the
grid's step comes from the parameters' error bound (`CkksParameters.release_grid`).
"""

from __future__ import annotations

import numpy as np

from securegmi.errors import CryptoError


def release_decrypted(values: np.ndarray, precision: float) -> np.ndarray:
    """Round decrypted values to multiples of `precision` (the parameters' release grid)."""
    if precision <= 0:
        raise CryptoError("release precision must be positive")
    rounded: np.ndarray = np.round(np.asarray(values, dtype=np.float64) / precision) * precision
    return rounded
