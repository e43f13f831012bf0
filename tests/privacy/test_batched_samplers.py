"""The fused mixture is clipped exactly as K separate modules are: same per-sample norms, same
clipped gradient sum, so the DP-SGD mechanism the ledger describes does not depend on the layout."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

from securegmi.core.batched import BatchedLinear
from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.vae import VAE
from securegmi.privacy import batched_samplers, dpsgd
from securegmi.privacy.batched_samplers import register_batched_samplers
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer

K, D = 3, 12
X = torch.rand(24, D, generator=torch.Generator().manual_seed(0))
CLIP = 1.3  # near the median per-sample norm here: some samples clipped, some not
RESP = torch.softmax(torch.randn(24, K, generator=torch.Generator().manual_seed(1)), 1)


def _clipped_sum(model: MixtureOfVAEs, clip_norm: float) -> list[torch.Tensor]:
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DpSgdConfig(1.0, clip_norm, 0.5, 12)
    )
    torch.manual_seed(2)  # the same latent draws for both layouts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = trainer.clipped_sum(lambda m, b: mixture_loss(m(X[b]), RESP[b]), torch.arange(len(X)))
    norms = trainer.module.per_sample_gradient_norms
    assert norms.min() < clip_norm < norms.max()  # clipping is active for some samples only
    return grads


def _fused_as_components(grads: list[torch.Tensor]) -> np.ndarray:
    """(K, P): the fused layers' gradients, flattened per component as VAE.parameters() is."""
    return torch.stack([torch.cat([g[k].reshape(-1) for g in grads]) for k in range(K)]).numpy()


def _separate_as_components(grads: list[torch.Tensor]) -> np.ndarray:
    per = len(grads) // K
    return torch.stack(
        [torch.cat([g.reshape(-1) for g in grads[k * per : (k + 1) * per]]) for k in range(K)]
    ).numpy()


def _layouts() -> tuple[np.ndarray, np.ndarray]:
    fused = MixtureOfVAEs.mlp(K, D, 16, 2, "bernoulli", seed=0)
    separate = MixtureOfVAEs.from_factory(lambda: VAE.mlp(D, 16, 2, "bernoulli"), K, seed=0)
    return (
        _fused_as_components(_clipped_sum(fused, clip_norm=CLIP)),
        _separate_as_components(_clipped_sum(separate, clip_norm=CLIP)),
    )


def test_the_fused_layers_are_clipped_as_the_separate_layers_are():
    fused, separate = _layouts()
    np.testing.assert_allclose(fused, separate, rtol=1e-4, atol=1e-5)


def _halved_output_gradients(shipped: type) -> type:
    class Halved(shipped):  # type: ignore[misc,valid-type]
        def capture_backprops_hook(self, module, inputs, grad_output, **how):  # type: ignore[no-untyped-def]
            return super().capture_backprops_hook(module, inputs, (grad_output[0] / 2,), **how)

    return Halved


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_output_gradient_hooks_give_opacus_full_hook_norms_and_sums(monkeypatch, layout):
    """The trainer hands each layer's output gradient to Opacus by a hook on the output tensor;
    Opacus' own module takes it from a full backward hook. Same norms, same clipped sums."""

    def clipped(module_class: type) -> tuple[np.ndarray, torch.Tensor]:
        monkeypatch.setattr(dpsgd, "_module_class", lambda: module_class)
        model = (
            MixtureOfVAEs.mlp(K, D, 16, 2, "bernoulli", seed=0)
            if layout == "fused"
            else MixtureOfVAEs.from_factory(lambda: VAE.mlp(D, 16, 2, "bernoulli"), K, seed=0)
        )
        trainer = PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DpSgdConfig(1.0, CLIP, 0.5, 12)
        )
        torch.manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads = trainer.clipped_sum(lambda m, b: mixture_loss(m(X[b]), RESP[b]), torch.arange(len(X)))
        return torch.cat([g.reshape(-1) for g in grads]).numpy(), trainer.module.per_sample_gradient_norms

    shipped = dpsgd._module_class()
    ours, our_norms = clipped(shipped)
    stock, stock_norms = clipped(GradSampleModuleFastGradientClipping)
    assert our_norms.min() < CLIP < our_norms.max()  # some samples clipped, some not
    np.testing.assert_array_equal(ours, stock)
    torch.testing.assert_close(our_norms, stock_norms, rtol=0, atol=0)
    # Negative control: the shipped hooks delivering halved output gradients change both.
    halved, halved_norms = clipped(_halved_output_gradients(shipped))
    assert not np.allclose(halved, stock, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(halved_norms, stock_norms)


def _norm_without_bias(layer, activations, backprops):
    norms = batched_samplers._norm_sample(layer, activations, backprops)
    norms[layer.bias] = torch.zeros_like(norms[layer.bias])
    return norms


def _norm_of_one_component(layer, activations, backprops):
    norms = batched_samplers._norm_sample(layer, activations, backprops)  # keeps the pass's tensors
    a = activations[0]
    b2, a2 = backprops[:, 0].pow(2).sum(-1), (a if a.dim() == 2 else a[:, 0]).pow(2).sum(-1)
    return norms | {layer.weight: (b2 * a2).sqrt(), layer.bias: b2.sqrt()}


@pytest.mark.parametrize("broken", [_norm_without_bias, _norm_of_one_component])
def test_negative_control_a_wrong_norm_changes_the_clipped_sum(monkeypatch, broken):
    register_batched_samplers()
    monkeypatch.setitem(GradSampleModuleFastGradientClipping.NORM_SAMPLERS, BatchedLinear, broken)
    fused, separate = _layouts()
    assert not np.allclose(fused, separate, rtol=1e-4, atol=1e-5)


def test_per_sample_gradients_match_functorch():
    """The materialised per-sample gradients (Opacus' hooks mode) against functorch's."""
    register_batched_samplers()

    def per_sample(force_functorch: bool) -> list[torch.Tensor]:
        model = MixtureOfVAEs.mlp(K, D, 16, 2, "gaussian", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=force_functorch)
            torch.manual_seed(2)
            mixture_loss(gsm(X), RESP).sum().backward()
        return [p.grad_sample.clone() for p in model.parameters()]

    for hooks, functorch in zip(per_sample(False), per_sample(True), strict=True):
        np.testing.assert_allclose(hooks.numpy(), functorch.numpy(), rtol=1e-4, atol=1e-5)


def _trainer_sum(one_pass: bool) -> np.ndarray:
    model = MixtureOfVAEs.mlp(K, D, 16, 2, "gaussian", seed=0)
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DpSgdConfig(1.0, CLIP, 0.5, 12)
    )
    assert trainer.one_pass  # the fused mixture is all batched layers
    trainer.one_pass = one_pass
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = trainer.clipped_sum(lambda m, b: mixture_loss(m(X[b]), RESP[b]), torch.arange(len(X)))
    return _fused_as_components(grads)


def test_one_pass_gives_opacus_two_pass_clipped_sum():
    np.testing.assert_allclose(
        _trainer_sum(one_pass=True), _trainer_sum(one_pass=False), rtol=1e-4, atol=1e-5
    )


def test_negative_control_one_pass_without_the_clipping_factors_differs(monkeypatch):
    two_pass = _trainer_sum(one_pass=False)
    unclipped = batched_samplers.add_clipped_sums
    monkeypatch.setattr(dpsgd, "add_clipped_sums", lambda module, c: unclipped(module, torch.ones_like(c)))
    assert not np.allclose(_trainer_sum(one_pass=True), two_pass, rtol=1e-4, atol=1e-5)


def test_a_module_with_other_layers_keeps_opacus_two_passes():
    separate = MixtureOfVAEs.from_factory(lambda: VAE.mlp(D, 16, 2, "bernoulli"), K, seed=0)
    trainer = PrivateTrainer(
        separate, torch.optim.SGD(separate.parameters(), lr=0.1), DpSgdConfig(1.0, 1.0, 0.5, 12)
    )
    assert not trainer.one_pass


def test_a_layer_the_pass_misses_fails_loudly_rather_than_lending_an_earlier_batch(monkeypatch):
    model = MixtureOfVAEs.mlp(K, D, 16, 2, "gaussian", seed=0)
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DpSgdConfig(1.0, CLIP, 0.5, 12)
    )

    def step(batch: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.clipped_sum(lambda m, b: mixture_loss(m(X[b]), RESP[b]), batch)

    trainer.one_pass = False
    step(torch.arange(12))  # Opacus' two passes leave the first pass's tensors behind
    trainer.one_pass = True

    def norms_only(layer, activations, backprops):  # a pass that keeps nothing
        kept = dict(batched_samplers._last_pass)
        norms = batched_samplers._norm_sample(layer, activations, backprops)
        batched_samplers._last_pass.clear()
        batched_samplers._last_pass.update(kept)
        return norms

    monkeypatch.setitem(GradSampleModuleFastGradientClipping.NORM_SAMPLERS, BatchedLinear, norms_only)
    with pytest.raises(KeyError):
        step(torch.arange(12, 24))
    # Negative control: without forgetting first, the earlier batch's tensors would be used.
    forgets_skipped = []
    monkeypatch.setattr(dpsgd, "forget_last_pass", lambda module: forgets_skipped.append(1))
    trainer.one_pass = False
    monkeypatch.setitem(
        GradSampleModuleFastGradientClipping.NORM_SAMPLERS, BatchedLinear, batched_samplers._norm_sample
    )
    step(torch.arange(12))
    trainer.one_pass = True
    monkeypatch.setitem(GradSampleModuleFastGradientClipping.NORM_SAMPLERS, BatchedLinear, norms_only)
    step(torch.arange(12, 24))  # silently summed the wrong batch
    assert forgets_skipped == [1]
