"""DP behaviour through the federation: ledger laws, write-ahead, and the neighbour test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from securegmi.config import SimulationConfig
from securegmi.core.em import mixture_loss
from securegmi.errors import BudgetExceededError, ConfigError, PrivacyError
from securegmi.federation.client import Client
from securegmi.federation.release import ClientPrivacy, Reply
from securegmi.federation.server import Server
from securegmi.federation.transport import InProcessTransport
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer, check_privatisable
from securegmi.privacy.noise import NoiseSource
from securegmi.protocol import FieldKind, FieldSpec, Message, ProtocolSpec, Stage, StageSpec, decode
from securegmi.protocols import dp
from securegmi.simulation.study import client_settings, dp_plan, load_federated_data, new_model
from tests.configs import private_config

from ..doubles import record_counts

CONFIG = private_config(
    rounds=3,
    sample_rate=0.25,
    private_training="em",  # these laws are about the em round shape; test_statistics covers the other
)


def _dp_client(x, spec, ledger_path=None, noise_seed=None, cid="client-0"):  # type: ignore[no-untyped-def]
    data = load_federated_data(CONFIG)
    plan = dp_plan(CONFIG, data)
    return Client(
        cid,
        new_model(CONFIG, data),
        x,
        spec,
        settings=client_settings(CONFIG),
        privacy=ClientPrivacy(plan, CONFIG.dp_batch_normaliser, ledger_path, noise_seed),
        seed=CONFIG.seed,
    )


def _spec(config):  # type: ignore[no-untyped-def]
    data = load_federated_data(config)
    ref = new_model(config, data)
    return dp.build(components=ref.n_components, parameters=ref.parameter_count()), ref


class SpyTransport(InProcessTransport):
    def __init__(self, *args, ledger_dir=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, int]] = []
        self.ledger_dir = ledger_dir
        self.covered_when_sent: list[bool] = []

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        reply = super().deliver(client_id, wire)
        message = decode(reply)
        self.sent.append((client_id, message.round))
        if self.ledger_dir is not None:  # write-ahead: the ledger on disk already covers it
            ledger = json.loads((self.ledger_dir / f"{client_id}.json").read_text())
            rounds = {(e["name"], e["round"]) for e in ledger["entries"]}
            self.covered_when_sent.append({("counts", message.round), ("dpsgd", message.round)} <= rounds)
        return reply


@pytest.mark.slow
def test_planned_rounds_fit_and_the_next_is_refused_with_nothing_sent(tmp_path):
    data = load_federated_data(CONFIG)
    spec, _ = _spec(CONFIG)
    clients = {
        f"client-{i}": _dp_client(c.x_train, spec, tmp_path / f"client-{i}.json", cid=f"client-{i}")
        for i, c in enumerate(data.clients)
    }
    server = Server(spec)
    transport = SpyTransport(
        server.endpoint, {cid: c.endpoint for cid, c in clients.items()}, ledger_dir=tmp_path
    )
    for t in range(CONFIG.rounds):
        exchange = transport.exchange({cid: server.broadcast(t, 1.0) for cid in clients})
        assert not exchange.refused
        server.aggregate(exchange.replies)
    assert transport.covered_when_sent and all(transport.covered_when_sent)
    spent = [c.ledger.spent for c in clients.values()]  # type: ignore[union-attr]
    assert max(spent) <= CONFIG.epsilon * (1 + 1e-6) and min(spent) > 0.99 * CONFIG.epsilon

    before = len(transport.sent)
    exchange = transport.exchange({cid: server.broadcast(CONFIG.rounds, 1.0) for cid in clients})
    assert exchange.refused == dict.fromkeys(clients, "refused by the client (BudgetExceededError)")
    assert len(transport.sent) == before  # the spy saw zero messages from the refused round
    with pytest.raises(BudgetExceededError, match="nothing was sent"):  # the client's own reason
        clients["client-0"].handle(server.broadcast(CONFIG.rounds, 1.0))
    on_disk = json.loads((tmp_path / "client-0.json").read_text())
    assert len(on_disk["entries"]) == 2 * CONFIG.rounds  # the refused round was not committed


def test_a_dp_client_refuses_directly_too():
    spec, _ = _spec(CONFIG)
    plan = dp_plan(CONFIG, load_federated_data(CONFIG))
    client = _dp_client(load_federated_data(CONFIG).clients[0].x_train, spec)
    for t in range(1, CONFIG.rounds + 1):  # the whole budget spent by other rounds
        client.policy.ledger = client.policy.ledger.check(plan.round_entries(t))  # type: ignore[union-attr]
    with pytest.raises(BudgetExceededError):
        client.handle(Server(spec).broadcast(0, 1.0))


def neighbour_violations(spec: ProtocolSpec, on_d: Message, on_d_minus: Message) -> list[str]:
    """Every outgoing field must be bitwise identical on neighbours, or a DP release naming an event."""
    problems = []
    for name in sorted(set(on_d.payload) | set(on_d_minus.payload)):
        a, b = on_d.payload.get(name), on_d_minus.payload.get(name)
        if a is None or b is None:
            problems.append(f"{name}: present on one neighbour only")
            continue
        same = a.kind is b.kind and np.array_equal(getattr(a, "value", None), getattr(b, "value", None))
        if same:
            continue
        declared = spec.stage(on_d.stage).field(name)
        if declared is None or declared.kind is not FieldKind.DP_RELEASE or not getattr(a, "event", ""):
            problems.append(f"{name}: differs between neighbours but is not a declared DP release")
    return problems


def _round_on(x: np.ndarray, spec: ProtocolSpec, noise_seed=1, plant=None, exact=None):  # type: ignore[no-untyped-def]
    """One client round; identical noise across calls unless noise_seed is None (private).
    `plant` wraps the client's release policy (a negative control); `exact`, a list, receives
    the soft counts before their noise."""
    client = _dp_client(x, spec, noise_seed=noise_seed)
    seen = record_counts(client.policy) if exact is not None else []
    if plant is not None:
        client.policy = plant(client.policy)
    reply = client.handle(Server(spec).broadcast(0, 2.0))
    if exact is not None:
        exact += seen
    return client, reply


@pytest.mark.slow
def test_neighbour_test_passes_for_the_dp_protocol():
    spec, _ = _spec(CONFIG)
    x = load_federated_data(CONFIG).clients[0].x_train
    exact_d: list[np.ndarray] = []
    exact_dm: list[np.ndarray] = []
    client_d, on_d = _round_on(x, spec, exact=exact_d)
    _, on_dm = _round_on(x[:-1], spec, exact=exact_dm)
    assert neighbour_violations(spec, on_d, on_dm) == []
    for name, field in on_d.payload.items():
        assert client_d.ledger.covers(field.event), name  # type: ignore[union-attr]
    # The count release: the pre-noise difference is within the declared L2 sensitivity of 1.
    (counts_d,), (counts_dm,) = exact_d, exact_dm  # one count release each
    assert 0 < np.linalg.norm(counts_d - counts_dm) <= 1.0 + 1e-6


class CountingPolicy:
    """A policy that also discloses the record count, declared public (a lie)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def respond(self, round_index, stage, inbound):  # type: ignore[no-untyped-def]
        reply = self.inner.respond(round_index, stage, inbound)
        count = np.array([float(len(self.inner.learner.x))])
        return Reply(reply.stage, {**reply.values, "n_samples": count}, reply.events)


@pytest.mark.slow
def test_neighbour_test_catches_a_protocol_that_also_sends_the_sample_count():
    base, _ = _spec(CONFIG)
    update = base.stage(Stage.UPDATE)
    planted = ProtocolSpec(
        "planted",
        "dp plus a raw count declared public (a lie)",
        (
            base.stage(Stage.START),
            base.stage(Stage.BROADCAST),
            StageSpec(
                Stage.UPDATE,
                "client",
                (*update.fields, FieldSpec("n_samples", FieldKind.PUBLIC, (1,), "float64", "claimed public")),
            ),
        ),
        release="dp",
        codec="clear",
    ).bind(**base.dims)
    x = load_federated_data(CONFIG).clients[0].x_train
    _, on_d = _round_on(x, planted, plant=CountingPolicy)
    _, on_dm = _round_on(x[:-1], planted, plant=CountingPolicy)
    planted.validate(on_d, sender_role="client", sender="client-0")  # it is "declared"...
    assert neighbour_violations(planted, on_d, on_dm) == [
        "n_samples: differs between neighbours but is not a declared DP release"
    ]


def _clipped_sum_differences(clip_declared: float, clip_actual: float) -> list[float]:
    torch.manual_seed(0)
    data = load_federated_data(CONFIG)
    model = new_model(CONFIG, data)
    x = torch.as_tensor(data.clients[0].x_train)
    resp = torch.softmax(torch.randn(len(x), 3), 1)
    trainer = PrivateTrainer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        DpSgdConfig(1.0, clip_actual, 0.5, 16.0),
        NoiseSource(11),  # seeded: the same samples in every run of the test
    )

    def loss(module, idx):  # type: ignore[no-untyped-def]
        return mixture_loss(module(x[idx]), resp[idx])

    diffs = []
    for step in range(4):
        batch = trainer.poisson_batch(len(x))
        # The last record removed (every position: test_record_randomness).
        batch_minus = batch[batch != len(x) - 1]
        torch.manual_seed(100 + step)
        with_record = trainer.clipped_sum(loss, batch)
        torch.manual_seed(100 + step)
        without = trainer.clipped_sum(loss, batch_minus)
        diffs.append(
            float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(with_record, without, strict=True))))
        )
        trainer.step(loss, batch)
    assert any(d > 0 for d in diffs)  # the removed record was sampled at least once
    return [d / clip_declared for d in diffs]


@pytest.mark.slow
def test_each_dp_sgd_step_moves_by_at_most_the_clipping_norm():
    assert max(_clipped_sum_differences(clip_declared=1.0, clip_actual=1.0)) <= 1.0 + 1e-5


@pytest.mark.slow
def test_the_clipping_check_catches_a_trainer_that_clips_less_than_it_declares():
    assert max(_clipped_sum_differences(clip_declared=1.0, clip_actual=1e6)) > 1.0


def test_a_module_opacus_cannot_privatise_is_refused_with_the_fix():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(PrivacyError, match="GroupNorm"):
        check_privatisable(module)


@pytest.mark.parametrize(
    "layer", [torch.nn.Dropout(0.1), torch.nn.Dropout2d(0.1), torch.nn.AlphaDropout(0.1)]
)
def test_dropout_is_refused_since_its_masks_are_drawn_by_batch_position(layer):
    with pytest.raises(PrivacyError, match="position in its batch"):
        check_privatisable(torch.nn.Sequential(torch.nn.Linear(4, 4), layer))
    check_privatisable(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))  # negative control


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "dp"}, "needs a budget"),
        ({"epsilon": 8.0}, "must be 'dp' or 'secure'"),
        ({"protocol": "dp", "epsilon": 8.0, "method": "fedem-weights"}, "raw sample count"),
        ({"protocol": "dp", "epsilon": 8.0, "method": "local"}, "sends nothing"),
        ({"protocol": "dp", "epsilon": 8.0, "sample_rate": 0.0}, "sample_rate"),
    ],
)
def test_unsafe_privacy_configurations_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**kwargs)


@pytest.mark.slow
def test_noise_is_private_unless_a_test_seeds_it():
    spec, _ = _spec(CONFIG)
    x = load_federated_data(CONFIG).clients[0].x_train

    def released(noise_seed):  # type: ignore[no-untyped-def]
        _, message = _round_on(x, spec, noise_seed=noise_seed)
        return {name: f.value for name, f in message.payload.items()}  # type: ignore[union-attr]

    a, b = released(None), released(None)  # same run seed, noise from OS entropy
    assert not np.array_equal(a["masses"], b["masses"])
    assert not np.array_equal(a["weighted_components"], b["weighted_components"])
    c, d = released(7), released(7)  # negative control: seeded noise is reproducible
    assert np.array_equal(c["masses"], d["masses"])
    assert np.array_equal(c["weighted_components"], d["weighted_components"])


def test_a_ledger_is_not_continued_under_another_noise_source(tmp_path):
    """A run resumed with seeded noise must not go on under a ledger whose first link says its
    releases were private; the same noise setting continues (negative control)."""
    spec, _ = _spec(CONFIG)
    x = load_federated_data(CONFIG).clients[0].x_train
    path = tmp_path / "client-0.json"
    _dp_client(x, spec, path).handle(Server(spec).broadcast(0, 1.0))
    assert json.loads(path.read_text())["noise"] == "private"
    with pytest.raises(PrivacyError, match="used private noise, this client draws seeded"):
        _dp_client(x, spec, path, noise_seed=7)
    assert _dp_client(x, spec, path).ledger.entries  # type: ignore[union-attr]
