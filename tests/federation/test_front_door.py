"""Bring your own, through `import securegmi` alone: the default private design's plan, the
protocol bound from it, `run_federation`, `save`, and scoring records from your own loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from torch import nn

import securegmi
from securegmi import (
    VAE,
    Client,
    ClientPrivacy,
    ConfigError,
    DataError,
    MixtureOfVAEs,
    PrivacyBudget,
    ProtocolViolation,
    Server,
    TrainedMixture,
)
from securegmi.config import SimulationConfig
from securegmi.protocol import Message, encode
from securegmi.simulation.study import Federation

SITES, K, LATENT = 4, 2, 3


def component() -> VAE:
    encoder = nn.Sequential(nn.Linear(64, 24), nn.GroupNorm(4, 24), nn.ELU(), nn.Linear(24, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 24), nn.ELU(), nn.Linear(24, 64))
    return VAE(encoder, decoder, LATENT, "bernoulli")


def sites(records: int = 40) -> list[np.ndarray]:
    """Site i holds mostly 0s or mostly 7s, in proportions that differ by site."""
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    rng = np.random.default_rng(0)
    zeros, sevens = np.flatnonzero(y == 0), np.flatnonzero(y == 7)
    out = []
    for i in range(SITES):
        n0 = int(records * (0.15 + 0.7 * (i % 2)))
        rows = np.concatenate([rng.choice(zeros, n0), rng.choice(sevens, records - n0)])
        out.append(x[rows])
    return out


def private_plan(**kwargs):  # type: ignore[no-untyped-def]
    return securegmi.calibrate_statistics(
        PrivacyBudget(8.0, 1e-5), clients=SITES, features=64, vae_rounds=1, local_epochs=1, **kwargs
    )


def private_federation(tmp_path: Path) -> tuple[list[Client], Server]:
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    plan = private_plan()
    spec = securegmi.bind_protocol("dp", reference, plan=plan, clients=SITES)
    clients = [
        Client(f"site-{i}", reference, x, spec, privacy=ClientPrivacy(plan, 16.0, slot=i, cohort=SITES))
        for i, x in enumerate(sites())
    ]
    return clients, Server(spec, transcript_path=tmp_path / "server.jsonl")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Client]]:
    work = tmp_path_factory.mktemp("byo")
    clients, server = private_federation(work)
    run = securegmi.run_federation(clients, server)
    assert run.rounds == clients[0].plan.rounds  # type: ignore[union-attr]
    return securegmi.save(work / "run", clients, server), clients


def test_the_statistics_plan_from_public_sizes_is_the_one_a_simulation_makes():
    """The front door's plan and `simulate`'s for the same public settings are one plan, and it
    spends the budget."""
    plan = securegmi.calibrate_statistics(PrivacyBudget(4.0, 1e-5), clients=6, features=64, seed=3)
    config = SimulationConfig(clients=6, epsilon=4.0, protocol="dp", seed=3, samples_per_client=60)
    assert Federation.build(config).plan == plan
    assert 0.98 * 4.0 <= plan.planned_epsilon() <= 4.0 * (1 + 1e-6)


def test_a_statistics_plan_needs_the_cohort_size_to_bind_its_protocol():
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    with pytest.raises(ConfigError, match="clients="):
        securegmi.bind_protocol("dp", reference, plan=private_plan())
    spec = securegmi.bind_protocol("dp", reference, plan=private_plan(), clients=SITES)
    # The bound protocol declares the plan's minimum cohort, which the Server then enforces.
    assert spec.dims["N"] == SITES and Server(spec).cohort_minimum["moments"] == SITES
    with pytest.raises(ConfigError, match="below"):
        Server(spec, cohort_minimum={"moments": SITES - 1})


def test_two_clients_built_from_one_object_train_their_own_copies():
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    before = reference.get_component_vectors().copy()
    spec = securegmi.bind_protocol("plain", reference)
    a, b = (Client(f"site-{i}", reference, x, spec) for i, x in enumerate(sites()[:2]))
    a.handle(Server(spec).broadcast(0, 1.0))  # a round of local training at site-0
    assert not np.array_equal(a.components.get_component_vectors(), before)
    assert np.array_equal(b.components.get_component_vectors(), before)
    assert np.array_equal(reference.get_component_vectors(), before)
    # Negative control: one module held twice shares its weights, which the copy prevents.
    shared = [reference, reference]
    shared[0].set_component_vectors(before + 1)
    assert np.array_equal(shared[1].get_component_vectors(), before + 1)


def test_the_server_sends_and_accepts_on_its_own_and_refuses_an_undeclared_reply(tmp_path):
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    spec = securegmi.bind_protocol("plain", reference)
    server = Server(spec, transcript_path=tmp_path / "t.jsonl")
    client = Client("site-0", reference, sites()[0], spec)
    reply = server.accept("site-0", client.receive(server.send("site-0", server.broadcast(0, 1.0))))
    assert reply.stage == "update" and "weighted_components" in reply.payload
    payload = {**reply.payload, "extra": reply.payload["masses"]}  # a field the protocol does not declare
    forged = Message("update", 0, "site-0", payload, run=reply.run)
    with pytest.raises(ProtocolViolation):
        server.accept("site-0", encode(forged))
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"delivered", "rejected"}


def test_run_federation_ends_with_every_client_holding_the_final_aggregate():
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    spec = securegmi.bind_protocol("plain", reference)
    clients = [Client(f"site-{i}", reference, x, spec) for i, x in enumerate(sites())]
    after_training: list[np.ndarray] = []

    def progress(t: int, outcome: securegmi.RoundOutcome) -> None:
        assert len(outcome.replies) == SITES and not outcome.refused and not outcome.rejected
        after_training[:] = [c.components.get_component_vectors() for c in clients]

    server = Server(spec)
    run = securegmi.run_federation(clients, server, rounds=2, temperature=4.0, progress=progress)
    assert run.rounds == 2 and run.uplink_bytes > 0
    # A federation runs once (review 28: a second pass replayed round 0 and failed obscurely).
    with pytest.raises(ConfigError, match="already played up to round 2"):
        securegmi.run_federation(clients, server, rounds=2)
    # Each client trained its own copy in the last round; `conclude` replaced it by the average.
    assert not np.allclose(after_training[0], after_training[1])
    final = [c.components.get_component_vectors() for c in clients]
    assert all(np.array_equal(final[0], v) for v in final[1:])
    assert not np.array_equal(final[0], after_training[0])


def test_run_federation_plays_over_the_transport_it_is_given():
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    spec = securegmi.bind_protocol("plain", reference)
    clients = [Client(f"site-{i}", reference, x, spec) for i, x in enumerate(sites()[:2])]
    server = Server(spec)
    carried: list[set[str]] = []

    class Counting(securegmi.InProcessTransport):
        def exchange(self, outgoing):  # type: ignore[no-untyped-def]
            carried.append(set(outgoing))
            return super().exchange(outgoing)

    transport = Counting.linking(server, clients)
    assert isinstance(transport, securegmi.Transport)
    securegmi.run_federation(clients, server, rounds=3, transport=transport)
    assert carried == [{"site-0", "site-1"}] * 3


def test_run_federation_refuses_a_length_other_than_the_plan_and_a_plain_run_without_one(tmp_path):
    clients, server = private_federation(tmp_path)
    with pytest.raises(ConfigError, match="calibrated for"):
        securegmi.run_federation(clients, server, rounds=3)
    plain = securegmi.bind_protocol("plain", MixtureOfVAEs.from_factory(component, K, seed=0))
    with pytest.raises(ConfigError, match="rounds="):
        securegmi.run_federation([Client("a", clients[0].components, sites()[0], plain)], Server(plain))


def test_a_saved_run_of_your_own_loop_passes_the_audit(saved_run):
    run_dir, _ = saved_run
    report = securegmi.audit(run_dir)
    assert report.ok, report.problems
    assert len(report.budgets) == SITES and all(b.epsilon <= 8.0 * (1 + 1e-6) for b in report.budgets)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "own" and config["clients"] == SITES


def _em_federation(tmp_path: Path, *, rounds: int, steps_per_round: int) -> tuple[list[Client], Server]:
    """The em design over the sites, run to its end under the public API."""
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    plan = securegmi.calibrate(
        PrivacyBudget(8.0, 1e-5), rounds=rounds, steps_per_round=steps_per_round, sample_rate=0.25
    )
    spec = securegmi.bind_protocol("dp", reference, plan=plan)
    clients = [
        Client(f"s{i}", reference, x, spec, privacy=ClientPrivacy(plan, 16.0)) for i, x in enumerate(sites())
    ]
    server = Server(spec, transcript_path=tmp_path / "t.jsonl")
    securegmi.run_federation(clients, server)
    return clients, server


def test_an_em_design_run_of_your_own_loop_saves_and_passes_its_audit(tmp_path):
    clients, server = _em_federation(tmp_path, rounds=2, steps_per_round=4)
    report = securegmi.audit(securegmi.save(tmp_path / "run", clients, server))
    assert report.ok, report.problems
    assert json.loads((tmp_path / "run" / "config.json").read_text())["private_training"] == "em"


def test_a_client_of_your_own_refuses_a_delta_not_well_below_one_over_its_records():
    """simulate's rule, on the bring-your-own path (review 28: delta 0.5 ran, saved and passed
    the audit): at delta near 1/n a mechanism may publish a record outright. The message does
    not print the client's size. Negative control: the same plan at delta 1e-5 is accepted."""
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    x = sites(records=40)[0]

    def client(delta: float) -> Client:
        plan = securegmi.calibrate(PrivacyBudget(8.0, delta), rounds=1, steps_per_round=4, sample_rate=0.25)
        spec = securegmi.bind_protocol("dp", reference, plan=plan)
        return Client("s0", reference, x, spec, privacy=ClientPrivacy(plan, 16.0))

    with pytest.raises(ConfigError, match="not well below 1/n") as caught:
        client(0.5 / len(x))
    assert str(len(x)) not in str(caught.value)
    client(1e-5)


def test_an_em_plan_config_json_cannot_express_is_refused_by_save_not_recorded_as_another(tmp_path):
    """config.json records DP-SGD steps as local_epochs x round(1/q): 6 steps at q = 1/4 would
    be written as 1 epoch (4 steps), a plan the audit would then re-derive and accept."""
    clients, server = _em_federation(tmp_path, rounds=1, steps_per_round=6)
    with pytest.raises(ConfigError, match="multiple of 4"):
        securegmi.save(tmp_path / "run", clients, server)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_secure_split_noise_run_of_your_own_loop_exports_on_the_release_grid(tmp_path):
    """Under CKKS the server holds the public context only, the noise is split, and what the
    saved run exports lies on the grid its aggregates were released on, as a simulated run's."""
    from safetensors.numpy import load_file

    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    plan = private_plan(placement="split")
    spec = securegmi.bind_protocol("secure", reference, plan=plan, clients=SITES)
    keys = securegmi.SecretContext.generate(securegmi.CkksParameters.for_cohort(SITES))
    clients = [
        Client(
            f"s{i}", reference, x, spec, privacy=ClientPrivacy(plan, 16.0, slot=i, cohort=SITES), keys=keys
        )
        for i, x in enumerate(sites())
    ]
    server = Server(spec, keys.public(), transcript_path=tmp_path / "t.jsonl")
    securegmi.run_federation(clients, server)
    run_dir = securegmi.save(tmp_path / "run", clients, server)
    report = securegmi.audit(run_dir)
    assert report.ok, report.problems
    assert all(b.epsilon_fallback > b.epsilon for b in report.budgets)  # split: the collusion figure
    grid = server.release_grid()
    assert grid is not None
    for name, values in load_file(str(run_dir / "model.safetensors")).items():
        steps = values.astype(np.float64) / grid
        assert np.allclose(steps, np.round(steps), atol=1e-3), name


def test_a_tampered_ledger_of_a_saved_run_fails_its_audit(saved_run, tmp_path):
    """Negative control: the audit checks a bring-your-own run as strictly as a simulated one."""
    import shutil

    run_dir = shutil.copytree(saved_run[0], tmp_path / "tampered")
    ledger = run_dir / "ledgers" / "site-1.json"
    data = json.loads(ledger.read_text())
    data["entries"] = data["entries"][:-1]  # the last release forgotten: the chain still verifies
    ledger.write_text(json.dumps(data))
    report = securegmi.audit(run_dir)
    assert not report.ok and any("site-1" in p for p in report.problems)


def test_a_saved_run_loads_with_your_factory_and_scores_as_the_client_does(saved_run):
    run_dir, clients = saved_run
    with pytest.raises(ConfigError, match="components=my_component"):
        securegmi.load(run_dir)
    loaded = securegmi.load(run_dir, components=component)
    site = sites()[1]
    live = TrainedMixture(clients[0].components, clients[0].pi, clients[0].identifier, data_dim=64)
    np.testing.assert_allclose(loaded.estimate_pi(site), live.estimate_pi(site), atol=1e-6)
    assert (loaded.assign(site) == live.assign(site)).all()
    assert loaded.training_pi.shape == (SITES, K)


def test_a_trained_mixture_from_your_loop_refuses_raw_pixels_as_a_client_does():
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    model = TrainedMixture(reference, np.full(K, 1 / K), data_dim=64)
    raw = sites()[0] * 16
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        model.estimate_pi(raw)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Client("a", reference, raw, securegmi.bind_protocol("plain", reference))
    assert model.estimate_pi(raw / 16).shape == (K,)


def test_save_refuses_a_server_without_a_transcript_and_a_used_directory(tmp_path):
    reference = MixtureOfVAEs.from_factory(component, K, seed=0)
    spec = securegmi.bind_protocol("plain", reference)
    clients = [Client(f"site-{i}", reference, x, spec) for i, x in enumerate(sites()[:2])]
    bare = Server(spec)
    securegmi.run_federation(clients, bare, rounds=1)
    with pytest.raises(ConfigError, match="transcript_path"):
        securegmi.save(tmp_path / "run", clients, bare)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    kept = Server(spec, transcript_path=tmp_path / "t.jsonl")
    with pytest.raises(ConfigError, match="aggregated no round"):
        securegmi.save(tmp_path / "run", clients, kept)
    clients = [Client(f"site-{i}", reference, x, spec) for i, x in enumerate(sites()[:2])]
    securegmi.run_federation(clients, kept, rounds=1)
    with pytest.raises(securegmi.RunDirectoryError, match="already holds a run"):
        securegmi.save(tmp_path / "used", clients, kept)
    report = securegmi.audit(securegmi.save(tmp_path / "run", clients, kept))
    # A plain run's audit reports its unprotected fields, and nothing else.
    assert report.problems and all("without protection" in p for p in report.problems), report.problems


def test_a_private_client_without_settings_takes_dp_sgds_step_size_as_simulate_does():
    """The default plan takes five full-batch steps: at the non-private step size (2e-3) they
    would leave the components where they started."""
    reference = MixtureOfVAEs.from_factory(component, components=K, seed=0)
    plan = private_plan()
    spec = securegmi.bind_protocol("dp", reference, plan=plan, clients=SITES)
    private = Client("a", reference, sites()[0], spec, privacy=ClientPrivacy(plan, 16.0, cohort=SITES))
    assert private.learner.settings.learning_rate == SimulationConfig().dp_learning_rate == 0.05
    # Control: a client outside DP keeps the non-private default.
    plain = Client("a", reference, sites()[0], securegmi.bind_protocol("plain", reference, clients=SITES))
    assert plain.learner.settings.learning_rate == 2e-3
