"""securegmi.vocabulary: the names on the wire and in the ledger, defined once.

The names are the strings the wire, transcripts and ledgers held when they were bare literals:
they are pinned here, so a rename that would strand every old run directory fails, and a
message and a ledger written with the bare strings still parse. Event ids are built and read
by `EventId` alone, and a malformed one is a clear error."""

from __future__ import annotations

import json
from enum import StrEnum

import numpy as np
import pytest

from securegmi.config import SimulationConfig
from securegmi.errors import ConfigError, PrivacyError, ProtocolViolation
from securegmi.privacy.events import gaussian_event
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget, PrivacyLedger
from securegmi.protocol import DpRelease, Message, Public, decode, encode
from securegmi.protocols import dp
from securegmi.records.audit import _transcript_entries
from securegmi.simulation.runner import config_digest
from securegmi.vocabulary import EventId, EventName, FieldName, Placement, PrivateDesign, Stage

# What the wire and the files held before the vocabulary existed (v0.x run directories).
WIRE_NAMES = {
    Stage: {
        "start", "broadcast", "update", "moments", "cluster_stats", "histogram",
        "moment_totals", "cluster_totals", "histograms", "gradient", "gradient_totals",
        "identifier_gradient", "identifier_totals",  # added with the source classifier (issue 26)
    },
    FieldName: {
        "temperature", "component_sums", "component_masses", "masses", "component_index",
        "weighted_components", "moments", "cluster_stats", "histogram", "gradient", "aggregate",
        "contributions", "identifier_gradient",
    },
    EventName: {"counts", "dpsgd", "moments", "clusters", "histogram", "aggregate"},
    # config.json's and dp_plan.json's names, which a resumed or audited run reads back.
    Placement: {"local", "split"},
    PrivateDesign: {"statistics", "em"},
}  # fmt: skip


def renamed(names: type[StrEnum], pinned: set[str]) -> set[str]:
    """The pinned wire names `names` no longer holds, and the ones it added."""
    return {m.value for m in names} ^ pinned


@pytest.mark.parametrize("names", list(WIRE_NAMES), ids=lambda n: n.__name__)
def test_every_name_is_the_string_the_wire_always_held(names):
    assert renamed(names, WIRE_NAMES[names]) == set()
    for member in names:
        assert member == member.value and f"{member}" == member.value and json.dumps(member) == f'"{member}"'
        assert repr(member) == repr(member.value)  # error messages quote names as before


def test_the_pin_catches_a_renamed_member():
    # Negative control: a vocabulary whose `update` became `upload` strands old transcripts.
    drifted = StrEnum("Stage", {**{m.name: m.value for m in Stage}, "UPDATE": "upload"})
    assert renamed(drifted, WIRE_NAMES[Stage]) == {"update", "upload"}


def test_a_message_written_with_the_bare_strings_still_parses_and_validates():
    """An update as a client built it before the vocabulary: plain str stage, fields and event
    ids. It decodes and passes today's declaration, and its event ids parse."""
    spec = dp.build(components=3, parameters=5)
    gaussian = json.dumps({"event": {"type": "gaussian", "noise_multiplier": 1.0}})
    old = Message(
        "update",
        1,
        "client-0",
        {
            "masses": DpRelease(np.array([1.0, 2.0, 3.0]), "counts@round1"),
            "component_index": DpRelease(np.arange(3, dtype=np.int64), "counts@round1"),
            "weighted_components": DpRelease(np.zeros((3, 5), np.float32), "dpsgd@round1"),
        },
        run="r" * 32,
        events={"counts@round1": gaussian, "dpsgd@round1": gaussian},
    )
    back = decode(encode(old))
    spec.validate(back, sender_role="client", sender="client-0")
    assert back.stage == Stage.UPDATE and set(back.payload) == {
        FieldName.MASSES,
        FieldName.COMPONENT_INDEX,
        FieldName.WEIGHTED_COMPONENTS,
    }
    assert {EventId.parse(e) for e in back.events} == {
        EventId(EventName.COUNTS, 1),
        EventId(EventName.DPSGD, 1),
    }
    # Negative control: the declaration still refuses a field it does not name.
    planted = Message(
        "update", 1, "client-0", {**old.payload, "n": Public(np.ones(1))}, run=old.run, events=old.events
    )
    with pytest.raises(ProtocolViolation):
        spec.validate(planted, sender_role="client", sender="client-0")


def test_a_ledger_file_of_bare_strings_loads_and_covers_its_ids():
    entry = LedgerEntry.of(2, "counts", gaussian_event(1.0))  # a name as an old ledger wrote it
    ledger = PrivacyLedger("c", PrivacyBudget(8.0, 1e-5)).check([entry])
    back = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert back.entries[0].event_id == EventId(EventName.COUNTS, 2)
    assert back.covers("counts@round2") and back.covers(EventId(EventName.COUNTS, 2))
    assert not back.covers("counts@round1")
    assert set(back.declared(["counts@round2"])) == {"counts@round2"}


def test_an_event_id_round_trips_through_its_text():
    for event in (EventId("counts", 0), EventId(EventName.HISTOGRAM, 17), EventId("my.release-2", 3)):
        assert str(event) == f"{event.name}@round{event.round}"
        assert EventId.parse(str(event)) == event


MALFORMED = [
    "counts",  # no round
    "counts@round",  # no round number
    "counts@round-1",  # negative
    "counts@round03",  # not the form str() writes: one id, one text
    "counts@roundx",
    "@round3",  # no name
    "a b@round1",  # not a name
    "counts@round1\n",
    "counts@round1@round2",
    3,  # not text at all
    None,
]


@pytest.mark.parametrize("text", MALFORMED, ids=repr)
def test_a_malformed_event_id_is_a_clear_error(text):
    with pytest.raises(ProtocolViolation, match=r"is not an event id: one reads <release>@round<t>"):
        EventId.parse(text)


@pytest.mark.parametrize(("name", "round_index"), [("counts", -1), ("counts", True), ("", 0), ("a@b", 1)])
def test_an_event_id_is_validated_on_construction(name, round_index):
    with pytest.raises(ProtocolViolation, match="an event's"):
        EventId(name, round_index)


def test_a_ledger_entry_no_event_id_can_name_is_a_malformed_ledger():
    ledger = PrivacyLedger("c", PrivacyBudget(8.0, 1e-5)).check(
        [LedgerEntry.of(0, "counts", gaussian_event(1.0))]
    )
    data = ledger.to_json()
    data["entries"][0]["name"] = "counts@round9"  # would read as another release's id
    with pytest.raises(PrivacyError, match="malformed ledger"):
        PrivacyLedger.from_json(data)


def test_the_audit_reports_a_transcript_row_whose_event_id_is_malformed():
    """The audit reads each received release's id with EventId.parse: a garbled id is a
    problem naming the client, never a crash. Negative control: the well-formed row is taken
    in as that client's release."""
    declared = {"event": {"type": "gaussian", "noise_multiplier": 1.0}}
    row = {"sender": "client-0", "event": "counts@round0", "dp_event": declared}
    problems: list[str] = []
    received = _transcript_entries([row], {}, problems)
    assert problems == [] and list(received["client-0"]) == [EventId(EventName.COUNTS, 0)]
    received = _transcript_entries([{**row, "event": "counts@round0x"}], {}, problems)
    assert not received.get("client-0")
    assert len(problems) == 1 and problems[0].startswith("client-0: the transcript's record of its release")
    assert "is not an event id" in problems[0]


# config_digest of two configurations: the placements becoming a vocabulary (main at 7347055)
# left the digests of the same settings as they were, so a run started before still resumed.
# Recomputed once since, when the private defaults changed (full-batch split DP-SGD, issue 26):
# a run started before that change is another configuration, which resume refuses; and again
# when the source classifier's settings joined every configuration (issue 26); and when the
# statistics' sizes became a function of epsilon (None in config.json: a run written before
# holds its numbers and reads back, and digests, as it did).
DIGESTS_BEFORE = {
    "secure-split": "db130e097a67ee4999d4c3a186efbad38e2f574affbe1a7cda2ae3fe4e675b2c",
    "dp-em": "3b18c1934eef76ed5bcaac768c0a96a7baa9ed3d4a3d5db1e8c21590819241bc",
}
SECURE = {"protocol": "secure", "epsilon": 8.0}
CONFIGS = {
    "secure-split": {**SECURE, "noise_placement": "split", "sgd_placement": "split"},
    "dp-em": {"protocol": "dp", "epsilon": 4.0, "private_training": "em", "noise_placement": "local"},
}
# Each with one name otherwise: another run, which resume must tell apart.
OTHERS = {
    "secure-split": {**SECURE, "noise_placement": "split", "sgd_placement": "local"},
    "dp-em": {"protocol": "dp", "epsilon": 4.0, "private_training": "statistics"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_configuration_holds_its_placements_as_members_and_writes_the_old_strings(name):
    config = SimulationConfig.from_dict(json.loads(json.dumps(CONFIGS[name])))  # a config.json, read back
    assert isinstance(config.private_training, PrivateDesign)
    assert isinstance(config.dp_sgd_placement, Placement)
    assert isinstance(config.noise_placement, Placement) and isinstance(config.placement, Placement)
    written = json.loads(json.dumps(config.to_dict()))
    assert {k: written[k] for k in CONFIGS[name]} == CONFIGS[name]
    assert SimulationConfig.from_dict(written) == config
    assert config_digest(config) == DIGESTS_BEFORE[name]
    # Negative control: the digest is not blind to the names (resume refuses the other run).
    assert config_digest(SimulationConfig.from_dict(OTHERS[name])) != DIGESTS_BEFORE[name]


@pytest.mark.parametrize(
    ("field", "value"), [("noise_placement", "splt"), ("sgd_placement", "Local"), ("private_training", "EM")]
)
def test_a_misspelt_placement_or_design_names_the_valid_ones(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} must be one of \(('\w+', )+'\w+'\), got '{value}'$"):
        SimulationConfig(**SECURE, **{field: value})
    with pytest.raises(ConfigError, match=field):
        SimulationConfig.from_dict({**SECURE, field: value})
