"""The source classifier distilled from the statistics (federation.distillation): one split
DP-SGD step per round on released targets, the noise each share carries, the sensitivity of a
step, and where the classifier is planned, refused, saved and read back."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from securegmi.config import SimulationConfig
from securegmi.core import fine_clusters as fc
from securegmi.core.source_classifier import SourceClassifier
from securegmi.crypto.keys import SecretContext
from securegmi.errors import ConfigError, RunAbortedError
from securegmi.federation.distillation import ClassifierRole
from securegmi.federation.release import StatisticsRelease
from securegmi.federation.server import play_round
from securegmi.federation.transport import InProcessTransport
from securegmi.simulation.study import Federation
from tests.configs import private_config

from ..doubles import record_shares
from .gaussian_scale import assert_scale, has_scale
from .whole_run import play_to_the_end, secure_federation

STEPS = 6
CONFIG = private_config(
    "secure", 8.0, clients=4, hidden=8, min_clients=3, kmeans_iterations=1, identifier_steps=STEPS
)


def _policy(client: object) -> StatisticsRelease:
    policy = client.policy  # type: ignore[attr-defined]
    assert isinstance(policy, StatisticsRelease)
    return policy


@pytest.fixture(scope="module")
def finished():  # type: ignore[no-untyped-def]
    """A whole secure run, with every classifier share and the clipped sum it was drawn on."""
    federation, clients, server, transport = secure_federation(CONFIG)
    shares: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for cid, client in clients.items():  # the classifier's trainer is built at its first step
        policy = _policy(client)
        build = policy._distiller

        def observed(cid=cid, policy=policy, build=build):  # type: ignore[no-untyped-def]
            fresh = policy.distiller is None
            role = build()
            if fresh:
                shares[cid] = record_shares(role.trainer)
            return role

        policy._distiller = observed  # type: ignore[method-assign]
    play_to_the_end(federation, server, transport, clients)
    return federation, clients, shares


def test_one_split_step_per_round_and_every_client_ends_on_the_same_classifier(finished):
    federation, clients, shares = finished
    plan = federation.plan
    assert plan.identifier_steps == STEPS and list(plan.identifier_rounds) == list(
        range(plan.statistics.rounds, plan.statistics.rounds + STEPS)
    )
    assert federation.rounds == plan.statistics.rounds + STEPS + plan.vae_rounds * plan.steps_per_round
    classifiers = [_policy(c).classifier for c in clients.values()]
    assert all(c is not None for c in classifiers)
    first = classifiers[0]
    assert first is not None
    for other in classifiers[1:]:  # one trajectory: every client applied the same sums
        assert other is not None and all(
            np.array_equal(a, b) for a, b in zip(first.arrays(""), other.arrays(""), strict=True)
        )
    for cid, client in clients.items():
        identifier = _policy(client).identifier
        assert identifier is not None and identifier.classifier is not None
        entries = [e for e in client.ledger.entries if e.round in plan.identifier_rounds]
        assert len(entries) == STEPS == len(shares[cid])  # each step one ledger entry, one share
        assert all(e.name == "dpsgd" and e.fallback_json is not None for e in entries)
        assert 0.99 * 8.0 <= client.ledger.spent <= 8.0 * (1 + 1e-6)


def test_each_classifier_share_carries_its_planned_noise(finished):
    """Each share's noise has sd sigma C / sqrt(min_clients - 1), sigma the plan's classifier
    noise multiplier (the ledger's event): a chi-square test that also rejects the scale one
    client short and a share of sigma C / sqrt(min_clients)."""
    federation, _, shares = finished
    noise = np.concatenate([released - pre for s in shares.values() for pre, released in s])
    plan = federation.plan
    claimed = plan.identifier_noise_multiplier * plan.clip_norm / math.sqrt(CONFIG.min_clients - 1)
    assert noise.size > 5000
    assert_scale(noise, claimed)
    assert not has_scale(noise, claimed * math.sqrt(2 / 3))
    assert not has_scale(noise, claimed / 2)


def _role(federation: Federation, u: np.ndarray) -> ClassifierRole:
    from securegmi.privacy.noise import NoiseSource

    return ClassifierRole(u, federation.plan, 3, 0, NoiseSource(1), np.array([100.0]))


def test_a_record_moves_a_classifier_step_by_at_most_the_clipping_norm(finished):
    """The neighbour without record i, for every i, recomputed from scratch: every other
    record's target is unchanged (targets are the record's own and released values'), and the
    clipped gradient sum on the neighbour's own targets moves by at most C. Control: the
    removed records' unclipped gradients exceed C, so the clipping keeps the step within its
    sensitivity."""
    federation, clients, _ = finished
    policy = _policy(next(iter(clients.values())))
    x, c, classifier = policy.learner.x.copy(), federation.plan.clip_norm, policy.classifier
    role = _role(federation, policy.statistics.u)
    policy.classifier, policy.teacher = None, None  # the teacher of the phase: clusters alone
    targets = policy._teacher().clone()
    whole = role.trainer.clipped_sum(role.loss(targets), torch.arange(len(x)))
    unclipped = []
    try:
        for i in range(len(x)):  # every position: a positional draw would show at some
            policy.learner.x, policy.teacher = np.delete(x, i, 0), None
            neighbour = policy._teacher()
            np.testing.assert_array_equal(neighbour.numpy(), np.delete(targets.numpy(), i, 0))
            padded = torch.as_tensor(np.insert(neighbour.numpy(), i, 0.0, axis=0))  # row i unused
            less = role.trainer.clipped_sum(
                role.loss(padded), torch.as_tensor(np.delete(np.arange(len(x)), i))
            )
            moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(whole, less, strict=True)))
            assert float(moved) <= c * (1 + 1e-5)
            record = role.u[i : i + 1]
            loss = -(targets[i : i + 1] * torch.log_softmax(role.module(record), 1)).sum()
            grads = torch.autograd.grad(loss, list(role.module.parameters()))
            unclipped.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))
    finally:
        policy.learner.x, policy.teacher, policy.classifier = x, None, classifier
    assert max(unclipped) > c


def test_a_client_rebuilt_from_its_state_for_every_message_follows_the_same_classifier(tmp_path):
    """As on Flower (a fresh process per message): every client restored from its state file
    before each message ends on the classifier, scores and VAEs of an uninterrupted run, bit for
    bit (seeded test noise). A restore without the classifier's Adam state moved all three (a
    review's mutant); the uninterrupted run is the control."""
    config = replace(CONFIG, clients=3, min_clients=None, identifier_steps=4, dp_noise="seeded")
    federation = Federation.build(config)
    keys = SecretContext.generate(federation.ckks_parameters())

    def run(fresh: bool, where: Path) -> dict[str, Any]:
        paths = {cid: where / f"{cid}.safetensors" for cid in federation.client_ids}
        clients = {
            cid: federation.client(i, keys, state_path=paths[cid] if fresh else None)
            for i, cid in enumerate(federation.client_ids)
        }
        server = federation.server(keys.public())

        class Restoring(InProcessTransport):
            def deliver(self, cid: str, wire: bytes) -> bytes:
                if fresh:
                    i = federation.client_ids.index(cid)
                    clients[cid] = federation.client(i, keys, state_path=paths[cid])
                return clients[cid].receive(wire)

        transport = Restoring.linking(server, clients.values())
        play_to_the_end(federation, server, transport, clients)
        first = clients[federation.client_ids[0]]
        identifier = _policy(first).identifier
        assert identifier is not None and identifier.classifier is not None
        return {
            "classifier": identifier.classifier.arrays(""),
            "scores": identifier.log_likelihood(first.learner.x),
            "vaes": first.components.get_component_vectors(),
        }

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight, restored = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    for name in straight["classifier"]:
        np.testing.assert_array_equal(straight["classifier"][name], restored["classifier"][name])
    np.testing.assert_array_equal(straight["scores"], restored["scores"])
    np.testing.assert_array_equal(straight["vaes"], restored["vaes"])


def test_a_saved_model_keeps_its_classifier_and_one_without_scores_by_the_clusters(finished):
    _, clients, _ = finished
    identifier = _policy(next(iter(clients.values()))).identifier
    assert identifier is not None and identifier.classifier is not None
    x = np.random.default_rng(0).random((7, 10)).astype(np.float32)
    again = fc.FineClusterModel.from_arrays(identifier.arrays())
    np.testing.assert_array_equal(again.log_likelihood(x), identifier.log_likelihood(x))
    older = {k: v for k, v in identifier.arrays().items() if not k.startswith(fc.CLASSIFIER_PREFIX)}
    without = fc.FineClusterModel.from_arrays(older)
    assert without.classifier is None
    ratio = identifier.classifier.log_likelihood_ratio(fc.on_sphere(x, identifier.centre, identifier.sketch))
    np.testing.assert_allclose(without.log_likelihood(x) + ratio, identifier.log_likelihood(x), atol=1e-12)
    assert not np.allclose(without.log_likelihood(x), identifier.log_likelihood(x))  # control


def test_a_classifier_whose_arrays_do_not_fit_is_refused():
    good = SourceClassifier(np.zeros((4, 2)), np.zeros(2), np.zeros((2, 3)), np.zeros(3), np.full(3, 1 / 3))
    assert good.log_posterior(np.zeros((1, 4))).shape == (1, 3)  # control
    with pytest.raises(ConfigError, match="do not fit"):
        SourceClassifier(np.zeros((4, 2)), np.zeros(3), np.zeros((2, 3)), np.zeros(3), np.full(3, 1 / 3))
    with pytest.raises(ConfigError, match="prior"):
        SourceClassifier(np.zeros((4, 2)), np.zeros(2), np.zeros((2, 3)), np.zeros(3), np.array([1.0, 0, 0]))


def test_the_classifier_is_planned_where_the_noise_is_split_and_refused_where_it_is_local():
    secure = SimulationConfig(epsilon=8.0, protocol="secure")
    assert secure.planned_identifier_steps == 40
    assert SimulationConfig(epsilon=8.0, method="central-dp").planned_identifier_steps == 40
    assert SimulationConfig(epsilon=8.0, protocol="dp").planned_identifier_steps == 0
    assert SimulationConfig(epsilon=8.0, protocol="secure", identifier_steps=0).planned_identifier_steps == 0
    with pytest.raises(ConfigError, match="identifier-steps"):  # each gradient would carry all the noise
        SimulationConfig(epsilon=8.0, protocol="dp", identifier_steps=5)
    with pytest.raises(ConfigError, match="identifier-share"):
        SimulationConfig(epsilon=8.0, protocol="dp", identifier_share=0.5)
    # A config.json written before the classifier existed ran without one.
    old = {k: v for k, v in secure.to_dict().items() if k != "identifier_steps"}
    assert SimulationConfig.from_dict(old).planned_identifier_steps == 0
    assert SimulationConfig.from_dict(secure.to_dict()).planned_identifier_steps == 40  # control


def test_a_records_scores_depend_on_that_record_alone(finished):
    """Responsibilities enter DP-SGD as per-record inputs: each record's scores (soft cluster
    weights and classifier) must be its own and released values' only, so removing a record
    changes no other record's scores (a review: weights normalised across the batch moved them
    by 1.5 and passed every test). Control: a record's own scores do depend on it."""
    _, clients, _ = finished
    policy = _policy(next(iter(clients.values())))
    identifier = policy.identifier
    assert identifier is not None and identifier.classifier is not None
    x = policy.learner.x
    scores = identifier.log_likelihood(x)
    for i in (0, len(x) // 2):
        np.testing.assert_allclose(  # BLAS rounds by batch size: 1e-15
            identifier.log_likelihood(np.delete(x, i, axis=0)), np.delete(scores, i, 0)
        )
    assert not np.allclose(identifier.log_likelihood(x[:1] * 0.5 + 0.25), scores[:1])


def test_a_classifier_step_with_fewer_than_min_clients_is_abandoned():
    """A classifier step's split shares are summed only over the plan's minimum cohort (law 3):
    the server refuses a sum of min_clients - 1 of them. Control: the whole cohort is added."""
    federation, clients, server, transport = secure_federation(CONFIG)
    t = federation.plan.statistics.rounds
    for r in range(t):
        play_round(server, transport, list(clients), r, 1.0)
    replies = transport.exchange({cid: server.broadcast(t, 1.0) for cid in clients}).replies
    assert {m.stage for m in replies.values()} == {"identifier_gradient"}
    with pytest.raises(RunAbortedError, match="minimum cohort"):
        server.aggregate(dict(list(replies.items())[: CONFIG.min_clients - 1]))  # type: ignore[operator]
    assert server.aggregate(replies) == {}
