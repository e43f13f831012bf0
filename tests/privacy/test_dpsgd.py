"""The DP-SGD trainer's changes to Opacus (how gradients are accumulated and the noise buffers
allocated) change nothing of what it computes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.vae import VAE
from securegmi.privacy import dpsgd


def _train(monkeypatch, optimiser_class: type | None, layout: str = "fused") -> np.ndarray:
    if optimiser_class is not None:
        monkeypatch.setattr(dpsgd, "_optimiser_class", lambda: optimiser_class)
    x, resp = torch.rand(80, 10, generator=torch.Generator().manual_seed(3)), torch.full((80, 3), 1 / 3)
    model = (
        MixtureOfVAEs.mlp(3, 10, 16, 2, "bernoulli", 0)
        if layout == "fused"  # one backward pass
        else MixtureOfVAEs.from_factory(lambda: VAE.mlp(10, 16, 2, "bernoulli"), 3, 0)  # two
    )
    trainer = dpsgd.PrivateTrainer(
        model,
        torch.optim.Adam(model.parameters(), 1e-3),
        dpsgd.DpSgdConfig(1.0, 1.0, 0.25, 20),
        torch.Generator().manual_seed(5),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(lambda m, b: mixture_loss(m(x[b]), resp[b]), 80, 6, seed=1)
    monkeypatch.undo()
    return model.get_component_vectors()


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_the_trainer_takes_exactly_opacus_steps(monkeypatch, layout):
    ours = _train(monkeypatch, None, layout)
    opacus = _train(monkeypatch, DPOptimizerFastGradientClipping, layout)
    np.testing.assert_array_equal(ours, opacus)
    # Negative control: another noise draw is visible at this precision.
    assert not np.array_equal(ours, _train(monkeypatch, _NoisierOptimiser(), layout))


def _NoisierOptimiser() -> type:
    class Noisier(DPOptimizerFastGradientClipping):  # type: ignore[misc]
        def add_noise(self) -> None:
            self.noise_multiplier *= 1.01
            super().add_noise()

    return Noisier
