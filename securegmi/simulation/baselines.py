"""The references that exchange no messages: each client alone, centralised EM, the oracle
that knows every record's source, and the central-DP curator."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from securegmi.core import fine_clusters as fc
from securegmi.core.em import fixed_point_pi, infer_mixture, log_prior, mixture_loss, responsibilities
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import e_step_elbo, train_components
from securegmi.errors import ConfigError
from securegmi.federation.distillation import CLASSIFIER_SEED, ClassifierRole, pooled_prior
from securegmi.federation.local import LocalLearner, derive_seed, seed_torch
from securegmi.federation.statistics import SENSITIVITY
from securegmi.privacy.accounting import PRIMARY
from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.privacy.mechanisms import gaussian_release
from securegmi.privacy.noise import NoiseSource
from securegmi.simulation.recorder import Recorder
from securegmi.simulation.study import client_settings, dp_plan, new_model
from securegmi.vocabulary import EventName


def run_local(recorder: Recorder) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    config, data = recorder.config, recorder.data
    settings = client_settings(config)
    clients = [
        LocalLearner(f"client-{i}", c.x_train, new_model(config, data), settings, config.seed)
        for i, c in enumerate(data.clients)
    ]
    for t in range(config.rounds):
        t0 = time.perf_counter()
        for client in clients:
            client.em_round(t, recorder.temperature(t))
        recorder.finish_round(t, t0, [c.model for c in clients], [c.pi for c in clients])
    return [c.model for c in clients], [c.pi for c in clients]


def run_oracle(recorder: Recorder) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    """The upper reference: component k trained on exactly the pooled records of source k, and
    each client's pi its training records' source shares (floored like every method's). It
    knows what no method can, the hidden source of every record, so it bounds what finding
    the components (EM, federation, privacy) can reach with these VAEs."""
    config, data = recorder.config, recorder.data
    model = new_model(config, data)
    k = model.n_components
    pooled = np.concatenate([c.x_train for c in data.clients])
    truth = torch.as_tensor(np.concatenate([c.source_train for c in data.clients]), dtype=torch.long)
    assignment = torch.nn.functional.one_hot(truth, k).float()
    pis = []
    for client in data.clients:
        shares = np.maximum(
            np.bincount(client.source_train, minlength=k) / len(client.source_train), config.pi_floor
        )
        pis.append(shares / shares.sum())
    optimiser = torch.optim.Adam(model.parameters(), lr=config.step_size)
    for t in range(config.rounds):
        t0 = time.perf_counter()
        train_components(
            model,
            pooled,
            assignment,
            optimiser,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            generator=seed_torch(config.seed, t),
        )
        recorder.finish_round(t, t0, [model] * len(pis), pis)
    return [model] * len(pis), pis


def run_central_em(recorder: Recorder) -> tuple[list[MixtureOfVAEs], list[np.ndarray]]:
    """Centralised EM on the pooled training data, each client's pi still its own prior: the
    same algorithm as fedgmi with no network between the records (not an upper bound: it
    still has to find the components, and can find worse ones than the federation does)."""
    config, data = recorder.config, recorder.data
    model = new_model(config, data)
    k = model.n_components
    pis = [np.full(k, 1.0 / k) for _ in data.clients]
    pooled = np.concatenate([c.x_train for c in data.clients])
    optimiser = torch.optim.Adam(model.parameters(), lr=config.step_size)
    for t in range(config.rounds):
        t0 = time.perf_counter()
        rng = seed_torch(config.seed, t)
        resps = []
        for i, client in enumerate(data.clients):
            elbo = e_step_elbo(model, client.x_train, config.elbo_samples)
            r, _, pis[i] = infer_mixture(
                elbo, pis[i], recorder.temperature(t), config.e_step_iterations, config.pi_floor
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
        recorder.finish_round(t, t0, [model] * len(pis), pis)
    return [model] * len(pis), pis


def run_central_dp(
    recorder: Recorder,
) -> tuple[list[MixtureOfVAEs], list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """The central-DP reference (docs/design.md §2): the same plan at the same (epsilon, delta) per
    record, run by one trusted curator over the pooled records. Every sum gets its noise once
    (sigma = noise multiplier x sensitivity); each client's histogram row is still one release
    of that client's records, so it carries the same noise as in the federation; DP-SGD runs on
    the pooled records with the same steps, sample rate and noise multiplier.

    Returns the model, the released pis, each site's own pi (given the curator's released
    identifier, the EM fixed point on its own records from its released pi, as a federated
    client's `own_pi`: the comparison stays fair) and the privacy summary."""
    config, data = recorder.config, recorder.data
    plan = dp_plan(config, data)
    if not isinstance(plan, PrivateMixturePlan):
        raise ConfigError(
            "the central-DP reference runs the statistics design: set private_training=statistics"
        )
    stats = plan.statistics
    noise = NoiseSource()
    rng = noise.generator
    k = config.model_components
    sketch = fc.public_sketch(data.data_dim, stats.sketch_dim, stats.sketch_seed)
    spheres = [fc.on_sphere(c.x_train, stats.centre, sketch) for c in data.clients]

    def release(total: np.ndarray, name: EventName) -> np.ndarray:
        return gaussian_release(total, stats.noise_multiplier(name), SENSITIVITY[name], rng)

    weights = stats.moments_weights
    total = release(np.sum([fc.moments_contribution(u, weights) for u in spheres], axis=0), EventName.MOMENTS)
    projection = fc.Projection.from_moments(total, stats.sketch_dim, stats.projection_dim, weights)
    zs = [projection(u) for u in spheres]
    centroids = fc.initial_centroids(stats.clusters, stats.projection_dim, config.seed)
    for i in range(stats.iterations):
        total = release(
            np.sum([fc.cluster_contribution(z, centroids) for z in zs], axis=0), EventName.CLUSTERS
        )
        floor = 3.0 * stats.cluster_noise * fc.CLUSTER_SENSITIVITY
        centroids = fc.update_centroids(total, centroids, floor, config.seed + i + 1)
    counts = np.stack([release(fc.histogram(z, centroids), EventName.HISTOGRAM) for z in zs])
    grouping = fc.group_clusters(counts, k, config.seed)
    identifier = fc.FineClusterModel(
        stats.centre, sketch, projection, centroids, grouping.cluster_given_component
    )
    pis = [np.maximum(p, config.pi_floor) / np.maximum(p, config.pi_floor).sum() for p in grouping.pi]


    def pooled_responsibilities() -> torch.Tensor:
        return torch.cat(
            [
                responsibilities(
                    torch.as_tensor(identifier.log_likelihood(c.x_train), dtype=torch.float32), log_prior(pi)
                )
                for c, pi in zip(data.clients, pis, strict=True)
            ]
        )

    resp = pooled_responsibilities()
    if plan.identifier_steps:  # the federation's classifier phase, by one curator at full noise
        role = ClassifierRole(
            np.concatenate(spheres),
            plan,
            k,
            derive_seed(config.seed, CLASSIFIER_SEED),
            noise,
            grouping.sizes,
        )
        for _ in plan.identifier_rounds:
            role.step(role.share(resp))
        prior = pooled_prior(grouping.pi, grouping.sizes)
        identifier = replace(identifier, classifier=role.classifier(prior))
        resp = pooled_responsibilities()
    model = new_model(config, data)
    pooled = np.concatenate([c.x_train for c in data.clients])
    # The divisor of the noisy sum: the expected batch, from the released record count.
    normaliser = max(1.0, plan.sample_rate * float(grouping.sizes.sum()))
    trainer = PrivateTrainer(
        model,
        torch.optim.Adam(model.parameters(), lr=config.step_size),
        DpSgdConfig(plan.sgd_noise_multiplier, plan.clip_norm, plan.sample_rate, normaliser),
        noise=noise,
    )
    x = torch.as_tensor(pooled)

    def per_sample_loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return mixture_loss(module(x[batch]), resp[batch])

    t0 = time.perf_counter()
    trainer.train(per_sample_loss, len(x), plan.steps_per_round * plan.vae_rounds, public_seed=config.seed)
    recorder.identifier = identifier
    recorder.finish_round(0, t0, [model] * len(pis), pis)
    ledger = PrivacyLedger("central", PrivacyBudget(plan.epsilon, plan.delta)).check(
        [e for r in range(plan.rounds) for e in plan.round_entries(r)]
    )
    summary = {
        "target": plan.epsilon,
        "delta": plan.delta,
        "accountant": str(PRIMARY),
        "max_spent": ledger.spent,
        "max_spent_rdp": ledger.spent_rdp,
        "placement": "central",
        "secure_rng": True,  # ChaCha20 keyed from OS entropy (privacy.noise)
        "noise": "private",
        "identifier_steps": plan.identifier_steps,
        "identifier_noise_multiplier": plan.identifier_noise_multiplier,
    }
    own = [
        fixed_point_pi(torch.as_tensor(identifier.log_likelihood(c.x_train)), pi, config.pi_floor)
        for c, pi in zip(data.clients, pis, strict=True)
    ]
    return [model] * len(pis), pis, own, summary
