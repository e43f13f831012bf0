"""Hyper-parameter sweep for fedgmi on digits-PM, on seeds kept apart from the benchmark's.

    python bench/tune/sweep.py --seeds 10 11 12 13 14 15 16 17 --workers 16 \
        --grid '{"base": {}, "lr1e-3": {"learning_rate": 0.001}}'
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def run(name: str, overrides: dict[str, Any], seed: int) -> tuple[str, int, float, float]:
    import torch

    torch.set_num_threads(1)
    from securegmi.config import SimulationConfig
    from securegmi.protocols import plain
    from securegmi.simulation.runner import run_simulation

    r = run_simulation(SimulationConfig(seed=seed, **overrides), protocol=plain.build)
    return name, seed, r.evaluation.source_accuracy, r.evaluation.pi_tv_error


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    grid: dict[str, dict[str, Any]] = json.loads(a.grid)
    with ProcessPoolExecutor(a.workers) as pool:
        futs = [pool.submit(run, n, o, s) for n, o in grid.items() for s in a.seeds]
        rows = [f.result() for f in futs]
    for name in grid:
        acc = [r[2] for r in rows if r[0] == name]
        tv = [r[3] for r in rows if r[0] == name]
        print(
            f"{name:24s} acc {statistics.fmean(acc):.3f} ± {statistics.stdev(acc):.3f} "
            f"min {min(acc):.3f}  tv {statistics.fmean(tv):.3f}  {[round(x, 3) for x in acc]}"
        )


if __name__ == "__main__":
    main()
