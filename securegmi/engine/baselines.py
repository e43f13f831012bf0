"""The two references that exchange no messages: each client alone, and centralised EM."""

from __future__ import annotations

import time

import numpy as np
import torch

from securegmi.core.em import infer_mixture
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import e_step_elbo, train_components
from securegmi.engine.client import FedGMIClient
from securegmi.engine.loop import Loop, client_settings, new_model
from securegmi.engine.seeding import seed_torch
from securegmi.protocol import ProtocolSpec

_NO_MESSAGES = ProtocolSpec("none", "local training: nothing is sent", ())


def run_local(loop: Loop) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    config, data = loop.config, loop.data
    settings = client_settings(config)
    clients = [
        FedGMIClient(f"client-{i}", c.x_train, new_model(config, data), settings, _NO_MESSAGES, config.seed)
        for i, c in enumerate(data.clients)
    ]
    for t in range(config.rounds):
        t0 = time.perf_counter()
        for client in clients:
            client.local_round(t, loop.temperature(t))
        loop.finish_round(t, t0, [c.model for c in clients], [c.pi for c in clients])
    return [c.model for c in clients], [c.pi for c in clients]


def run_oracle(loop: Loop) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    """Centralised EM on the pooled training data, each client's pi still its own prior: the
    upper reference that federation and privacy can at best match."""
    config, data = loop.config, loop.data
    model = new_model(config, data)
    k = model.n_components
    pis = [np.full(k, 1.0 / k) for _ in data.clients]
    pooled = np.concatenate([c.x_train for c in data.clients])
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for t in range(config.rounds):
        t0 = time.perf_counter()
        rng = seed_torch(config.seed, t)
        resps = []
        for i, client in enumerate(data.clients):
            elbo = e_step_elbo(model, client.x_train, config.elbo_samples)
            r, _, pis[i] = infer_mixture(
                elbo, pis[i], loop.temperature(t), config.e_step_iterations, config.pi_floor
            )
            resps.append(r)
        train_components(
            model,
            pooled,
            torch.cat(resps),
            optimiser,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            generator=rng,
        )
        loop.finish_round(t, t0, [model] * len(pis), pis)
    return [model] * len(pis), pis
