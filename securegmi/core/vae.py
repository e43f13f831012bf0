"""A small MLP variational autoencoder: the density estimator of one inherent distribution."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from securegmi.errors import ConfigError

Likelihood = Literal["bernoulli", "gaussian"]

_LOG_2PI = math.log(2.0 * math.pi)


def decoded_log_likelihood(out: Tensor, x: Tensor, likelihood: Likelihood) -> Tensor:
    """log p(x | decoder output), summed over data dimensions; `out` may carry leading
    dimensions beyond x's, which broadcasts against it."""
    if likelihood == "bernoulli":
        nll: Tensor = F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
        return -nll.sum(-1)
    mean, log_scale = out.chunk(2, dim=-1)
    log_scale = log_scale.clamp(-5.0, 5.0)
    log_density: Tensor = -0.5 * (((x - mean) / log_scale.exp()) ** 2 + 2.0 * log_scale + _LOG_2PI)
    return log_density.sum(-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_standard_normal(e: Tensor) -> Tensor:
    """log N(e; 0, I), summed over the last dimension."""
    return -0.5 * (e.pow(2) + _LOG_2PI).sum(-1)


class MlpEncoder(nn.Module):
    """x -> [mu | logvar]: one hidden ReLU layer and two linear heads."""

    def __init__(self, data_dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return torch.cat([self.to_mu(h), self.to_logvar(h)], dim=-1)


class VAE(nn.Module):
    """Gaussian-latent VAE around any encoder and decoder, with a Bernoulli (intensities in
    [0, 1]) or Gaussian decoder likelihood.

    Records are flat vectors (batch, D); a module that wants images reshapes inside.
      encoder: (batch, D) -> (batch, 2 * latent), the posterior's [mu | log-variance];
      decoder: (batch, latent) -> (batch, D) Bernoulli logits, or (batch, 2 * D) [mean |
               log-scale] for a Gaussian likelihood (per sample, so that per-sample gradients,
               Opacus, see only ordinary batched layers).
    `check` runs both once and says what is wrong with a module that does not fit.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent: int, likelihood: Likelihood) -> None:
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ConfigError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if latent < 1:
            raise ConfigError(f"latent must be a positive dimension, got {latent}")
        self.latent = latent
        self.likelihood: Likelihood = likelihood
        self.encoder = encoder
        self.decoder = decoder

    @classmethod
    def mlp(cls, data_dim: int, hidden: int, latent: int, likelihood: Likelihood) -> VAE:
        """The built-in component: one hidden layer each way, Linear and ReLU only, so Opacus can
        privatise it (no BatchNorm) and the same module trains with or without DP-SGD."""
        out_dim = data_dim if likelihood == "bernoulli" else 2 * data_dim
        encoder = MlpEncoder(data_dim, hidden, latent)
        decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        return cls(encoder, decoder, latent, likelihood)

    def check(self, data_dim: int) -> None:
        """Run the encoder and decoder once on zeros; raise ConfigError naming the wrong shape."""
        with torch.no_grad():
            try:
                code = self.encoder(torch.zeros(2, data_dim))
            except Exception as exc:
                raise ConfigError(f"the encoder fails on a (batch, {data_dim}) input: {exc}") from exc
            if tuple(code.shape) != (2, 2 * self.latent):
                raise ConfigError(
                    f"the encoder must map (batch, {data_dim}) to (batch, {2 * self.latent}) = "
                    f"[mu | logvar] for latent={self.latent}; it returned {tuple(code.shape)}"
                )
            out_dim = data_dim if self.likelihood == "bernoulli" else 2 * data_dim
            try:
                out = self.decoder(torch.zeros(2, self.latent))
            except Exception as exc:
                raise ConfigError(f"the decoder fails on a (batch, {self.latent}) input: {exc}") from exc
            if tuple(out.shape) != (2, out_dim):
                raise ConfigError(
                    f"a {self.likelihood} decoder must map (batch, {self.latent}) to (batch, {out_dim});"
                    f" it returned {tuple(out.shape)}"
                )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), summed over data dimensions; z may carry leading sample dimensions,
        folded into the batch so that a user's decoder only ever sees (batch, latent)."""
        out = self.decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)
        return decoded_log_likelihood(out, x, self.likelihood)

    def elbo(self, x: Tensor, samples: int = 1, eps: Tensor | None = None) -> Tensor:
        """Per-sample evidence lower bound in nats, averaged over `samples` latent draws.

        `eps` (batch, samples, latent) are the standard-normal draws, batch-major, so that each
        record's draws are its own whatever else is in the batch; drawn here if not given.
        With one draw every tensor keeps the batch on dimension 0, as Opacus' hooks require.
        """
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        if eps is None:
            eps = torch.randn((mu.shape[0], samples, mu.shape[1]), device=mu.device, dtype=mu.dtype)
        if eps.shape[1] == 1:
            rec = self.log_likelihood(x, mu + std * eps[:, 0])
        else:
            z = mu + std * eps.transpose(0, 1)
            rec = self.log_likelihood(x, z).mean(0)
        return rec - kl_to_standard_normal(mu, logvar)

    def iwae(self, x: Tensor, samples: int, eps: Tensor | None = None) -> Tensor:
        """Importance-weighted bound log (1/S) sum_s p(x, z_s) / q(z_s | x) (Burda et al. 2016).

        Tighter than the ELBO; used for scoring held-out likelihood, never for training.
        """
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        if eps is None:
            eps = torch.randn((mu.shape[0], samples, mu.shape[1]), device=mu.device, dtype=mu.dtype)
        e = eps.transpose(0, 1)
        z = mu + std * e
        # log q(z | x) = log N(e; 0, I) - sum(logvar) / 2: the change of variables z = mu + std e.
        log_w = (
            self.log_likelihood(x, z) + log_standard_normal(z) - log_standard_normal(e) + 0.5 * logvar.sum(-1)
        )
        return torch.logsumexp(log_w, dim=0) - math.log(samples)
