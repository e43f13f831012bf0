"""DP-SGD with Opacus: one front door that wraps the caller's module and optimiser.

Each step is one Poisson-subsampled Gaussian mechanism over the whole module: with all K VAEs
in one module, a sample's gradient is clipped jointly over every component (docs/design.md §1).
The sample rate is public (declared by the protocol) and the noisy gradient sum is divided by a
public normaliser, never by the client's private dataset size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from securegmi.core.batched import BatchedLinear
from securegmi.core.latent import draw_context
from securegmi.errors import ConfigError, PrivacyError
from securegmi.privacy.batched_samplers import (
    add_clipped_sums,
    forget_last_pass,
    only_batched_layers,
    register_batched_samplers,
)
from securegmi.privacy.noise import NoiseSource

PerSampleLoss = Callable[[nn.Module, Tensor], Tensor]  # (module, batch indices) -> (batch,) losses


@dataclass(frozen=True)
class DpSgdConfig:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float  # public Poisson rate, the same for every client
    batch_normaliser: float  # public divisor of the noisy sum (an expected batch size)

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clip_norm <= 0:
            raise ConfigError("noise_multiplier must be >= 0 and clip_norm > 0")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.batch_normaliser <= 0:
            raise ConfigError("batch_normaliser must be positive")

    @property
    def steps_per_epoch(self) -> int:
        """Public: 1/q Poisson batches make one expected pass over the data, whatever its size."""
        return max(1, round(1.0 / self.sample_rate))


def check_privatisable(module: nn.Module) -> None:
    """Refuse, with the reason and the fix, a module Opacus cannot give per-sample gradients."""
    from opacus.validators import ModuleValidator

    dropout = sorted(
        {type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    )
    if dropout:
        # Dropout masks come from torch's global generator, row by row of the batch: a record's
        # mask would depend on its position among the others and on a public seed, so removing
        # one record would move every later record's gradient (docs/design.md §2, law 1).
        raise PrivacyError(
            f"this module cannot be trained with DP-SGD: it holds {', '.join(dropout)}, whose masks are "
            "drawn by a record's position in its batch. Remove the dropout layers (DP-SGD's noise "
            "already regularises)."
        )
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        reasons = "; ".join(sorted({str(e) for e in errors}))
        raise PrivacyError(
            f"this module cannot be trained with DP-SGD: {reasons}. Replace BatchNorm with GroupNorm "
            "or LayerNorm (opacus.validators.ModuleValidator.fix does it), and avoid layers that mix "
            "samples within a batch."
        )


def check_record_randomness(module: nn.Module, records: Tensor) -> None:
    """Refuse a module whose training-mode forward pass draws from torch's global generator
    beyond its one latent context (`core.latent.draw_context`): dropout called as a function,
    RReLU, noise added inside the module. Such draws are handed out by a record's position in
    its batch, so removing one record moves every later record's gradient (docs/design.md §2, law 1;
    measured by a review: F.dropout moved a clipped sum by 4 C). Randomness from a generator of
    the module's own is not seen here: a component must not hold one.
    """
    saved, training = torch.random.get_rng_state(), module.training
    try:
        module.train()
        torch.manual_seed(0)
        with torch.no_grad():
            module(records)
        used = torch.random.get_rng_state()
        torch.manual_seed(0)
        draw_context()
        expected = torch.random.get_rng_state()
    finally:
        torch.random.set_rng_state(saved)
        module.train(training)
    if not torch.equal(used, expected):
        raise PrivacyError(
            "this module cannot be trained with DP-SGD: its forward pass draws random numbers from "
            "torch's global generator (functional dropout, RReLU, noise added inside the module?), "
            "which hands them out by a record's position in its batch. Remove them; the ELBO's "
            "latent draws are the only randomness a component may use, and securegmi supplies them."
        )


@cache
def _optimiser_class() -> type:
    """Opacus' ghost-clipping optimiser, less the copies it makes of tensors it never reuses.

    The noise comes from the trainer's `NoiseSource` (ChaCha20 keyed from OS entropy), never
    from a torch generator: torch's CPU generator keeps 32 bits of its seed (privacy.noise).
    Opacus' own `secure_mode` would need torchcsprng, which does not install with this torch.

    Per step and parameter, Opacus deep-copies the clipped gradient sum into `summed_grad`
    (Python's deep-copy machinery alone took about a tenth of a step on the digits module) and
    allocates a zeros tensor beside each noise draw, discarded unless the noise is zero (on the
    MNIST-5k module the copies and zeros took about 0.9 ms of an 18 ms step; cProfile of
    bench/dp_overhead.py). Here `summed_grad` takes the gradient tensor itself (add_noise then
    gives p.grad a new tensor, and the next step starts from cleared gradients). Given the same
    Gaussian draws, every value is Opacus' own (tests/privacy/test_dpsgd.py compares whole runs
    bit for bit against Opacus' optimiser fed the same draws). Clipping, the noise scale,
    scaling and the step are Opacus'."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class Optimiser(DPOptimizerFastGradientClipping):  # type: ignore[misc]
        noise_source: NoiseSource  # set by PrivateTrainer

        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad.data)
                else:
                    p.summed_grad = p.grad.data

        def add_noise(self) -> None:
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
            if std == 0:  # Opacus draws nothing
                super().add_noise()
                return
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                reference = p.summed_grad
                noise = self.noise_source.normal(std, reference.shape).to(reference.device)
                p.grad = (reference + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return Optimiser


@cache
def _module_class() -> type:
    """Opacus' ghost-clipping module, with each layer's output gradient delivered by a hook on
    the layer's output tensor instead of a full module backward hook.

    A full backward hook wraps every hooked layer's inputs and outputs in identity autograd
    functions on each forward pass; on these small layers that machinery took about a seventh of
    a DP-SGD step (cProfile of bench/dp_overhead.py). The gradient a hook on the output tensor
    receives is the one the full hook passes as grad_output[0] (the layers have one output), and
    Opacus' own `capture_activations_hook` and `capture_backprops_hook` still keep the inputs,
    scale the gradients and take the per-sample norms."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    class Module(GradSampleModuleFastGradientClipping):  # type: ignore[misc]
        def add_hooks(
            self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False
        ) -> None:
            layers = list(self.iterate_submodules(self._module))
            if force_functorch or any(type(m) not in self.NORM_SAMPLERS for m in layers):
                # A layer without a norm sampler needs Opacus' full hooks (and its grad samples).
                super().add_hooks(
                    loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch
                )
                return
            if hasattr(self._module, "autograd_grad_sample_hooks"):
                raise ValueError("Trying to add hooks twice to the same model")
            self._module.autograd_grad_sample_hooks = []
            self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
            hook = partial(self._capture, loss_reduction=loss_reduction, batch_first=batch_first)
            for module in layers:
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(hook))
            self.enable_hooks()

        def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, **how: Any) -> None:
            kept = len(getattr(module, "activations", ()))
            self.capture_activations_hook(module, inputs, output)
            if len(getattr(module, "activations", ())) == kept:
                return  # Opacus skipped this pass (evaluation, no grad, hooks disabled)
            if not isinstance(output, Tensor):
                raise PrivacyError(
                    f"{type(module).__name__} returned {type(output).__name__}, not one tensor"
                )
            if output.requires_grad:
                output.register_hook(  # type: ignore[no-untyped-call]
                    lambda grad: self.capture_backprops_hook(module, None, (grad,), **how)
                )

    return Module


class PrivateTrainer:
    """Trains `module` with DP-SGD (Opacus ghost clipping) on Poisson batches of a tensor.

    `noise` draws both the Gaussian noise and the Poisson samples: secret, from OS entropy,
    unless a test passes a seeded `NoiseSource`."""

    def __init__(
        self,
        module: nn.Module,
        optimiser: torch.optim.Optimizer,
        config: DpSgdConfig,
        noise: NoiseSource | None = None,
    ) -> None:
        check_privatisable(module)
        register_batched_samplers()
        # One backward pass instead of Opacus' two where the clipped sum can be read off the
        # first (privacy.batched_samplers); the norms, the clipping and the noise are Opacus'.
        self.one_pass = only_batched_layers(module)
        self._biases = [m.bias for m in module.modules() if isinstance(m, BatchedLinear)]
        self.config = config
        self.noise = noise if noise is not None else NoiseSource()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            self.module = _module_class()(
                module, max_grad_norm=config.clip_norm, use_ghost_clipping=True, loss_reduction="mean"
            )
            self.optimiser = _optimiser_class()(
                optimiser,
                noise_multiplier=config.noise_multiplier,
                max_grad_norm=config.clip_norm,
                expected_batch_size=config.batch_normaliser,  # public, never len(private data)
                loss_reduction="mean",
            )
            # Every noise draw comes from here, never from Opacus' torch generator (privacy.noise).
            self.optimiser.noise_source = self.noise

    def _accumulate_clipped(self, loss_fn: PerSampleLoss, batch: Tensor) -> None:
        """Leave sum_i clip(g_i) in p.grad (Opacus' ghost clipping norms; the sum from a second
        backward pass, or from the first where `one_pass`), noise not yet added."""
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        # Every path below sets p.grad afresh, so no gradient needs zeroing in place.
        self.optimiser.zero_grad(set_to_none=True)
        if len(batch) > 0:
            losses = loss_fn(self.module, batch)
            with warnings.catch_warnings():
                # Where Opacus' full backward hooks remain (a layer without a norm sampler):
                # inputs never require grad here, and the hooks still fire correctly.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                if self.one_pass:
                    # Opacus' hooks see every layer's output gradient and take every sample's
                    # norm; asking autograd for the biases only skips the weights' gradient sums,
                    # which add_clipped_sums replaces with the clipped ones.
                    forget_last_pass(self.module)
                    torch.autograd.backward(losses.mean(), inputs=self._biases)
                    add_clipped_sums(self.module, self.module.get_clipping_coef())
                else:
                    DPTensorFastGradientClipping(self.module, self.optimiser, losses, "mean").backward()
        else:
            # Nothing sampled: the mechanism still releases noise, so the step is taken on a zero
            # gradient sum rather than skipped (skipping would reveal the empty batch).
            for p in self.module.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def clipped_sum(self, loss_fn: PerSampleLoss, batch: Tensor) -> list[Tensor]:
        """The clipped per-sample gradient sum of `batch` at the current parameters; no step."""
        self._accumulate_clipped(loss_fn, batch)
        grads = [p.grad.detach().clone() for p in self.module.parameters() if p.grad is not None]
        self.optimiser.zero_grad()
        return grads

    def noisy_share(self, loss_fn: PerSampleLoss, batch: Tensor, share: float) -> np.ndarray:
        """This client's part of one split-noise DP-SGD step: its clipped gradient sum over
        `batch` (parameters flattened in order) plus Gaussian noise of standard deviation
        `share` x noise multiplier x clipping norm. Sound only if nothing but the sum over enough
        clients' parts is ever seen (privacy.calibration.PrivateMixturePlan)."""
        grads = self.clipped_sum(loss_fn, batch)
        flat = torch.cat([g.reshape(-1) for g in grads])
        std = share * self.config.noise_multiplier * self.config.clip_norm
        return (flat + self.noise.normal(std, flat.shape)).double().numpy()

    def step(self, loss_fn: PerSampleLoss, batch: Tensor) -> None:
        """One DP-SGD step on the records `batch` (indices); an empty batch still adds noise."""
        self._accumulate_clipped(loss_fn, batch)
        self.optimiser.step()

    def poisson_batch(self, n_records: int) -> Tensor:
        """Every record joins with probability q, independently, by secret draws: subsampling
        amplification assumes nobody can tell whether a given record was drawn."""
        return torch.as_tensor(self.noise.bernoulli(n_records, self.config.sample_rate))

    def train(self, loss_fn: PerSampleLoss, n_records: int, steps: int, public_seed: int) -> None:
        """`steps` DP-SGD steps on Poisson batches.

        Before each step torch's global generator is seeded from `public_seed` and the step's
        index: it gives the step's public randomness (the context of the ELBO's record-keyed
        latent draws, `core.latent`). Seeding per step keeps that a function of the step alone:
        an empty batch draws nothing, so with one seed per run every later step's draws would
        shift with a secret event (which records the Poisson sample missed).
        """
        self.module.train()
        for step in range(steps):
            torch.manual_seed(int(np.random.SeedSequence([public_seed, step]).generate_state(1)[0]))
            self.step(loss_fn, self.poisson_batch(n_records))
