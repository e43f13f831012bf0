"""Utility of every method on digits-PM, side by side in one run.

20 clients, K = 3 class-group sources, alpha = 0.5, 5 seeds by default (the spread across seeds
is large, so one seed says little). Prints mean ± sd of source accuracy, pi TV error and wall
time, and writes bench/results/utility.json after every finished run (a stopped study keeps
what it ran). Jobs go seed by seed, so a partial study compares every method on its seeds.

    python bench/utility.py                 # all methods, seeds 0-4, 2 worker processes
    python bench/utility.py --methods fedgmi oracle --seeds 0 1 2
    python bench/utility.py --dataset mnist5k --components 5 --seeds 0 1 2 \
        --out bench/results/utility_mnist.json
    python bench/utility.py --methods fedgmi central-dp --epsilons 1 4 8 --placements split local \
        --out bench/results/utility_dp.json
    python bench/utility.py --methods fedgmi --epsilons 4 8 --sgd-placement local \
        --out bench/results/utility_dp_local_sgd.json

Under --epsilons, `fedgmi eps=E` is the secure protocol with split noise (the default of
`securegmi simulate --epsilon E`), `fedgmi local eps=E` the dp protocol with local noise, and
`central-dp eps=E` one trusted curator over the pooled records at the same (epsilon, delta).
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

METHODS = ["fedgmi", "oracle", "central-em", "local", "fedem-weights", "fedavg", "ifca", "fedgmm"]
RESULTS = Path(__file__).parent / "results" / "utility.json"


def run_one(
    method: str, seed: int, overrides: dict[str, Any], epsilon: float | None, placement: str = "split"
) -> dict[str, Any]:
    import torch

    from securegmi.config import SimulationConfig
    from securegmi.simulation.runner import FEDERATED, run_simulation

    torch.set_num_threads(1)  # one process per core is faster than threads for these models
    privacy: dict[str, Any] = {}
    sgd_placement = overrides.get("sgd_placement")  # None: the default (the statistics' placement)
    overrides = {k: v for k, v in overrides.items() if k != "sgd_placement"}
    design = overrides.get("private_training", "statistics")
    statistics_design = epsilon is not None and design == "statistics"
    if epsilon is not None:
        privacy = {"epsilon": epsilon}
        if method in FEDERATED:  # central-dp sends no message: no protocol
            privacy["protocol"] = "secure" if placement == "split" else "dp"
        if method == "fedgmi" and statistics_design:
            privacy["noise_placement"] = placement
            if sgd_placement is not None and placement == "split":
                privacy["sgd_placement"] = sgd_placement
    # One set of overrides serves every method; the config refuses a setting a run would not use,
    # so leave out --components for fedavg (one shared VAE), --rounds under the statistics design
    # (its length is vae_rounds) and --private-training without a budget, as those runs always
    # ignored them.
    if method == "fedavg":
        overrides = {k: v for k, v in overrides.items() if k != "components"}
    if statistics_design:
        overrides = {k: v for k, v in overrides.items() if k != "rounds"}
    if epsilon is None:  # --private-training names a private run's design
        overrides = {k: v for k, v in overrides.items() if k != "private_training"}
    config = SimulationConfig(method=method, seed=seed, **overrides, **privacy)
    result = run_simulation(config)
    label = method
    if epsilon is not None:
        label = f"{method}{' local' if placement == 'local' and method == 'fedgmi' else ''} eps={epsilon:g}"
        label += " sgd-local" if privacy.get("sgd_placement") == "local" else ""
    return {
        "method": label,
        "epsilon": epsilon,
        "epsilon_spent": None if result.privacy is None else result.privacy["max_spent"],
        "epsilon_fallback": None if result.privacy is None else result.privacy.get("max_spent_fallback"),
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
            values = [r[key] for r in rows if r[key] is not None]  # fedgmm has no VAE NLL
            if not values:
                out[m][f"{key}_mean"] = out[m][f"{key}_sd"] = None
                continue
            out[m][f"{key}_mean"] = statistics.fmean(values)
            out[m][f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write(
    out: Path, settings: dict[str, Any], runs: list[dict[str, Any]], wall: float, complete: bool
) -> None:
    """The results so far, atomically: a study stopped midway keeps every finished run."""
    summary = summarise(runs, list(dict.fromkeys(r["method"] for r in runs)))
    document = {
        "settings": settings,
        "complete": complete,
        "summary": summary,
        "runs": runs,
        "total_wall_seconds": wall,
    }
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(out)


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
    parser.add_argument("--placements", nargs="+", default=["split"], choices=["split", "local"])
    parser.add_argument("--private-training", default="statistics", choices=["statistics", "em"])
    parser.add_argument(
        "--sgd-placement",
        default=None,
        choices=["split", "local"],
        help="DP-SGD noise of `fedgmi eps=E` (secure, split statistics); default split, as one curator",
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--components", type=int, default=3, help="K, also the number of class groups")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides: dict[str, Any] = {
        "dataset": args.dataset,
        "clients": 20,
        "components": args.components,
        "n_sources": args.components,
        "alpha": 0.5,
    }
    if args.private_training != "statistics":
        overrides["private_training"] = args.private_training
    if args.sgd_placement is not None:
        overrides["sgd_placement"] = args.sgd_placement
    if args.rounds is not None:
        overrides["rounds"] = args.rounds

    started = time.perf_counter()
    # "inf" means no DP: the plain protocol.
    budgets: list[float | None] = [None if math.isinf(e) else e for e in args.epsilons] or [None]
    jobs = [
        (m, s, e, p)
        for s in args.seeds
        for m in args.methods
        for e in budgets
        for p in (args.placements if e is not None and m == "fedgmi" else ["split"])
    ]
    settings = {**overrides, "seeds": args.seeds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, m, s, overrides, e, p) for m, s, e, p in jobs]
        runs = []
        for (_, s, _, _), f in zip(jobs, futures, strict=True):
            runs.append(f.result())
            print(
                f"{runs[-1]['method']:14s} seed {s}: acc {runs[-1]['source_accuracy']:.3f} "
                f"pi-TV {runs[-1]['pi_tv_error']:.3f} {runs[-1]['wall_seconds']:.1f}s",
                flush=True,
            )
            write(args.out, settings, runs, time.perf_counter() - started, complete=len(runs) == len(jobs))
    summary = summarise(runs, list(dict.fromkeys(r["method"] for r in runs)))

    table = Table(title=f"{args.dataset}-PM, 20 clients, K={args.components}, alpha=0.5, seeds {args.seeds}")
    for col in ("method", "source accuracy", "pi TV error", "NLL (nats)", "wall s / run"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for m, s in summary.items():
        table.add_row(
            m,
            f"{s['source_accuracy_mean']:.3f} ± {s['source_accuracy_sd']:.3f}",
            f"{s['pi_tv_error_mean']:.3f} ± {s['pi_tv_error_sd']:.3f}",
            "-" if s["nll_mean"] is None else f"{s['nll_mean']:.2f} ± {s['nll_sd']:.2f}",
            f"{s['wall_seconds_mean']:.1f} ± {s['wall_seconds_sd']:.1f}",
        )
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
