"""A client's own pi (`Client.own_pi`): the EM fixed point of pi on its own records under the
released model, its own output under the billboard lemma. Nothing that leaves a client may
depend on it, the run's model keeps the released pi, and it is what the harness labels each
site's test records with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from securegmi.core.em import mixture_estimate, responsibilities
from securegmi.federation.client import Client
from securegmi.federation.driver import run_federation
from securegmi.federation.local import LocalLearner
from securegmi.federation.transport import InProcessTransport
from securegmi.protocol import decode, encode
from securegmi.records.rundir import CHECKPOINT, CLIENT_STATES
from securegmi.records.trained import load
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation, load_federated_data
from tests.configs import private_config

# Seeded (test-only) noise: two runs of one study draw the same releases, byte for byte.
DESIGNS = {
    "statistics": private_config("dp", epsilon=8.0, dp_noise="seeded"),
    # The em design has no identifier: its own pi scores the records with the VAEs' ELBOs.
    "em": private_config("dp", epsilon=8.0, dp_noise="seeded", private_training="em", rounds=3),
}

OWN_PI = Client.own_pi  # the shipped method, which the runs below replace by spies around it


def adopting_own_pi(client: Client) -> np.ndarray:
    """The broken variant of the saved-model test: a client that takes its own pi as its pi."""
    own = OWN_PI(client)
    client.learner.pi = own
    return own


def leaking_own_pi(client: Client) -> np.ndarray:
    """The broken variant of the uplink test: a client whose uploads from now on weight its
    components by its own pi (w = n~ pi_own) instead of its released one."""
    own = OWN_PI(client)
    upload = LocalLearner.upload.__get__(client.learner)

    def leaked(masses: np.ndarray) -> dict[str, np.ndarray]:
        return upload(own * float(np.maximum(masses, 0.0).sum()))

    client.learner.upload = leaked  # type: ignore[method-assign]
    return own


class Recording(InProcessTransport):
    """The in-process transport, keeping every reply's bytes; `before` runs ahead of each delivery."""

    def __init__(self, server, clients, before: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(server, clients)
        self.before = before
        self.replies: list[bytes] = []

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        self.before()
        answer = super().deliver(client_id, wire)
        # The run id is the server's fresh draw per run: the one part two runs cannot share.
        self.replies.append(encode(dataclasses.replace(decode(answer), run="")))
        return answer


def _uplink(design: str, own_pi: Callable[[Client], np.ndarray] | None) -> tuple[list[bytes], list[dict]]:
    """Every reply and every ledger entry of a seeded run of `design`; with `own_pi`, every
    client computes it before every message any client handles, and once more at the end."""
    federation = Federation.build(DESIGNS[design])
    clients = [federation.client(i, None) for i in range(len(federation.client_ids))]
    server = federation.server(None)

    def estimate() -> None:
        for client in clients:
            if own_pi is not None:
                own_pi(client)

    transport = Recording(server.endpoint, {c.client_id: c.endpoint for c in clients}, estimate)
    run_federation(clients, server, transport=transport)
    estimate()
    return transport.replies, [c.ledger.to_json() for c in clients if c.ledger is not None]


@pytest.mark.parametrize("design", DESIGNS)
def test_nothing_that_leaves_a_client_depends_on_its_own_pi(design):
    replies, entries = _uplink(design, None)
    with_own, entries_own = _uplink(design, OWN_PI)
    assert replies and entries and all(ledger["entries"] for ledger in entries)
    assert with_own == replies  # every uplink message, byte for byte
    assert entries_own == entries
    # Negative control: a client that puts its own pi into its uploads is caught.
    broken, _ = _uplink(design, leaking_own_pi)
    assert len(broken) == len(replies) and broken != replies


# Ten clients of the synthetic study: enough for its statistics to find the sources (with the
# three of DESIGNS every record lands in one fine cluster and every pi at a vertex).
STUDY = dataclasses.replace(DESIGNS["statistics"], clients=10, seed=1)


def _recorded_run(config, out, own_pi):  # type: ignore[no-untyped-def]
    """Run `config` into `out` with `Client.own_pi` replaced by `own_pi`; every own pi by client
    id, the result, the saved model's pi and the clients' saved (released) pi."""
    own: dict[str, np.ndarray] = {}

    def recorded(client: Client) -> np.ndarray:
        own[client.client_id] = own_pi(client)
        return own[client.client_id]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Client, "own_pi", recorded)
        result = run_simulation(config, out=out)
    saved = load_file(str(out / CHECKPOINT))["pi"]
    states = [load_file(str(out / CLIENT_STATES / f"{cid}.safetensors"))["pi"] for cid in own]
    return own, result, saved, np.stack(states)


@pytest.fixture(scope="module")
def study(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("own-pi") / "run"
    return out, *_recorded_run(STUDY, out, OWN_PI)


def _em_step(scores: torch.Tensor, pi: np.ndarray, floor: float) -> np.ndarray:
    """One EM update of pi on frozen scores, written out here from its definition."""
    r = responsibilities(scores.double(), torch.log(torch.as_tensor(pi, dtype=torch.float64)))
    return mixture_estimate(r.sum(0).numpy(), floor)


def test_own_pi_is_the_em_fixed_point_on_the_clients_own_records(study):
    out, own, _, _, released = study
    identifier = load(out).identifier
    records = [c.x_train for c in load_federated_data(STUDY).clients]
    assert identifier is not None and len(own) == len(records) == STUDY.clients
    for i, x in enumerate(records):
        mine, scores = own[f"client-{i}"], torch.as_tensor(identifier.log_likelihood(x))
        assert np.abs(mine.sum() - 1.0) < 1e-12 and mine.min() >= STUDY.pi_floor * 0.99
        assert np.abs(_em_step(scores, mine, STUDY.pi_floor) - mine).max() < 1e-8
        # Controls: the released pi it starts from is no fixed point, nor is another client's.
        assert np.abs(_em_step(scores, released[i], STUDY.pi_floor) - released[i]).max() > 1e-4
        theirs = own[f"client-{(i + 1) % len(records)}"]
        assert np.abs(_em_step(scores, theirs, STUDY.pi_floor) - theirs).max() > 1e-4


def test_the_run_saves_the_released_pi_and_evaluates_the_own_pi(study, tmp_path):
    """model.safetensors keeps each client's released pi (its saved state's); the harness scores
    each site's records with the pi the site estimated for itself."""
    _, own, result, saved, released = study
    assert np.array_equal(saved, released)
    assert np.abs(saved - np.stack(list(own.values()))).max() > 1e-2
    for row in result.evaluation.per_client:  # results.json's estimate, up to the source matching
        np.testing.assert_allclose(
            sorted(row["pi_estimate"]), sorted(own[f"client-{row['client']}"]), atol=1e-4
        )
    # Negative control: a client that adopts its own pi gets it saved in the model.
    broken, _, saved, released = _recorded_run(STUDY, tmp_path / "broken", adopting_own_pi)
    assert np.array_equal(saved, np.stack(list(broken.values())))
    assert np.abs(saved - released).max() > 1e-2


def test_the_own_pi_is_closer_to_the_truth(study):
    """The released pi's error (the last round's metrics row scores it) against the own pi's
    (the final evaluation), on the same run; source accuracy no worse."""
    result = study[2]
    last = result.history[-1]
    assert result.evaluation.pi_tv_error < last.pi_tv_error - 0.005, (result.evaluation, last)
    assert result.evaluation.source_accuracy >= last.source_accuracy - 0.002


def test_own_pi_of_the_em_design_is_the_fixed_point_of_its_elbos():
    """Without an identifier the VAEs' ELBOs score the records; the estimate does not change the
    client's model, its training mode or torch's generator."""
    federation = Federation.build(DESIGNS["em"])
    clients = [federation.client(i, None) for i in range(len(federation.client_ids))]
    run_federation(clients, federation.server(None))
    client = clients[0]
    client.components.train()
    before = client.components.get_component_vectors()
    state = torch.random.get_rng_state()
    own = client.own_pi()
    assert client.components.training and torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(client.components.get_component_vectors(), before)
    assert np.array_equal(client.own_pi(), own)  # its draws are public, from a fixed context
    floor = client.learner.settings.pi_floor
    torch.manual_seed(1)
    client.components.eval()
    with torch.no_grad():
        scores = client.components.elbo_matrix(torch.as_tensor(client.learner.x), 64)
    # Other draws than its own: a fixed point within Monte Carlo error, and not the released pi's.
    assert np.abs(_em_step(scores, own, floor) - own).max() < 2e-2
    assert np.abs(own - client.pi).max() > 2e-2
