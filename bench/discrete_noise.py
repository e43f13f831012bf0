"""Masked integer aggregation and discrete split noise, against today's continuous split noise.

1. Masking parameters by cohort size: the word bits b CKKS carries exactly (crypto.masking), the
   scale, the admitted worst-case error bound, and, measured on a real full cohort through
   TenSEAL, the largest |decrypted - integer| and the envelope bytes per value.
2. Accuracy at equal epsilon: the discrete Gaussian shares (privacy.discrete_noise, deterministic
   rounding at 2^-f in the sensitivity) against continuous Gaussian shares, both accounted by
   RDP on the same orders and conversion, for the default statistics phase's release shapes:
   the RMS error of the aggregate (noise, plus rounding for the discrete one) and its ratio, and
   the bits the sum needs (values, noise headroom at a 1e-9 wrap probability).
3. The exact sampler's speed (microseconds per value, one core).

    python bench/discrete_noise.py      # writes bench/results/discrete_noise.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from securegmi.crypto.aggregation import add_updates, max_envelope_bytes
from securegmi.crypto.envelope import decrypt, encrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.masking import (
    CHECK_WORDS,
    ExpectedCohort,
    FixedPoint,
    MaskContext,
    MaskingKey,
    MaskingParameters,
    MaskRegistry,
    masked_upload,
    unmask_sum,
)
from securegmi.privacy.accounting import RDP_ORDERS
from securegmi.privacy.discrete_noise import (
    IntegerSensitivity,
    discrete_gaussian,
    epsilon_ddg,
    sigma_for_epsilon,
    sigma_squared_of,
    wrap_headroom,
)
from securegmi.privacy.noise import NoiseSource

RESULTS = Path(__file__).parent / "results" / "discrete_noise.json"
DELTA = 1e-5


def masking_rows(cohorts: list[int], length: int) -> list[dict[str, float]]:
    rows = []
    for clients in cohorts:
        params = MaskingParameters.for_cohort(clients)
        keys = SecretContext.generate(params.ckks)
        cohort = [MaskingKey.generate(f"c{i}", "bench") for i in range(clients)]
        registry = MaskRegistry.of(cohort)
        context = MaskContext("bench", 0, "moments")
        encoding = FixedPoint(params.word_bits, 8, 1.0, clients)
        rng = np.random.default_rng(0)
        values = rng.uniform(-1, 1, (clients, length))
        start = time.perf_counter()
        expected = ExpectedCohort.of(registry, clients)
        masks = [k.mask(registry, context, length + CHECK_WORDS, params.word_bits, expected) for k in cohort]
        mask_seconds = (time.perf_counter() - start) / clients
        start = time.perf_counter()
        uploads = {
            k.client_id: encrypt(keys, masked_upload(encoding.encode(x), m, params.word_bits))
            for k, x, m in zip(cohort, values, masks, strict=True)
        }
        encrypt_seconds = (time.perf_counter() - start) / clients
        server = keys.public()
        n = length + CHECK_WORDS
        total = add_updates(server, uploads, n, max_envelope_bytes(server, n))
        assert total.data is not None
        decrypted = decrypt(keys, total.data)
        words = unmask_sum(decrypted, params, expected)
        exact = sum(encoding.quantise(x) for x in values)
        assert np.array_equal(encoding.signed(words), exact)
        rows.append(
            {
                "clients": clients,
                "word_bits": params.word_bits,
                "scale_bits": params.ckks.scale_bits,
                "error_bound": params.error_bound(),
                "measured_max_error": float(np.max(np.abs(decrypted - np.rint(decrypted)))),
                "bytes_per_value": len(next(iter(uploads.values()))) / length,
                "mask_seconds_per_client_per_100k": mask_seconds * 100_000 / length,
                "encrypt_seconds_per_client_per_100k": encrypt_seconds * 100_000 / length,
            }
        )
    return rows


def continuous_epsilon(noise_multiplier: float, rounds: int) -> float:
    rdp = [rounds * a / (2 * noise_multiplier**2) for a in RDP_ORDERS]
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(list(RDP_ORDERS), rdp, DELTA)
    return float(epsilon)


def accuracy_rows(min_clients: int, cohort: int) -> list[dict[str, float]]:
    """Releases shaped like the default statistics phase (clip 1): the moments (one round), the
    cluster sums (4 rounds, 20 clusters x 11), at the calibrated noise multipliers of
    `securegmi.calibrate_statistics(PrivacyBudget(8, 1e-5), clients=10, features=64)`, and a
    large release (a gradient-sized vector) for the rounding term's growth with d."""
    releases = [("moments", 66, 1, 1.31), ("clusters", 220, 4, 1.95), ("gradient-sized", 100_000, 1, 1.0)]
    shares = min_clients - 1  # what the server plus one client does not know
    rows = []
    for name, d, rounds, z in releases:
        target = continuous_epsilon(z, rounds)  # the continuous split figure, per honest set
        # Continuous shares: each sigma z / sqrt(min_clients - 1); the cohort's sum carries
        # cohort / (min_clients - 1) z^2 of variance per coordinate.
        continuous_rms = z * math.sqrt(cohort / shares)
        for frac_bits in (4, 6, 8, 10, 12):
            sensitivity = IntegerSensitivity.of_clipped(1.0, d, frac_bits)
            sigma_share = sigma_for_epsilon(sensitivity, target, shares, rounds, DELTA)
            step = 2.0**-frac_bits
            noise_var = cohort * (sigma_share * step) ** 2
            rounding_var = cohort * step**2 / 12  # each client's rounding error, uniform in a step
            discrete_rms = math.sqrt(noise_var + rounding_var)
            headroom = wrap_headroom(sigma_share, cohort, d, 1e-9)
            # A sum of `cohort` clipped sums of records: its real range is the clients' value
            # bound, which a release declares; noise headroom in integer units is what is added.
            rows.append(
                {
                    "release": name,
                    "dimension": d,
                    "rounds": rounds,
                    "epsilon": target,
                    "epsilon_discrete": epsilon_ddg(sensitivity, sigma_share, shares, rounds, DELTA),
                    "frac_bits": frac_bits,
                    "sensitivity_inflation": sensitivity.l2 / 2.0**frac_bits,
                    "continuous_rms": continuous_rms,
                    "discrete_rms": discrete_rms,
                    "rms_ratio": discrete_rms / continuous_rms,
                    "noise_headroom_bits": math.log2(headroom) + 1,
                }
            )
    return rows


def sampler_speed(sigma: float, size: int) -> float:
    source = NoiseSource()
    start = time.perf_counter()
    discrete_gaussian(source, sigma_squared_of(sigma), size)
    return (time.perf_counter() - start) / size * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = {
        "masking": masking_rows([5, 20, 100], args.length),
        "accuracy_at_equal_epsilon": {
            "note": (
                "illustrative: min_clients 5 (the coalition of the server and one client faces "
                "4 shares), a cohort of 20 summed; epsilon per release by RDP, same orders"
            ),
            "rows": accuracy_rows(min_clients=5, cohort=20),
        },
        "sampler_us_per_value": {str(s): sampler_speed(s, 20_000) for s in (10.0, 1000.0, 1e5)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
