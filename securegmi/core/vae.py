"""A small MLP variational autoencoder: the density estimator of one inherent distribution."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Likelihood = Literal["bernoulli", "gaussian"]

_LOG_2PI = math.log(2.0 * math.pi)


class VAE(nn.Module):
    """Gaussian-latent VAE with a Bernoulli (intensities in [0, 1]) or Gaussian decoder.

    Only Linear layers and element-wise activations: every layer is one Opacus can privatise
    (no BatchNorm), so the same module trains with or without DP-SGD.
    """

    def __init__(self, data_dim: int, hidden: int, latent: int, likelihood: Likelihood) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.latent = latent
        self.likelihood: Likelihood = likelihood
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        # The Gaussian decoder also outputs a per-dimension log-scale, computed per sample so that
        # per-sample gradients (Opacus) see only ordinary batched layers.
        out_dim = data_dim if likelihood == "bernoulli" else 2 * data_dim
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), summed over data dimensions; z may carry leading sample dimensions."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            nll: Tensor = F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
            return -nll.sum(-1)
        mean, log_scale = out.chunk(2, dim=-1)
        log_scale = log_scale.clamp(-5.0, 5.0)
        log_density: Tensor = -0.5 * (((x - mean) / log_scale.exp()) ** 2 + 2.0 * log_scale + _LOG_2PI)
        return log_density.sum(-1)

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
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return rec - kl

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
        log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)
        log_qz = -0.5 * (e.pow(2) + logvar + _LOG_2PI).sum(-1)
        log_w = self.log_likelihood(x, z) + log_pz - log_qz
        return torch.logsumexp(log_w, dim=0) - math.log(samples)
