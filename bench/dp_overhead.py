"""DP-SGD epoch time / plain epoch time for the same K=3 mixture module, side by side in one run.

One epoch = one expected pass over the data: plain Adam on shuffled batches of 32, or DP-SGD
(Opacus ghost clipping) on 1/q Poisson batches with q = 32/n. Both on one thread; the median of
several epochs after a warm-up. Writes bench/results/dp_overhead.json.

    python bench/dp_overhead.py     # digits, and MNIST-5k if the 'mnist' extra is installed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import train_components
from securegmi.data.datasets import load_dataset
from securegmi.errors import DataError
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer

BATCH = 32
RESULTS = Path(__file__).parent / "results" / "dp_overhead.json"


def epoch_seconds(name: str, private: bool, epochs: int) -> list[float]:
    data = load_dataset(name)
    x = torch.as_tensor(data.x)
    n = len(x)
    model = MixtureOfVAEs.mlp(3, x.shape[1], 128, 8, data.likelihood, seed=0)
    resp = torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    if private:
        config = DpSgdConfig(
            noise_multiplier=1.0, clip_norm=1.0, sample_rate=BATCH / n, batch_normaliser=BATCH
        )
        trainer = PrivateTrainer(model, optimiser, config)

        def loss(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
            return mixture_loss(module(x[idx]), resp[idx])

        for e in range(epochs + 1):
            t0 = time.perf_counter()
            trainer.train(loss, n, config.steps_per_epoch, seed=e)
            times.append(time.perf_counter() - t0)
    else:
        rng = np.random.default_rng(0)
        for _ in range(epochs + 1):
            t0 = time.perf_counter()
            train_components(model, data.x, resp, optimiser, epochs=1, batch_size=BATCH, generator=rng)
            times.append(time.perf_counter() - t0)
    return times[1:]  # drop the warm-up epoch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for name in ("digits", "mnist5k"):
        try:
            plain = epoch_seconds(name, private=False, epochs=args.epochs)
            dp = epoch_seconds(name, private=True, epochs=args.epochs)
        except DataError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        rows[name] = {
            "plain_epoch_s": statistics.median(plain),
            "dp_epoch_s": statistics.median(dp),
            "ratio": statistics.median(dp) / statistics.median(plain),
        }
        r = rows[name]
        print(
            f"{name:8s} plain {r['plain_epoch_s']:.3f} s/epoch   DP-SGD (ghost) {r['dp_epoch_s']:.3f} s/epoch"
            f"   ratio {r['ratio']:.2f}x",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"batch": BATCH, "epochs": args.epochs, "threads": 1, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
