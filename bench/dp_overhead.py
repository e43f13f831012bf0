"""DP-SGD epoch time / plain epoch time for the same K=3 mixture module, side by side in one run.

One epoch = one expected pass over the data: plain Adam on shuffled batches of 32, or DP-SGD
(Opacus ghost clipping, the shipped `PrivateTrainer`) on 1/q Poisson batches with q = 32/n. Both
on one thread; the median of several epochs after a warm-up. The shipped module is the fused
mixture (`MixtureOfVAEs.mlp`: each layer of all K components one batched layer); beside it, the
same components as K separate `VAE.mlp` modules (the layout before fusing), plain and DP-SGD.
Beside them too, Opacus' other per-sample gradient modes on the fused module (`hooks`,
`functorch`: one backward pass with per-sample gradients materialised, instead of ghost
clipping's two passes without them), as options measured, not shipped; Opacus' `ew` (expanded
weights) mode handles only torch's own layer functions and fails on the fused layer.
Writes bench/results/dp_overhead.json.

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
from securegmi.core.vae import VAE
from securegmi.data.datasets import load_dataset
from securegmi.errors import DataError
from securegmi.privacy.batched_samplers import register_batched_samplers
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer

BATCH = 32
OTHER_MODES = ("hooks", "functorch")
RESULTS = Path(__file__).parent / "results" / "dp_overhead.json"


def _opacus_mode_epochs(
    mode: str,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    x: torch.Tensor,
    resp: torch.Tensor,
    n: int,
    epochs: int,
) -> list[float]:
    """DP-SGD with Opacus' GradSampleModule in `mode` and its plain DPOptimizer (clip, noise)."""
    import warnings

    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    warnings.filterwarnings("ignore")
    register_batched_samplers()
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    dp = DPOptimizer(
        optimiser, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH, loss_reduction="mean"
    )
    times = []
    for e in range(epochs + 1):
        rng = np.random.default_rng(e)
        batches = [torch.as_tensor(np.nonzero(rng.random(n) < BATCH / n)[0]) for _ in range(round(n / BATCH))]
        t0 = time.perf_counter()
        for idx in batches:
            dp.zero_grad()
            mixture_loss(gsm(x[idx]), resp[idx]).mean().backward()
            dp.step()
        times.append(time.perf_counter() - t0)
    return times


def epoch_seconds(
    name: str, private: bool, epochs: int, mode: str = "ghost", fused: bool = True
) -> list[float]:
    data = load_dataset(name)
    x = torch.as_tensor(data.x)
    n = len(x)
    dim, likelihood = x.shape[1], data.likelihood
    model = (
        MixtureOfVAEs.mlp(3, dim, 128, 8, likelihood, seed=0)
        if fused
        else MixtureOfVAEs.from_factory(lambda: VAE.mlp(dim, 128, 8, likelihood), 3, seed=0)
    )
    resp = torch.softmax(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    if private and mode == "ghost":
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
    elif private:
        times = _opacus_mode_epochs(mode, model, optimiser, x, resp, n, epochs)
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
            plain = statistics.median(epoch_seconds(name, private=False, epochs=args.epochs))
            dp = statistics.median(epoch_seconds(name, private=True, epochs=args.epochs))
            separate_plain = statistics.median(epoch_seconds(name, False, args.epochs, fused=False))
            separate_dp = statistics.median(epoch_seconds(name, True, args.epochs, fused=False))
            others = {
                m: statistics.median(epoch_seconds(name, private=True, epochs=args.epochs, mode=m)) / plain
                for m in OTHER_MODES
            }
        except DataError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        rows[name] = {
            "plain_epoch_s": plain,
            "dp_epoch_s": dp,
            "ratio": dp / plain,
            "other_modes_ratio": others,
            "separate_modules": {
                "plain_epoch_s": separate_plain,
                "dp_epoch_s": separate_dp,
                "ratio": separate_dp / separate_plain,
                "fused_dp_speedup": separate_dp / dp,
            },
        }
        print(
            f"{name:8s} fused: plain {plain:.3f} s/epoch, DP-SGD (ghost, shipped) {dp:.3f} s/epoch,"
            f" ratio {dp / plain:.2f}x" + "".join(f", {m} {r:.2f}x" for m, r in others.items()),
            flush=True,
        )
        print(
            f"{'':8s} separate modules: plain {separate_plain:.3f}, DP-SGD {separate_dp:.3f},"
            f" ratio {separate_dp / separate_plain:.2f}x; fusing sped DP-SGD up {separate_dp / dp:.2f}x",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"batch": BATCH, "epochs": args.epochs, "threads": 1, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
