"""One contract over every `ReleasePolicy`, the way dp-accounting runs one accountant test class
over every accountant.

`securegmi.federation.release` promises, for each policy: its replies carry exactly the fields
the protocol's stage declares; under DP every value it releases names the ledger event that
covers it, that entry is committed (the plan's own entries, in order) before the value exists,
a round over budget is refused with nothing released and nothing charged, the values carry
noise, and nothing un-noised is kept in the policy; a message of the wrong stage is refused
before anything is charged; `conclude` takes in an aggregate without charging the ledger; and
`state_arrays` / `load_state` carry a policy into a fresh process unchanged.

Each policy is one subclass of `ReleasePolicyContract`. The contract's checks are functions,
and the last tests run them over deliberately broken policies: each broken one fails the check
that names its fault (the negative controls).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from securegmi.config import SimulationConfig
from securegmi.errors import BudgetExceededError, ProtocolViolation
from securegmi.federation.client import Client
from securegmi.federation.release import (
    CountsRelease,
    PlainRelease,
    ReleasePolicy,
    Reply,
    StatisticsRelease,
)
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.simulation.study import Federation
from securegmi.vocabulary import EventId, FieldName, Stage
from tests.configs import small_config

from ..doubles import record_counts, record_exact

BASE = {"hidden": 4, "latent": 1, "dp_noise": "seeded"}
PRIVATE = {"protocol": "dp", "epsilon": 8.0}
START = {FieldName.TEMPERATURE: np.asarray(1.0)}  # round 0's decoded `start`

PolicyClass = Callable[..., ReleasePolicy]


@dataclass
class Run:
    """A short run of the whole federation (honest clients 1 and 2 beside it), with client 0's
    release policy built by `policy_class` and every reply it made."""

    federation: Federation
    client: Client
    replies: list[tuple[int, Reply]]
    ledger_after: list[tuple[EventId, ...]]  # client 0's ledger ids after each round


def build(config: SimulationConfig) -> Federation:
    return Federation.build(config)


def with_policy(client: Client, policy_class: PolicyClass, noise_seed: int | None = None) -> ReleasePolicy:
    """`client`'s policy rebuilt as `policy_class` (its own learner and privacy plan)."""
    privacy = getattr(client.policy, "privacy", None)
    if privacy is None:
        client.policy = policy_class(client.learner)
    else:
        seed = privacy.noise_seed if noise_seed is None else noise_seed
        client.policy = policy_class(client.learner, replace(privacy, noise_seed=seed))
    return client.policy


def run(config: SimulationConfig, policy_class: PolicyClass, ledger_dir: Path) -> Run:
    federation = build(config)
    clients = [federation.client(i, None, ledger_dir) for i in range(config.clients)]
    policy = with_policy(clients[0], policy_class)
    replies: list[tuple[int, Reply]] = []
    ledgers: list[tuple[EventId, ...]] = []
    respond = policy.respond

    def recorded(round_index: int, stage: str, inbound: Any) -> Reply:
        reply = respond(round_index, stage, inbound)
        replies.append((round_index, reply))
        return reply

    policy.respond = recorded  # type: ignore[method-assign]
    server = federation.server(None)
    for t in range(federation.rounds):
        server.aggregate({c.client_id: c.handle(server.broadcast(t, 1.0)) for c in clients})
        ledgers.append(() if policy.ledger is None else tuple(e.event_id for e in policy.ledger.entries))
    final = server.broadcast(federation.rounds, 1.0)
    spent = None if policy.ledger is None else policy.ledger.entries
    clients[0].conclude(final)
    assert (policy.ledger.entries if policy.ledger is not None else None) == spent, "conclude charged"
    return Run(federation, clients[0], replies, ledgers)


# --- the contract's checks: each raises AssertionError naming what the policy broke ---------


def check_declared_fields(r: Run) -> None:
    """Each reply is a client stage of the protocol and carries exactly its fields."""
    spec = r.federation.spec
    assert len(r.replies) == r.federation.rounds, "a round without a reply"
    for t, reply in r.replies:
        stage = spec.stage(reply.stage)
        assert stage.sender == "client", f"round {t}: {reply.stage!r} is not a client stage"
        assert set(reply.values) == {f.name for f in stage.fields}, f"round {t}: undeclared or missing fields"


def check_ledger_covers_every_release(r: Run) -> None:
    """Under DP: every value names its event, the event is committed by the end of its round,
    and the ledger holds the plan's entries of each round, in order, and nothing else."""
    plan, ledger = r.federation.plan, r.client.policy.ledger
    assert plan is not None and ledger is not None
    for t, reply in r.replies:
        assert set(reply.events) == set(reply.values), f"round {t}: a value without its ledger event"
        for name, event in reply.events.items():
            assert event in r.ledger_after[t], f"round {t}: {name} names {event}, which the ledger lacks"
        planned = tuple(e.event_id for u in range(t + 1) for e in plan.round_entries(u))
        assert r.ledger_after[t] == planned, f"round {t}: the ledger is not the plan's"
    on_disk = PrivacyLedger.load(ledger_path(r))
    assert on_disk.entries == ledger.entries, "the ledger file is not what was committed (write-ahead)"


def ledger_path(r: Run) -> Path:
    privacy = r.client.policy.privacy  # type: ignore[attr-defined]
    assert privacy.ledger_path is not None
    return Path(privacy.ledger_path)


def check_round_zero_is_charged(config: SimulationConfig, policy_class: PolicyClass) -> None:
    """Under DP: when round 0's reply exists, the ledger already holds every event it names."""
    policy, reply = round_zero(config, policy_class, 1)
    assert policy.ledger is not None and reply.events, "round 0 released nothing under DP"
    for name, event in reply.events.items():
        assert policy.ledger.covers(event), f"{name} names {event}, which the ledger lacks"


def check_refuses_a_spent_budget(
    config: SimulationConfig, policy_class: PolicyClass, ledger_dir: Path
) -> None:
    """A client whose saved ledger already spent its budget refuses round 0: BudgetExceededError,
    no reply, and its ledger file unchanged."""
    federation = build(config)
    plan = federation.plan
    assert plan is not None
    spent = PrivacyLedger("client-0", federation.client(0, None).policy.ledger.budget, noise_source="seeded")  # type: ignore[union-attr]
    # The plan's whole run, once, under round numbers the run never reaches: the budget is gone.
    far = [replace(e, round=e.round + 10_000) for r in range(plan.rounds) for e in plan.round_entries(r)]
    spent = spent.check(far)
    spent.save(ledger_dir / "client-0.json")
    before = (ledger_dir / "client-0.json").read_bytes()
    policy = with_policy(federation.client(0, None, ledger_dir), policy_class)
    refused = False
    try:
        policy.respond(0, Stage.START, START)
    except BudgetExceededError:
        refused = True
    assert refused, "a round over budget was answered"
    assert (ledger_dir / "client-0.json").read_bytes() == before, "a refused round was charged"


def round_zero(
    config: SimulationConfig, policy_class: PolicyClass, noise_seed: int
) -> tuple[ReleasePolicy, Reply]:
    federation = build(config)
    policy = with_policy(federation.client(0, None), policy_class, noise_seed)
    return policy, policy.respond(0, Stage.START, START)


def check_releases_carry_noise(config: SimulationConfig, policy_class: PolicyClass) -> None:
    """Under DP: round 0 on the same records with two noise seeds gives different values in
    every real-valued field (an index field may be post-processing that noise does not move)."""
    _, a = round_zero(config, policy_class, 1)
    _, b = round_zero(config, policy_class, 2)
    for name, value in a.values.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert not np.allclose(value, b.values[name]), f"{name} carries no noise"


def reachable_arrays(root: object) -> list[tuple[str, np.ndarray]]:
    """Every array (numpy, or a torch tensor as numpy) reachable from `root` through instance
    attributes and containers: what a debugger, a crash dump or a pickle of it would show."""
    found, seen, queue = [], set(), [("policy", root)]
    while queue:
        path, obj = queue.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | type(None)):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append((path, obj))
        elif isinstance(obj, torch.Tensor):
            found.append((path, obj.detach().cpu().numpy()))
        elif isinstance(obj, dict):
            queue += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, list | tuple | set | frozenset):
            queue += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, types.FunctionType | types.MethodType):
            queue += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    return found


def check_keeps_no_exact_value(
    config: SimulationConfig, policy_class: PolicyClass, recorder: Callable[[ReleasePolicy], list[np.ndarray]]
) -> None:
    """Under DP: after round 0, no array the policy holds equals the exact value its mechanism
    released (taken from the test double on the shipped path, removed before the walk)."""
    federation = build(config)
    policy = with_policy(federation.client(0, None), policy_class)
    exact = recorder(policy)
    policy.respond(0, Stage.START, START)
    for owner in (policy, getattr(policy, "statistics", None)):  # drop the doubles again
        if owner is not None:
            for name in ("exact_counts", "exact"):
                vars(owner).pop(name, None)
    assert exact, "the round released nothing exact to look for"
    held = reachable_arrays(policy)
    assert any(path == "policy.learner.x" for path, _ in held), "the walk does not reach the state"
    for path, array in held:
        for value in exact:
            assert not (array.shape == value.shape and np.allclose(array, value)), f"{path} keeps {value!r}"


def check_refuses_a_wrong_stage(config: SimulationConfig, policy_class: PolicyClass) -> None:
    """A message of another stage than the round's is refused before anything is charged."""
    federation = build(config)
    policy = with_policy(federation.client(0, None), policy_class)
    refused = False
    try:
        policy.respond(0, "histograms", START)
    except ProtocolViolation:
        refused = True
    assert refused, "round 0 answered a message that is not its `start`"
    assert policy.ledger is None or policy.ledger.entries == (), "a refused message was charged"


def check_state_round_trips(config: SimulationConfig, policy_class: PolicyClass) -> None:
    """What `state_arrays` saves after round 0, `load_state` restores in a fresh policy."""
    policy, _ = round_zero(config, policy_class, 1)
    arrays, metadata = policy.state_arrays()
    fresh = with_policy(build(config).client(0, None), policy_class, 1)
    fresh.load_state(arrays, metadata)
    again, again_metadata = fresh.state_arrays()
    assert again_metadata == metadata, "the restored metadata differs"
    assert set(again) == set(arrays) and all(np.array_equal(again[k], arrays[k]) for k in arrays)


# --- the contract, once per policy ------------------------------------------------------------


class ReleasePolicyContract:
    """What every policy promises."""

    policy_class: ClassVar[PolicyClass]
    config: ClassVar[SimulationConfig]

    @pytest.fixture(scope="class")
    @classmethod
    def whole_run(cls, tmp_path_factory: pytest.TempPathFactory) -> Run:
        return run(cls.config, cls.policy_class, tmp_path_factory.mktemp("ledgers"))

    def test_replies_carry_exactly_the_declared_fields(self, whole_run: Run) -> None:
        check_declared_fields(whole_run)

    def test_a_message_of_another_stage_is_refused(self) -> None:
        check_refuses_a_wrong_stage(self.config, self.policy_class)

    def test_state_round_trips(self) -> None:
        check_state_round_trips(self.config, self.policy_class)


class PrivateReleaseContract(ReleasePolicyContract):
    """What every policy that releases under DP promises besides."""

    @staticmethod
    def exact(policy: ReleasePolicy) -> list[np.ndarray]:
        """The test double that records the exact values the policy's mechanism releases."""
        raise NotImplementedError

    def test_every_release_is_covered_by_its_committed_ledger_entry(self, whole_run: Run) -> None:
        check_ledger_covers_every_release(whole_run)
        check_round_zero_is_charged(self.config, self.policy_class)

    def test_a_spent_budget_is_refused_and_not_charged(self, tmp_path: Path) -> None:
        check_refuses_a_spent_budget(self.config, self.policy_class, tmp_path)

    def test_released_values_carry_noise(self) -> None:
        check_releases_carry_noise(self.config, self.policy_class)

    def test_no_exact_value_is_kept(self) -> None:
        check_keeps_no_exact_value(self.config, self.policy_class, self.exact)


class TestPlainRelease(ReleasePolicyContract):
    policy_class = PlainRelease
    config = small_config(**BASE, rounds=2)

    def test_it_discloses_its_exact_values_and_charges_nothing(self, whole_run: Run) -> None:
        """As the plain protocol declares: no ledger, no events, and the same records give the
        same reply whatever the noise seed."""
        assert whole_run.client.policy.ledger is None
        assert all(not reply.events for _, reply in whole_run.replies)
        _, a = round_zero(self.config, self.policy_class, 1)
        _, b = round_zero(self.config, self.policy_class, 2)
        assert all(np.array_equal(a.values[k], b.values[k]) for k in a.values)


class TestCountsRelease(PrivateReleaseContract):
    policy_class = CountsRelease
    config = small_config(**BASE, **PRIVATE, private_training="em", rounds=2)
    exact = staticmethod(record_counts)


def _statistics_exact(policy: ReleasePolicy) -> list[np.ndarray]:
    assert isinstance(policy, StatisticsRelease)
    return record_exact(policy.statistics)


class TestStatisticsRelease(PrivateReleaseContract):
    policy_class = StatisticsRelease
    config = small_config(
        **BASE, **PRIVATE, min_clients=3, noise_placement="local", vae_rounds=1, kmeans_iterations=1
    )
    exact = staticmethod(_statistics_exact)


def test_every_release_policy_has_a_contract_case():
    from securegmi.federation import release

    policies = {
        cls
        for cls in vars(release).values()
        if isinstance(cls, type)
        and cls.__module__ == release.__name__
        and hasattr(cls, "respond")
        and not getattr(cls, "_is_protocol", False)  # ReleasePolicy itself
    }

    def cases(contract: type) -> set[type]:
        below = contract.__subclasses__()
        return {c.policy_class for c in below if c.__name__.startswith("Test")} | {
            p for c in below for p in cases(c)
        }

    assert policies == cases(ReleasePolicyContract)


# --- negative controls: a broken policy fails the check that names its fault -----------------


class UnchargedCounts(CountsRelease):
    """Releases without committing its entries to the ledger."""

    def commit(self, entries: Any) -> None:
        pass


class NoiselessCounts(CountsRelease):
    """Adds no noise to its counts while the ledger still claims it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.noise_rng = _ZeroNoise()


class _ZeroNoise:
    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray:
        return np.zeros(size)


class KeepingCounts(CountsRelease):
    """Keeps its last exact counts (the test hook this contract replaced)."""

    def exact_counts(self, elbo: Any, temperature: float) -> np.ndarray:
        self.last_counts = super().exact_counts(elbo, temperature)
        return self.last_counts


class AnyStageCounts(CountsRelease):
    """Answers whatever stage it is sent."""

    def respond(self, round_index: int, stage: str, inbound: Any) -> Reply:
        return super().respond(round_index, Stage.START if round_index == 0 else Stage.BROADCAST, inbound)


class ExtraFieldCounts(CountsRelease):
    """Adds an undeclared field to its reply."""

    def respond(self, round_index: int, stage: str, inbound: Any) -> Reply:
        reply = super().respond(round_index, stage, inbound)
        return Reply(reply.stage, {**reply.values, "n_records": np.ones(1)}, reply.events)


COUNTS = TestCountsRelease.config


def test_the_contract_catches_a_policy_that_does_not_charge_its_ledger(tmp_path):
    with pytest.raises(AssertionError, match="a round over budget was answered"):
        check_refuses_a_spent_budget(COUNTS, UnchargedCounts, tmp_path)


def test_the_contract_catches_a_policy_that_adds_no_noise():
    with pytest.raises(AssertionError, match="masses carries no noise"):
        check_releases_carry_noise(COUNTS, NoiselessCounts)


def test_the_contract_catches_a_policy_that_keeps_its_exact_counts():
    with pytest.raises(AssertionError, match=r"policy\.last_counts keeps"):
        check_keeps_no_exact_value(COUNTS, KeepingCounts, record_counts)


def test_the_contract_catches_a_policy_that_answers_any_stage():
    with pytest.raises(AssertionError, match="answered a message that is not its `start`"):
        check_refuses_a_wrong_stage(COUNTS, AnyStageCounts)


def test_the_contract_catches_an_undeclared_field(tmp_path):
    # The Client drops what its stage does not declare before sealing, so the run completes;
    # the policy's reply itself is what the contract checks.
    with pytest.raises(AssertionError, match="undeclared or missing fields"):
        check_declared_fields(run(COUNTS, ExtraFieldCounts, tmp_path))


def test_the_contract_catches_a_policy_that_releases_before_charging():
    # Run through a Client, the uncharged release is stopped there too (`declared`); the
    # contract holds each policy to it on its own.
    with pytest.raises(AssertionError, match="masses names counts@round0, which the ledger lacks"):
        check_round_zero_is_charged(COUNTS, UnchargedCounts)
