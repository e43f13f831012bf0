"""The DP-SGD trainer's changes to Opacus (how gradients are accumulated, where the noise comes
from, the buffers it skips) change nothing of what it computes from the same Gaussian draws."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.vae import VAE
from securegmi.privacy import dpsgd
from securegmi.privacy.noise import NoiseSource


class TorchDraws(NoiseSource):
    """Seeded test noise whose Gaussians are torch's draws on one torch generator, the draws
    Opacus' own optimiser makes when given that generator: the same noise for both."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.torch_generator = torch.Generator().manual_seed(seed)

    def normal(self, std: float, shape: Sequence[int]) -> torch.Tensor:
        return torch.normal(mean=0, std=std, size=tuple(shape), generator=self.torch_generator)


def _opacus(noise: TorchDraws, noisier: bool = False) -> type:
    class Opacus(DPOptimizerFastGradientClipping):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, **{**kwargs, "generator": noise.torch_generator})

        def add_noise(self) -> None:
            if noisier:  # the negative control: another noise scale
                self.noise_multiplier *= 1.01
            super().add_noise()

    return Opacus


def _train(monkeypatch, opacus: bool, layout: str = "fused", noisier: bool = False) -> np.ndarray:
    noise = TorchDraws(5)
    if opacus:
        monkeypatch.setattr(dpsgd, "_optimiser_class", lambda: _opacus(noise, noisier))
    x, resp = torch.rand(80, 10, generator=torch.Generator().manual_seed(3)), torch.full((80, 3), 1 / 3)
    model = (
        MixtureOfVAEs.mlp(3, 10, 16, 2, "bernoulli", 0)
        if layout == "fused"  # one backward pass
        else MixtureOfVAEs.from_factory(lambda: VAE.mlp(10, 16, 2, "bernoulli"), 3, 0)  # two
    )
    trainer = dpsgd.PrivateTrainer(
        model, torch.optim.Adam(model.parameters(), 1e-3), dpsgd.DpSgdConfig(1.0, 1.0, 0.25, 20), noise
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(lambda m, b: mixture_loss(m(x[b]), resp[b]), 80, 6, public_seed=1)
    monkeypatch.undo()
    return model.get_component_vectors()


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_the_trainer_takes_exactly_opacus_steps(monkeypatch, layout):
    ours = _train(monkeypatch, False, layout)
    np.testing.assert_array_equal(ours, _train(monkeypatch, True, layout))
    # Negative control: another noise draw is visible at this precision.
    assert not np.array_equal(ours, _train(monkeypatch, True, layout, noisier=True))


def test_the_shipped_trainer_never_draws_noise_from_torch(monkeypatch):
    """Every Gaussian the optimiser adds and every Poisson draw comes from the NoiseSource:
    with torch's own normal sampler broken, a DP-SGD run still trains."""

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("DP noise drawn with torch's generator")

    model = MixtureOfVAEs.mlp(3, 10, 16, 2, "bernoulli", 0)
    x, resp = torch.rand(40, 10), torch.full((40, 3), 1 / 3)
    trainer = dpsgd.PrivateTrainer(
        model, torch.optim.Adam(model.parameters(), 1e-3), dpsgd.DpSgdConfig(1.0, 1.0, 0.5, 20)
    )
    before = model.get_component_vectors()
    monkeypatch.setattr(torch, "normal", refused)
    trainer.train(lambda m, b: mixture_loss(m(x[b]), resp[b]), 40, 3, public_seed=1)
    share = trainer.noisy_share(lambda m, b: mixture_loss(m(x[b]), resp[b]), torch.arange(10), 0.5)
    assert not np.array_equal(before, model.get_component_vectors()) and np.isfinite(share).all()
    # Negative control: Opacus' own optimiser draws with torch and trips the same wire.
    monkeypatch.setattr(dpsgd, "_optimiser_class", lambda: DPOptimizerFastGradientClipping)
    fresh = MixtureOfVAEs.mlp(3, 10, 16, 2, "bernoulli", 0)
    opacus = dpsgd.PrivateTrainer(
        fresh, torch.optim.Adam(fresh.parameters(), 1e-3), dpsgd.DpSgdConfig(1.0, 1.0, 0.5, 20)
    )
    with pytest.raises(AssertionError, match="torch's generator"):
        opacus.train(lambda m, b: mixture_loss(m(x[b]), resp[b]), 40, 3, public_seed=1)
