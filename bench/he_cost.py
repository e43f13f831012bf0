"""CKKS cost, side by side in one run.

1. Expansion on the wire: envelope bytes per byte of the float32 values they carry, for the
   shipped parameters and the common tutorial default (N=8192, [60,40,40,60], 2^40): seeded
   symmetric uploads packing two values per complex slot as securegmi sends them, and TenSEAL's
   high-level `ckks_vector` (unseeded, real slots only) as the baseline.
2. Encrypt / aggregate (10 clients) / decrypt seconds per client per 100k parameters.
3. The share of round wall time spent in encryption in the default secure simulation (digits,
   20 clients, --epsilon 8), over its rounds.

    python bench/he_cost.py            # writes bench/results/he_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from securegmi.crypto.aggregation import add_updates, max_envelope_bytes
from securegmi.crypto.envelope import decrypt, encrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters

RESULTS = Path(__file__).parent / "results" / "he_cost.json"
PARAMS = 100_000
CLIENTS = 10

PARAMETER_SETS = {
    "shipped: N=4096 [60,49] 2^40": CkksParameters(),
    "tutorial: N=8192 [60,40,40,60] 2^40": CkksParameters(
        poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40
    ),
}


def tenseal_vector_expansion(params: CkksParameters) -> float:
    """The same values through TenSEAL's high-level API (unseeded ciphertexts): the baseline."""
    import tenseal as ts

    keys = SecretContext.generate(params)
    slots = params.slot_count
    values = np.random.default_rng(0).uniform(-1, 1, PARAMS)
    size = sum(
        len(ts.ckks_vector(keys.context, values[i : i + slots].tolist()).serialize())
        for i in range(0, PARAMS, slots)
    )
    return size / (4 * PARAMS)


def costs(params: CkksParameters) -> dict[str, float]:
    keys = SecretContext.generate(params)
    server = keys.public()
    rng = np.random.default_rng(0)
    values = [rng.uniform(-1, 1, PARAMS) for _ in range(CLIENTS)]
    t0 = time.perf_counter()
    envelopes = {f"c{i}": encrypt(keys, v) for i, v in enumerate(values)}
    t_enc = (time.perf_counter() - t0) / CLIENTS
    t0 = time.perf_counter()
    result = add_updates(server, envelopes, PARAMS, max_envelope_bytes(server, PARAMS))
    t_add = (time.perf_counter() - t0) / CLIENTS
    assert result.data is not None
    t0 = time.perf_counter()
    total = decrypt(keys, result.data)
    t_dec = time.perf_counter() - t0
    return {
        "expansion": len(envelopes["c0"]) / (4 * PARAMS),
        "bytes_per_value": len(envelopes["c0"]) / PARAMS,
        "max_abs_error": float(np.max(np.abs(total - sum(values)))),
        "encrypt_s_per_client": t_enc,
        "check_and_add_s_per_client": t_add,
        "decrypt_s": t_dec,
    }


def encryption_share() -> dict[str, float]:
    """Wrap the secure client's encrypt and decrypt to time them inside a real run."""
    import torch

    import securegmi.federation.codec as sc
    from securegmi.config import SimulationConfig
    from securegmi.simulation.runner import run_simulation

    torch.set_num_threads(1)
    spent = {"encrypt": 0.0, "decrypt": 0.0}
    real_encrypt, real_decrypt = sc.encrypt, sc.decrypt

    def timed(name, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    sc.encrypt, sc.decrypt = timed("encrypt", real_encrypt), timed("decrypt", real_decrypt)
    # The statistics design's length is its own (6 statistics rounds, then vae_rounds): --rounds,
    # once passed here, never applied to it.
    config = SimulationConfig(protocol="secure", epsilon=8.0)
    try:
        result = run_simulation(config)
    finally:
        sc.encrypt, sc.decrypt = real_encrypt, real_decrypt
    round_seconds = sum(h.seconds for h in result.history)
    return {
        "rounds": config.planned_rounds,
        "round_seconds": round_seconds,
        "encrypt_seconds": spent["encrypt"],
        "decrypt_seconds": spent["decrypt"],
        "encrypt_share": spent["encrypt"] / round_seconds,
        "crypto_share": (spent["encrypt"] + spent["decrypt"]) / round_seconds,
        "uplink_bytes_per_client_round": result.uplink_bytes_per_client_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    out: dict[str, object] = {"parameters": PARAMS, "clients": CLIENTS, "sets": {}}
    for name, params in PARAMETER_SETS.items():
        c = costs(params)
        c["tenseal_vector_expansion"] = tenseal_vector_expansion(params)
        out["sets"][name] = c  # type: ignore[index]
        print(
            f"{name:38s} {c['expansion']:5.2f}x float32 seeded ({c['bytes_per_value']:.1f} B/value; "
            f"{c['tenseal_vector_expansion']:.2f}x via ts.ckks_vector)  err {c['max_abs_error']:.1e}  "
            f"enc {c['encrypt_s_per_client']:.3f}s  check+add {c['check_and_add_s_per_client']:.3f}s  "
            f"dec {c['decrypt_s']:.3f}s  (per client, {PARAMS // 1000}k params)",
            flush=True,
        )
    share = encryption_share()
    out["default_simulation"] = share
    print(
        f"secure simulate (digits, 20 clients, eps 8, {share['rounds']:.0f} rounds): encryption "
        f"{share['encrypt_share']:.1%} of round time, encryption+decryption {share['crypto_share']:.1%}; "
        f"uplink {share['uplink_bytes_per_client_round'] / 1e6:.2f} MB per client per round"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
