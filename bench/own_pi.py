"""Each site's own pi against its released pi (bench/results/own_pi.json): one run per seed of
digits-PM at epsilon 8, fedgmi (secure, the default design) or central-dp; the final evaluation
scored twice, with the released pis and with the sites' own (`Client.own_pi`).

    python bench/own_pi.py fedgmi 10,11,12,13,14      # one JSON line per seed
    python bench/own_pi.py central-dp 0,1,2,3,4
    python bench/own_pi.py fedgmi 10,11,12 '{"private_training": "em"}'
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

import securegmi.simulation.runner as runner
from securegmi.config import SimulationConfig
from securegmi.simulation.evaluation import Evaluation

_released: list[Evaluation] = []
_finish = runner.finish_run


def _finish_twice(recorder: Any, run_dir: Any, models: Any, pis: Any, *args: Any, **kwargs: Any) -> Any:
    """The run's own finishing step, after scoring its released pis the same way."""
    _released.append(recorder.evaluate(models, pis, final=True))
    return _finish(recorder, run_dir, models, pis, *args, **kwargs)


def main(method: str, seeds: list[int], extra: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    runner.finish_run = _finish_twice
    for seed in seeds:
        started = time.perf_counter()
        fields: dict[str, Any] = {"protocol": "secure"} if method == "fedgmi" else {"method": method}
        result = runner.run_simulation(SimulationConfig(epsilon=8.0, seed=seed, **fields, **extra))
        released, own = _released[-1], result.evaluation
        row = {
            "method": method,
            **extra,
            "seed": seed,
            "acc_released": round(released.source_accuracy, 4),
            "tv_released": round(released.pi_tv_error, 4),
            "acc_own": round(own.source_accuracy, 4),
            "tv_own": round(own.pi_tv_error, 4),
            "nll": own.nll,
            "s": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        [int(s) for s in sys.argv[2].split(",")],
        json.loads(sys.argv[3]) if len(sys.argv) > 3 else {},
    )
