"""Utility of every method on digits-PM, side by side in one run.

20 clients, K = 3 class-group sources, alpha = 0.5, 5 seeds by default (the spread across seeds
is large, so one seed says little). Prints mean ± sd of source accuracy, pi TV error and wall
time, and writes bench/results/utility.json.

    python bench/utility.py                 # all methods, seeds 0-4, 2 worker processes
    python bench/utility.py --methods fedgmi oracle --seeds 0 1 2
    python bench/utility.py --methods fedgmi --epsilons 1 4 8 inf --out bench/results/utility_dp.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

METHODS = ["fedgmi", "oracle", "local", "fedem-weights", "fedavg"]
RESULTS = Path(__file__).parent / "results" / "utility.json"


def run_one(method: str, seed: int, overrides: dict[str, Any], epsilon: float | None) -> dict[str, Any]:
    import torch

    from securegmi.config import SimulationConfig
    from securegmi.engine.run import run_simulation
    from securegmi.protocols import dp, plain

    torch.set_num_threads(1)  # one process per core is faster than threads for these models
    privacy = {} if epsilon is None else {"protocol": "dp", "epsilon": epsilon}
    config = SimulationConfig(method=method, seed=seed, **overrides, **privacy)
    result = run_simulation(config, protocol=plain.build if epsilon is None else dp.build)
    label = method if epsilon is None else f"{method} eps={epsilon:g}"
    return {
        "method": label,
        "epsilon": epsilon,
        "epsilon_spent": None if result.privacy is None else result.privacy["max_spent"],
        "seed": seed,
        "source_accuracy": result.evaluation.source_accuracy,
        "pi_tv_error": result.evaluation.pi_tv_error,
        "nll": result.evaluation.nll,
        "wall_seconds": result.wall_seconds,
        "uplink_bytes_per_client_round": result.uplink_bytes_per_client_round,
    }


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        out[m] = {}
        for key in ("source_accuracy", "pi_tv_error", "nll", "wall_seconds"):
            values = [r[key] for r in rows]
            out[m][f"{key}_mean"] = statistics.fmean(values)
            out[m][f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=None, help="override the default rounds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--epsilons",
        nargs="*",
        type=float,
        default=[],
        help="also run these DP budgets (protocol dp) for each method",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides: dict[str, Any] = {"dataset": "digits", "clients": 20, "components": 3, "alpha": 0.5}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds

    started = time.perf_counter()
    # "inf" means no DP: the plain protocol.
    budgets: list[float | None] = [None if math.isinf(e) else e for e in args.epsilons] or [None]
    jobs = [(m, s, e) for m in args.methods for e in budgets for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, m, s, overrides, e) for m, s, e in jobs]
        runs = []
        for (_, s, _), f in zip(jobs, futures, strict=True):
            runs.append(f.result())
            print(
                f"{runs[-1]['method']:14s} seed {s}: acc {runs[-1]['source_accuracy']:.3f} "
                f"pi-TV {runs[-1]['pi_tv_error']:.3f} {runs[-1]['wall_seconds']:.1f}s",
                flush=True,
            )
    summary = summarise(runs, list(dict.fromkeys(r["method"] for r in runs)))

    table = Table(title=f"digits-PM, 20 clients, K=3, alpha=0.5, seeds {args.seeds}")
    for col in ("method", "source accuracy", "pi TV error", "NLL (nats)", "wall s / run"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for m, s in summary.items():
        table.add_row(
            m,
            f"{s['source_accuracy_mean']:.3f} ± {s['source_accuracy_sd']:.3f}",
            f"{s['pi_tv_error_mean']:.3f} ± {s['pi_tv_error_sd']:.3f}",
            f"{s['nll_mean']:.2f} ± {s['nll_sd']:.2f}",
            f"{s['wall_seconds_mean']:.1f} ± {s['wall_seconds_sd']:.1f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "settings": {**overrides, "seeds": args.seeds},
                "summary": summary,
                "runs": runs,
                "total_wall_seconds": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
