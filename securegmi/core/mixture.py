"""K VAEs in ONE module, so that a joint per-sample gradient covers every component.

Holding all components in a single module is what lets DP-SGD clip each sample's gradient
jointly over the K components: one subsampled Gaussian mechanism per step, not K (docs/design.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from securegmi.core.batched import BatchedLinear
from securegmi.core.latent import draw_context, record_keyed_normals
from securegmi.core.vae import (
    VAE,
    Likelihood,
    MlpEncoder,
    decoded_log_likelihood,
    kl_to_standard_normal,
    log_standard_normal,
)
from securegmi.errors import ConfigError, DataError

ComponentFactory = Callable[[], VAE]


# Importance samples of the held-out log-likelihood bound every report quotes (NLL).
IWAE_SAMPLES = 64
# ELBO draws when a trained model assigns records to components once and for all. Training's
# E-step takes few draws (`elbo_samples`), since it re-estimates every round; a final assignment
# is made once, and Monte Carlo noise in a few-draw ELBO flips records near a boundary
# (figures: bench/results/tuning.md#score-samples).
SCORE_SAMPLES = 64
# Records scored at a time: one record's draws take K x draws x features floats (128 MNIST
# records at K = 5: 128 MB), so a whole site's records at once could exhaust memory.
SCORE_BLOCK = 128


def score_in_blocks(score: Callable[[Tensor], Tensor], x: np.ndarray, seed: int) -> np.ndarray:
    """`score` (records -> (block, K)) over `x` a block at a time, without gradients. Every
    block's public context comes from `seed` (core.latent), so a record's draws are the same
    whichever block it falls in; torch's global generator is left as it was, so scoring never
    moves the draws of whatever the caller does next."""
    blocks = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i in range(0, len(x), SCORE_BLOCK):
            torch.manual_seed(seed)
            blocks.append(score(torch.as_tensor(x[i : i + SCORE_BLOCK])))
    out: np.ndarray = torch.cat(blocks).numpy()
    return out


class MixtureOfVAEs(nn.Module):
    """K independent VAE components with a shared architecture, each its own submodule.

    Subclasses may hold the same components in another layout (`FusedMlpMixture`); every
    party sees them through this interface, and `get_component_vectors` flattens component k
    as `VAE.parameters()` would, whatever the layout.
    """

    def __init__(self, components: Sequence[VAE]) -> None:
        super().__init__()
        if len(components) < 1:
            raise ConfigError("a mixture needs at least one component")
        for k, vae in enumerate(components):
            if not isinstance(vae, VAE):
                raise ConfigError(f"component {k} is a {type(vae).__name__}, not a securegmi VAE")
        first = components[0]
        shapes = [tuple(p.shape) for p in first.parameters()]
        for k, vae in enumerate(components):
            # The server adds flattened parameter vectors: every component must flatten alike.
            if [tuple(p.shape) for p in vae.parameters()] != shapes or (vae.latent, vae.likelihood) != (
                first.latent,
                first.likelihood,
            ):
                raise ConfigError(
                    f"component {k} differs from component 0 in its parameter shapes, latent size or "
                    "likelihood: all components must share one architecture"
                )
        self.latent = first.latent
        self.likelihood: Likelihood = first.likelihood
        self.n_components = len(components)
        self._parameter_count = sum(p.numel() for p in first.parameters())
        self._hold(components)

    def _hold(self, components: Sequence[VAE]) -> None:
        self.components = nn.ModuleList(components)

    @classmethod
    def from_factory(cls, factory: ComponentFactory, components: int, seed: int) -> MixtureOfVAEs:
        """K components from `factory`, each initialised under its own public seed: the first
        symmetry breaker (docs/design.md §1), and every party derives the same initialisation."""
        if components < 1:
            raise ConfigError(f"components must be >= 1, got {components}")
        generator_state = torch.random.get_rng_state()
        vaes = []
        try:
            for k in range(components):
                torch.manual_seed(seed * 1_000_003 + k)
                vaes.append(factory())
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(vaes)

    @classmethod
    def mlp(
        cls, components: int, data_dim: int, hidden: int, latent: int, likelihood: Likelihood, seed: int
    ) -> MixtureOfVAEs:
        """The built-in mixture of MLP VAEs (`VAE.mlp`), fused into batched layers: the same
        initialisation, maths and parameter vectors as K separate `VAE.mlp` modules."""
        return FusedMlpMixture.from_factory(
            lambda: VAE.mlp(data_dim, hidden, latent, likelihood), components, seed
        )

    def check(self, data_dim: int) -> None:
        """ConfigError if the components do not fit records of `data_dim` values."""
        self.component(0).check(data_dim)

    def check_records(self, x: np.ndarray) -> None:
        """DataError if (n, D) records `x` lie outside what the decoder models (a Bernoulli
        decoder models intensities in [0, 1]): scores of such records would mean nothing."""
        if self.likelihood == "bernoulli" and len(x) and (x.min() < 0 or x.max() > 1):
            raise DataError(
                f"a Bernoulli decoder models intensities in [0, 1]; the records span [{x.min():g}, "
                f"{x.max():g}]: rescale them, or build the components with likelihood='gaussian'"
            )

    def component(self, k: int) -> VAE:
        vae = self.components[k]
        if not isinstance(vae, VAE):  # a subclass that holds its components otherwise
            raise ConfigError(f"component {k} is a {type(vae).__name__}, not a securegmi VAE")
        return vae

    def forward(self, x: Tensor) -> Tensor:
        """The (batch, K) matrix of per-sample ELBOs, one column per component."""
        return self.elbo_matrix(x)

    def _draws(self, x: Tensor, samples: int) -> Tensor:
        """(batch, K, samples, latent) standard normals for every component at once, each
        record's a function of that record and a public context alone (`core.latent`), never of
        its position among the other records: the sensitivity DP-SGD and the soft counts
        declare rests on it (docs/design.md §2, law 1).

        The context is one draw from torch's global generator, which the caller seeds from
        public values (run seed, round, client, step); one call, one context.
        """
        return record_keyed_normals(x, draw_context(), (self.n_components, samples, self.latent))

    def elbo_matrix(self, x: Tensor, samples: int = 1) -> Tensor:
        eps = self._draws(x, samples)
        return torch.stack(
            [self.component(k).elbo(x, samples, eps[:, k]) for k in range(self.n_components)], dim=1
        )

    def iwae_matrix(self, x: Tensor, samples: int) -> Tensor:
        eps = self._draws(x, samples)
        return torch.stack(
            [self.component(k).iwae(x, samples, eps[:, k]) for k in range(self.n_components)], dim=1
        )

    def parameter_count(self) -> int:
        """Number of parameters of ONE component (all components share the architecture)."""
        return self._parameter_count

    def get_component_vectors(self) -> np.ndarray:
        """The (K, P) float32 matrix of flattened component parameters."""
        rows = [
            parameters_to_vector(self.component(k).parameters()).detach().cpu().numpy()
            for k in range(self.n_components)
        ]
        return np.stack(rows).astype(np.float32)

    def _check_vectors(self, vectors: np.ndarray) -> None:
        if vectors.shape != (self.n_components, self.parameter_count()):
            raise ConfigError(
                f"expected component vectors of shape {(self.n_components, self.parameter_count())},"
                f" got {vectors.shape}"
            )

    def set_component_vectors(self, vectors: np.ndarray) -> None:
        self._check_vectors(vectors)
        with torch.no_grad():
            for k in range(self.n_components):
                vector_to_parameters(
                    torch.as_tensor(vectors[k], dtype=torch.float32),
                    self.component(k).parameters(),
                )


def _linear_layers(vae: VAE) -> list[nn.Linear] | None:
    """A built-in VAE.mlp component's five linear layers in `parameters()` order; None for any
    other architecture."""
    encoder, decoder = vae.encoder, vae.decoder
    if not (
        isinstance(encoder, MlpEncoder)
        and [type(m) for m in encoder.body] == [nn.Linear, nn.ReLU]
        and isinstance(decoder, nn.Sequential)
        and [type(m) for m in decoder] == [nn.Linear, nn.ReLU, nn.Linear]
    ):
        return None
    layers = [encoder.body[0], encoder.to_mu, encoder.to_logvar, decoder[0], decoder[2]]
    return [layer for layer in layers if isinstance(layer, nn.Linear)]


class FusedMlpMixture(MixtureOfVAEs):
    """K built-in MLP VAEs (`VAE.mlp`) held as five `BatchedLinear` layers, one per layer of the
    component, so that every layer of all K components is one matrix product.

    A loop over K separate modules pays Python and autograd overhead per layer per component,
    and DP-SGD pays Opacus' per-sample hooks on each of them: fused, a DP-SGD epoch takes about
    half the time (bench/results/tuning.md#fused-mixture). The maths, the
    initialisation and the component vectors are those of the separate modules (the test
    compares them), so which layout a party runs is invisible on the wire.
    """

    def _hold(self, components: Sequence[VAE]) -> None:
        per_component = [_linear_layers(v) for v in components]
        if any(layers is None for layers in per_component):
            raise ConfigError("FusedMlpMixture holds only built-in VAE.mlp components; use MixtureOfVAEs")
        by_layer = list(zip(*[layers for layers in per_component if layers is not None], strict=True))
        fused = [
            BatchedLinear(torch.stack([m.weight for m in ms]), torch.stack([m.bias for m in ms]))
            for ms in by_layer
        ]
        # In VAE.parameters() order, which get_component_vectors follows.
        self.encode, self.to_mu, self.to_logvar, self.decode, self.to_output = fused

    def _layers(self) -> list[BatchedLinear]:
        return [self.encode, self.to_mu, self.to_logvar, self.decode, self.to_output]

    def component(self, k: int) -> VAE:
        """A separate copy of component k (its parameters are not this module's)."""
        if not 0 <= k < self.n_components:
            raise ConfigError(f"component must be in [0, {self.n_components}), got {k}")
        hidden, data_dim = self.encode.weight.shape[1:]
        vae = VAE.mlp(data_dim, hidden, self.latent, self.likelihood)
        vector_to_parameters(torch.as_tensor(self.get_component_vectors()[k]), vae.parameters())
        return vae

    def _posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, K, latent) posterior means and log-variances of every component."""
        h = F.relu(self.encode(x))
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)  # VAE.encode's clamp

    def _log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p_k(x | z) for z (batch, K, samples, latent): (batch, K, samples). The samples
        fold into the batch; with one draw the layers see (batch, K, .) as Opacus requires."""
        b, k, s, latent = z.shape
        out = self.to_output(F.relu(self.decode(z.transpose(1, 2).reshape(b * s, k, latent))))
        out = out.view(b, s, k, -1).transpose(1, 2)
        return decoded_log_likelihood(out, x[:, None, None, :], self.likelihood)

    def elbo_matrix(self, x: Tensor, samples: int = 1) -> Tensor:
        eps = self._draws(x, samples)
        mu, logvar = self._posterior(x)
        z = mu[:, :, None] + (0.5 * logvar).exp()[:, :, None] * eps
        return self._log_likelihood(x, z).mean(-1) - kl_to_standard_normal(mu, logvar)

    def iwae_matrix(self, x: Tensor, samples: int) -> Tensor:
        """VAE.iwae for every component at once."""
        eps = self._draws(x, samples)
        mu, logvar = self._posterior(x)
        z = mu[:, :, None] + (0.5 * logvar).exp()[:, :, None] * eps
        log_w = (
            self._log_likelihood(x, z)
            + log_standard_normal(z)
            - log_standard_normal(eps)
            + 0.5 * logvar.sum(-1)[:, :, None]
        )
        return torch.logsumexp(log_w, dim=2) - math.log(samples)

    def get_component_vectors(self) -> np.ndarray:
        layers = self._layers()
        rows = [
            torch.cat([t[k].reshape(-1) for layer in layers for t in (layer.weight, layer.bias)])
            for k in range(self.n_components)
        ]
        return torch.stack(rows).detach().cpu().numpy().astype(np.float32)

    def set_component_vectors(self, vectors: np.ndarray) -> None:
        self._check_vectors(vectors)
        values = torch.as_tensor(vectors, dtype=torch.float32)
        offset = 0
        with torch.no_grad():
            for layer in self._layers():
                for t in (layer.weight, layer.bias):
                    size = t[0].numel()
                    t.copy_(values[:, offset : offset + size].reshape(t.shape))
                    offset += size


def divide_aggregate(sums: np.ndarray, masses: np.ndarray, current: np.ndarray) -> np.ndarray:
    """theta_k = S_k / W_k (docs/design.md §1); a component nobody sent (W_k = 0) keeps `current`."""
    out = np.array(current, dtype=np.float32, copy=True)
    present = masses > 0
    out[present] = sums[present] / masses[present, None]
    return out.astype(np.float32)
