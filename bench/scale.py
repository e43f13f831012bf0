"""Clients in one process: 10, 100 and 1,000 under the secure protocol, side by side.

Each cohort size runs in its own process (so each peak RSS is its own): synthetic blobs (10
dimensions, 3 sources), 16 training records per client, K = 3 MLP VAEs (hidden 16, latent 2),
`--epsilon 8` with the em design (DP counts and DP-SGD every round) under CKKS, 3 rounds. Timed:
each round's `play_round` (broadcast, every client's E-step, DP-SGD and encryption, the server's
checks and additions), and the setup (data, keys, clients). Accuracy is not the point here.

Fits round time = a + b x clients and peak RSS = c + d x clients (least squares over the sizes);
per-client cost is flat when b explains the rounds at every size.

    python bench/scale.py [--sizes 10 100 1000] [--rounds 3]   # writes bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "scale.json"
RECORDS = 20  # per client, of which 16 train and 4 test


def one_size(clients: int, rounds: int) -> dict[str, Any]:
    import torch

    from securegmi.config import SimulationConfig
    from securegmi.crypto.keys import SecretContext
    from securegmi.data.datasets import synthetic_blobs
    from securegmi.data.mixture import make_federated_data
    from securegmi.federation.server import play_round
    from securegmi.federation.transport import InProcessTransport
    from securegmi.protocols import builder
    from securegmi.simulation.study import Federation

    torch.set_num_threads(1)
    started = time.perf_counter()
    config = SimulationConfig(
        dataset="synthetic",
        clients=clients,
        rounds=rounds,
        local_epochs=1,
        hidden=16,
        latent=2,
        protocol="secure",
        epsilon=8.0,
        private_training="em",
        samples_per_client=RECORDS,
    )
    # Enough records for every client at alpha 0.5 (the smallest source must serve its share).
    blobs = synthetic_blobs(per_class=4 * RECORDS * clients, seed=0)
    data = make_federated_data(
        blobs, clients=clients, sources=3, alpha=0.5, seed=0, samples_per_client=RECORDS
    )
    federation = Federation.build(config, builder("secure"), data)
    keys = SecretContext.generate(federation.ckks_parameters())
    parties = {cid: federation.client(i, keys) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public())
    transport = InProcessTransport(server.endpoint, {cid: c.endpoint for cid, c in parties.items()})
    setup = time.perf_counter() - started
    round_seconds = []
    for t in range(rounds):
        t0 = time.perf_counter()
        outcome = play_round(server, transport, list(parties), t, 1.0)
        round_seconds.append(time.perf_counter() - t0)
        assert len(outcome.replies) == clients, outcome.refused
    return {
        "clients": clients,
        "ckks": {
            "poly_modulus_degree": keys.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(keys.params.coeff_mod_bit_sizes),
        },
        "setup_seconds": setup,
        "round_seconds": round_seconds,
        "round_seconds_median": float(np.median(round_seconds)),
        "per_client_round_ms": 1000 * float(np.median(round_seconds)) / clients,
        # ru_maxrss is in KiB on Linux
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(xs, ys, 1)
    predicted = np.polyval([slope, intercept], xs)
    return {
        "intercept": float(intercept),
        "slope": float(slope),
        "max_relative_residual": float(np.max(np.abs(predicted - ys) / np.asarray(ys))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.rounds)))
        return
    rows = []
    for size in args.sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--rounds", str(args.rounds)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{size:5d} clients: round {r['round_seconds_median']:7.2f} s  "
            f"{r['per_client_round_ms']:6.2f} ms/client  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
            f"setup {r['setup_seconds']:6.1f} s  CKKS N={r['ckks']['poly_modulus_degree']}",
            flush=True,
        )
    sizes = [float(r["clients"]) for r in rows]
    out = {
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "records_per_client": RECORDS,
        "rounds": args.rounds,
        "sizes": rows,
        "fit_round_seconds": fit(sizes, [r["round_seconds_median"] for r in rows]),
        "fit_peak_rss_mib": fit(sizes, [r["peak_rss_mib"] for r in rows]),
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("fit_round_seconds", "fit_peak_rss_mib")}, indent=2))


if __name__ == "__main__":
    main()
