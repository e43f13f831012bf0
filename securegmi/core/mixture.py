"""K VAEs in ONE module, so that a joint per-sample gradient covers every component.

Holding all components in a single module is what lets DP-SGD clip each sample's gradient
jointly over the K components: one subsampled Gaussian mechanism per step, not K (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from securegmi.core.vae import VAE, Likelihood
from securegmi.errors import ConfigError

ComponentFactory = Callable[[], VAE]


# Importance samples of the held-out log-likelihood bound every report quotes (NLL).
IWAE_SAMPLES = 64


class MixtureOfVAEs(nn.Module):
    """K independent VAE components with a shared architecture."""

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
        self.components = nn.ModuleList(components)

    @classmethod
    def from_factory(cls, factory: ComponentFactory, components: int, seed: int) -> MixtureOfVAEs:
        """K components from `factory`, each initialised under its own public seed: the first
        symmetry breaker (DESIGN §1), and every party derives the same initialisation."""
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
        """The built-in mixture of MLP VAEs (`VAE.mlp`)."""
        return cls.from_factory(lambda: VAE.mlp(data_dim, hidden, latent, likelihood), components, seed)

    def check(self, data_dim: int) -> None:
        """ConfigError if the components do not fit records of `data_dim` values."""
        self.component(0).check(data_dim)

    @property
    def n_components(self) -> int:
        return len(self.components)

    def component(self, k: int) -> VAE:
        vae = self.components[k]
        assert isinstance(vae, VAE)
        return vae

    def forward(self, x: Tensor) -> Tensor:
        """The (batch, K) matrix of per-sample ELBOs, one column per component."""
        return self.elbo_matrix(x)

    def _draws(self, x: Tensor, samples: int) -> Tensor:
        """(batch, K, samples, latent) standard normals for every component at once, record by
        record: a record's draws never depend on which other records share its batch (the
        coupling that DP's neighbour analysis and its test rely on).

        numpy fills arrays sequentially; torch's CPU randn fills in vectorised blocks, so its
        first n-1 values change with n. One torch draw seeds numpy, so torch's global seed still
        determines everything.
        """
        seed = int(torch.randint(0, 2**62, (1,)).item())
        shape = (x.shape[0], self.n_components, samples, self.component(0).latent)
        eps = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return torch.from_numpy(eps).to(device=x.device, dtype=x.dtype)

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
        return sum(p.numel() for p in self.component(0).parameters())

    def get_component_vectors(self) -> np.ndarray:
        """The (K, P) float32 matrix of flattened component parameters."""
        rows = [
            parameters_to_vector(self.component(k).parameters()).detach().cpu().numpy()
            for k in range(self.n_components)
        ]
        return np.stack(rows).astype(np.float32)

    def set_component_vectors(self, vectors: np.ndarray) -> None:
        if vectors.shape != (self.n_components, self.parameter_count()):
            raise ConfigError(
                f"expected component vectors of shape {(self.n_components, self.parameter_count())},"
                f" got {vectors.shape}"
            )
        with torch.no_grad():
            for k in range(self.n_components):
                vector_to_parameters(
                    torch.as_tensor(vectors[k], dtype=torch.float32),
                    self.component(k).parameters(),
                )


def divide_aggregate(sums: np.ndarray, masses: np.ndarray, current: np.ndarray) -> np.ndarray:
    """theta_k = S_k / W_k (DESIGN §1); a component nobody sent (W_k = 0) keeps `current`."""
    out = np.array(current, dtype=np.float32, copy=True)
    present = masses > 0
    out[present] = sums[present] / masses[present, None]
    return out.astype(np.float32)
