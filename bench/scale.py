"""Clients in one process: 10, 100 and 1,000 under the secure protocol, side by side.

Each cohort size runs in its own process (so each peak RSS is its own): synthetic blobs (10
dimensions, 3 sources), 16 training records per client, K = 3 MLP VAEs (hidden 16, latent 2),
`--epsilon 8` with the em design (DP counts and DP-SGD every round) under CKKS, 3 rounds, of
which the rounds after the first (which answers the public start) are reported. Timed: each
round's `play_round` (broadcast, every client's E-step, DP-SGD and encryption, the server's
checks and additions), and the setup (data, keys, clients). Accuracy is not the point here.

Fits round time = a + b x clients and peak RSS = c + d x clients (least squares over the sizes);
per-client cost is flat when b explains the rounds at every size. Each round's time is split
into the clients' encryption and decryption, the server's checks and additions, and the rest
(E-steps, DP-SGD, masses, messages). Beyond 128 clients the cohort needs the larger CKKS set
(N=8192, twice the bytes per value); `--ckks-clients` runs every size with the set of that many
clients, to tell the set's cost from the cohort's.

    python bench/scale.py [--sizes 10 100 1000] [--rounds 3]   # writes bench/results/scale.json
    python bench/scale.py --sizes 100 --ckks-clients 1000 --out bench/results/scale_n8192.json
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


def _timed(owner: Any, name: str, spent: dict[str, float], part: str) -> None:
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def one_size(clients: int, rounds: int, ckks_clients: int | None) -> dict[str, Any]:
    import torch

    import securegmi.federation.codec as codec
    from securegmi.config import SimulationConfig
    from securegmi.crypto.keys import SecretContext
    from securegmi.crypto.params import CkksParameters
    from securegmi.data.datasets import synthetic_blobs
    from securegmi.data.mixture import make_federated_data
    from securegmi.federation.server import play_round
    from securegmi.federation.transport import InProcessTransport
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
    federation = Federation.build(config, data)
    params = CkksParameters.for_cohort(ckks_clients) if ckks_clients else federation.ckks_parameters()
    keys = SecretContext.generate(params)
    parties = {cid: federation.client(i, keys) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(keys.public())
    transport = InProcessTransport(server.endpoint, {cid: c.endpoint for cid, c in parties.items()})
    setup = time.perf_counter() - started
    parts = ("encrypt", "decrypt", "server_check", "server_add")
    spent = dict.fromkeys(parts, 0.0)
    for owner, name, part in (
        (codec, "encrypt", "encrypt"),
        (codec, "decrypt", "decrypt"),
        (codec, "check_update", "server_check"),
        (codec.CkksSum, "add", "server_add"),
    ):
        _timed(owner, name, spent, part)
    round_seconds, breakdown = [], []
    for t in range(rounds):
        before = dict(spent)
        t0 = time.perf_counter()
        outcome = play_round(server, transport, list(parties), t, 1.0)
        round_seconds.append(time.perf_counter() - t0)
        assert len(outcome.replies) == clients, outcome.refused
        crypto = {p: spent[p] - before[p] for p in parts}
        breakdown.append({**crypto, "rest": round_seconds[-1] - sum(crypto.values())})
    # Round 0 answers the public start (nothing to decrypt): the steady rounds are the others.
    steady = round_seconds[1:]
    return {
        "clients": clients,
        "ckks": {
            "poly_modulus_degree": keys.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(keys.params.coeff_mod_bit_sizes),
        },
        "setup_seconds": setup,
        "round_seconds": round_seconds,
        "round_seconds_median": float(np.median(steady)),
        "per_client_round_ms": 1000 * float(np.median(steady)) / clients,
        # mean over the steady rounds, per client
        "per_client_round_ms_parts": {
            k: 1000 * float(np.mean([b[k] for b in breakdown[1:]])) / clients for k in breakdown[0]
        },
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
    parser.add_argument("--ckks-clients", type=int, help="use the CKKS set of this many clients")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 0 answers the start, the others are timed")
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.rounds, args.ckks_clients)))
        return
    rows = []
    for size in args.sizes:
        ckks = ["--ckks-clients", str(args.ckks_clients)] if args.ckks_clients else []
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--rounds", str(args.rounds), *ckks],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{size:5d} clients: round {r['round_seconds_median']:7.2f} s  "
            f"{r['per_client_round_ms']:6.2f} ms/client  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
            f"setup {r['setup_seconds']:6.1f} s  CKKS N={r['ckks']['poly_modulus_degree']}\n        "
            + "  ".join(f"{k} {v:.2f}" for k, v in r["per_client_round_ms_parts"].items())
            + " (ms/client)",
            flush=True,
        )
    sizes = [float(r["clients"]) for r in rows]
    out = {
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "records_per_client": RECORDS,
        "rounds": args.rounds,
        "sizes": rows,
    }
    if len(rows) > 1:
        out["fit_round_seconds"] = fit(sizes, [r["round_seconds_median"] for r in rows])
        out["fit_peak_rss_mib"] = fit(sizes, [r["peak_rss_mib"] for r in rows])
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k.startswith("fit_")}, indent=2))


if __name__ == "__main__":
    main()
