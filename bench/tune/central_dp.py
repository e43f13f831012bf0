"""central-dp on tuning seeds with reproducible noise, for settings that apply to it and to the
federation alike (the curator runs the federation's plan and pipeline: baselines.run_central_dp).

    python bench/tune/central_dp.py '{"identifier_share": 0.15}' 10,11,12,13,14,15,16,17 [draw]

Each seed's noise comes from NoiseSource(1000 * draw + seed), so settings compare on the same
draws (central-dp's own noise is always fresh; this script replaces its source, and nothing it
prints is a reported figure: those come from bench/utility.py).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import securegmi.simulation.baselines as baselines
from securegmi.config import SimulationConfig
from securegmi.privacy.noise import NoiseSource
from securegmi.simulation.runner import run_simulation


def main() -> None:
    torch.set_num_threads(1)
    overrides = json.loads(sys.argv[1])
    seeds = [int(s) for s in sys.argv[2].split(",")]
    draw = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rows = []
    for seed in seeds:
        baselines.NoiseSource = lambda seed=seed: NoiseSource(1000 * draw + seed)  # type: ignore[misc]
        config = SimulationConfig(**{"epsilon": 8.0, "method": "central-dp", "seed": seed, **overrides})
        e = run_simulation(config).evaluation
        rows.append((e.source_accuracy, e.pi_tv_error, e.nll or float("nan")))
    acc, tv, nll = np.array(rows).T
    print(
        json.dumps(overrides),
        f"source accuracy {acc.mean():.3f} ± {acc.std():.3f}, pi TV {tv.mean():.3f}, NLL {nll.mean():.2f}",
    )


if __name__ == "__main__":
    main()
