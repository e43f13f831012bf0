"""DP-SGD epoch time / plain epoch time for the same K=3 mixture module, side by side in one run.

One epoch = one expected pass over the data: plain Adam on shuffled batches of 32, or DP-SGD
(the shipped `PrivateTrainer`: Opacus' ghost-clipping norms and noise) on 1/q Poisson batches
with q = 32/n. All on one thread, the variants taking turns epoch by epoch; the median of
several epochs after a warm-up. The shipped module is the fused mixture (`MixtureOfVAEs.mlp`:
each layer of all K components one batched layer, clipped sum read off one backward pass);
beside it, the same components as K separate `VAE.mlp` modules (the layout before fusing:
Opacus' two backward passes), plain and DP-SGD; the shipped trainer with Opacus' own module
and optimiser classes (full backward hooks, copied gradient sums, a zeros tensor per noise draw:
what the trainer's lighter hooks and buffers replace, bit for bit); and Opacus' other per-sample
gradient modes on the fused module (`hooks`, `functorch`: per-sample gradients materialised), as
options measured, not shipped. Opacus' `ew` (expanded weights) mode handles only torch's own
layer functions and fails on the fused layer. Writes bench/results/dp_overhead.json.

    python bench/dp_overhead.py     # digits, and MNIST-5k if the 'mnist' extra is installed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import train_components
from securegmi.core.vae import VAE
from securegmi.data.datasets import load_dataset
from securegmi.errors import DataError
from securegmi.privacy import dpsgd
from securegmi.privacy.batched_samplers import register_batched_samplers
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer

BATCH = 32
OTHER_MODES = ("hooks", "functorch")
RESULTS = Path(__file__).parent / "results" / "dp_overhead.json"


Epoch = Callable[[int], None]  # runs training epoch e


def _opacus_mode_epoch(
    mode: str, model: torch.nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, resp: torch.Tensor
) -> Epoch:
    """DP-SGD with Opacus' GradSampleModule in `mode` and its plain DPOptimizer (clip, noise)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    register_batched_samplers()
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    dp = DPOptimizer(
        optimiser, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH, loss_reduction="mean"
    )
    n = len(x)

    def epoch(e: int) -> None:
        rng = np.random.default_rng(e)
        for _ in range(round(n / BATCH)):
            idx = torch.as_tensor(np.nonzero(rng.random(n) < BATCH / n)[0])
            dp.zero_grad()
            mixture_loss(gsm(x[idx]), resp[idx]).mean().backward()
            dp.step()

    return epoch


def training_epoch(name: str, mode: str, fused: bool = True) -> Epoch:
    """One epoch of `mode` ("plain", "ghost" = the shipped DP-SGD, "ghost-stock" = the same with
    Opacus' own module and optimiser classes, or an Opacus mode)."""
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
    if mode == "plain":
        rng = np.random.default_rng(0)

        def plain_epoch(e: int) -> None:
            train_components(model, data.x, resp, optimiser, epochs=1, batch_size=BATCH, generator=rng)

        return plain_epoch
    if mode not in ("ghost", "ghost-stock"):
        return _opacus_mode_epoch(mode, model, optimiser, x, resp)
    config = DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0, sample_rate=BATCH / n, batch_normaliser=BATCH)
    if mode == "ghost":
        trainer = PrivateTrainer(model, optimiser, config)
    else:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping

        shipped = dpsgd._module_class, dpsgd._optimiser_class
        dpsgd._module_class = lambda: GradSampleModuleFastGradientClipping  # type: ignore[assignment]
        dpsgd._optimiser_class = lambda: DPOptimizerFastGradientClipping  # type: ignore[assignment]
        try:
            trainer = PrivateTrainer(model, optimiser, config)
        finally:
            dpsgd._module_class, dpsgd._optimiser_class = shipped

    def loss(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return mixture_loss(module(x[idx]), resp[idx])

    return lambda e: trainer.train(loss, n, config.steps_per_epoch, public_seed=e)


def interleaved_medians(epochs: dict[str, Epoch], rounds: int) -> dict[str, float]:
    """Median seconds per epoch of each variant, the variants taking turns epoch by epoch so that
    a slow spell of a shared machine falls on all of them alike; the first turn warms up."""
    times: dict[str, list[float]] = {key: [] for key in epochs}
    for e in range(rounds + 1):
        for key, run in epochs.items():
            t0 = time.perf_counter()
            run(e)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = {}
    for name in ("digits", "mnist5k"):
        try:
            variants = {
                "plain": training_epoch(name, "plain"),
                "dp": training_epoch(name, "ghost"),
                "dp_opacus_classes": training_epoch(name, "ghost-stock"),
                "separate_plain": training_epoch(name, "plain", fused=False),
                "separate_dp": training_epoch(name, "ghost", fused=False),
            } | {m: training_epoch(name, m) for m in OTHER_MODES}
        except DataError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        t = interleaved_medians(variants, args.epochs)
        plain, dp = t["plain"], t["dp"]
        others = {m: t[m] / plain for m in OTHER_MODES}
        rows[name] = {
            "plain_epoch_s": plain,
            "dp_epoch_s": dp,
            "ratio": dp / plain,
            "opacus_classes_ratio": t["dp_opacus_classes"] / plain,
            "other_modes_ratio": others,
            "separate_modules": {
                "plain_epoch_s": t["separate_plain"],
                "dp_epoch_s": t["separate_dp"],
                "ratio": t["separate_dp"] / t["separate_plain"],
                "fused_dp_speedup": t["separate_dp"] / dp,
            },
        }
        print(
            f"{name:8s} fused: plain {plain:.3f} s/epoch, DP-SGD (shipped) {dp:.3f} s/epoch,"
            f" ratio {dp / plain:.2f}x (with Opacus' own classes {t['dp_opacus_classes'] / plain:.2f}x)"
            + "".join(f", {m} {r:.2f}x" for m, r in others.items()),
            flush=True,
        )
        print(
            f"{'':8s} separate modules: plain {t['separate_plain']:.3f}, DP-SGD {t['separate_dp']:.3f},"
            f" ratio {t['separate_dp'] / t['separate_plain']:.2f}x;"
            f" fusing sped DP-SGD up {t['separate_dp'] / dp:.2f}x",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"batch": BATCH, "epochs": args.epochs, "threads": 1, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
