from __future__ import annotations

import json

import numpy as np
import pytest

from securegmi.errors import ConfigError, ProtocolViolation
from securegmi.protocol import SERVER, Ciphertext, DpRelease, Message, NonPrivate, Public
from securegmi.protocols import dp, plain, secure

SPEC = plain.build(components=3, parameters=5)


def _update(**changes) -> Message:
    payload = {
        "masses": NonPrivate(np.array([1.0, 2.0, 3.0])),
        "component_index": NonPrivate(np.arange(3, dtype=np.int64)),
        "weighted_components": NonPrivate(np.zeros((3, 5), np.float32)),
    }
    payload.update(changes)
    return Message("update", 0, "client-0", {k: v for k, v in payload.items() if v is not None})


def test_a_declared_update_validates():
    SPEC.validate(_update(), sender_role="client", sender="client-0")


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (_update(n_samples=NonPrivate(np.array([61.0]))), "undeclared"),
        (_update(masses=None), "missing"),
        (_update(masses=Public(np.array([1.0, 2.0, 3.0]))), "declared non-private"),
        (_update(masses=NonPrivate(np.array([1.0, 2.0]))), "float64\\[3\\]"),
        (_update(masses=NonPrivate(np.array([1, 2, 3]))), "float64"),
        (_update(masses=NonPrivate(np.array([1.0, np.nan, 3.0]))), "NaN"),
        (Message("nonsense", 0, "client-0"), "no stage"),
        (Message("broadcast", 0, "client-0"), "sent by the server"),
    ],
)
def test_every_deviation_is_refused(message, match):
    with pytest.raises(ProtocolViolation, match=match):
        SPEC.validate(message, sender_role="client", sender="client-0")


def test_a_client_cannot_speak_for_another():
    with pytest.raises(ProtocolViolation, match="claims"):
        SPEC.validate(_update(), sender_role="client", sender="client-7")


def test_server_messages_must_come_from_the_server():
    m = Message("broadcast", 0, "client-0", {})
    with pytest.raises(ProtocolViolation, match=SERVER):
        SPEC.validate(m, sender_role="server")


def test_top_b_binds_the_uplink_shape():
    spec = plain.build(components=3, parameters=5, top_b=1)
    ok = _update(
        component_index=NonPrivate(np.array([2], np.int64)),
        weighted_components=NonPrivate(np.zeros((1, 5), np.float32)),
    )
    spec.validate(ok, sender_role="client", sender="client-0")
    with pytest.raises(ProtocolViolation, match="weighted_components"):
        spec.validate(
            _update(component_index=NonPrivate(np.array([2], np.int64))),
            sender_role="client",
            sender="client-0",
        )
    with pytest.raises(ValueError, match="top_b"):
        plain.build(components=3, parameters=5, top_b=4)


def _declaration(**changes):  # type: ignore[no-untyped-def]
    """The plain declaration's parts, with `changes` applied, built into a ProtocolSpec."""
    from dataclasses import replace

    from securegmi.protocol import ProtocolSpec

    parts = {
        "name": "planted",
        "description": "a declaration with one thing wrong",
        "stages": SPEC.stages,
        "release": "none",
        "codec": "clear",
    }
    parts.update(changes)
    if "sum_of" in parts:  # a broadcast field that sums a field no client sends
        broadcast = SPEC.stage("broadcast")
        wrong = replace(broadcast.fields[0], sum_of=parts.pop("sum_of"))
        parts["stages"] = tuple(
            replace(s, fields=(wrong, *s.fields[1:])) if s.name == "broadcast" else s for s in SPEC.stages
        )
    return ProtocolSpec(**parts)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"stages": (*SPEC.stages, SPEC.stage("update"))}, "duplicate stage names"),
        ({"stages": SPEC.stages[1:]}, "opens with a 'start' stage"),
        ({"codec": "ckks"}, "codec 'ckks' disagrees"),
        ({"release": "dp"}, "release 'dp' disagrees"),
        ({"sum_of": "n_samples"}, "sums an unknown field"),
    ],
)
def test_a_declaration_that_contradicts_itself_is_refused(changes, match):
    from securegmi.errors import ConfigError

    _declaration()  # negative control: the plain declaration's parts are accepted
    with pytest.raises(ConfigError, match=match):
        _declaration(**changes)


def _dp_update(events: dict[str, str]) -> Message:
    payload = {
        "masses": DpRelease(np.array([1.0, 2.0, 3.0]), "counts@round0"),
        "component_index": DpRelease(np.arange(3, dtype=np.int64), "counts@round0"),
        "weighted_components": DpRelease(np.zeros((3, 5), np.float32), "dpsgd@round0"),
    }
    return Message("update", 0, "client-0", payload, events=events)


GAUSSIAN = json.dumps({"event": {"type": "gaussian", "noise_multiplier": 2.0}})


def test_each_release_travels_with_its_events_parameters():
    spec = dp.build(components=3, parameters=5)
    spec.validate(_dp_update({"counts@round0": GAUSSIAN, "dpsgd@round0": GAUSSIAN}), sender_role="client")
    # Negative controls: an event named but not declared, and one declared but never named.
    with pytest.raises(ProtocolViolation, match="declares the parameters of events"):
        spec.validate(_dp_update({"counts@round0": GAUSSIAN}), sender_role="client")
    with pytest.raises(ProtocolViolation, match="declares the parameters of events"):
        spec.validate(
            _dp_update({"counts@round0": GAUSSIAN, "dpsgd@round0": GAUSSIAN, "x@round0": GAUSSIAN}),
            sender_role="client",
        )
    with pytest.raises(ProtocolViolation, match="JSON object with an 'event'"):
        _dp_update({"counts@round0": "{}", "dpsgd@round0": GAUSSIAN})


SECURE = secure.build(components=3, parameters=5)


def _secure_update(masses: Ciphertext, weighted: Ciphertext | None = None) -> Message:
    weighted = weighted or Ciphertext(b"ckks", "key", "dpsgd@round0")
    events = {e: GAUSSIAN for e in ("counts@round0", "dpsgd@round0")}
    return Message(
        "update", 0, "client-0", {"masses": masses, "weighted_components": weighted}, events=events
    )


def test_the_masses_travel_packed_in_the_components_envelope_and_nothing_else_passes():
    assert SECURE.stage("update").require("masses").packed_in == "weighted_components"
    assert SECURE.stage("broadcast").require("component_masses").packed_in == "component_sums"
    marker = Ciphertext(b"", "key", "counts@round0", packed_in="weighted_components")
    SECURE.validate(_secure_update(marker), sender_role="client")
    # Negative controls: the masses in an envelope of their own, or claiming another host.
    with pytest.raises(ProtocolViolation, match="must travel packed in 'weighted_components'"):
        SECURE.validate(_secure_update(Ciphertext(b"ckks", "key", "counts@round0")), sender_role="client")
    with pytest.raises(ProtocolViolation, match="claims 'moments'"):
        SECURE.validate(
            _secure_update(Ciphertext(b"", "key", "counts@round0", packed_in="moments")), sender_role="client"
        )
    unpacked = _secure_update(marker, Ciphertext(b"", "key", "dpsgd@round0", packed_in="masses"))
    with pytest.raises(ProtocolViolation, match="in its own envelope, it claims 'masses'"):
        SECURE.validate(unpacked, sender_role="client")


def _repacked(stage: str, name: str, **changes: object):  # type: ignore[no-untyped-def]
    """The secure declaration with one field of one stage changed."""
    from dataclasses import replace

    stages = tuple(
        replace(s, fields=tuple(replace(f, **changes) if f.name == name else f for f in s.fields))
        if s.name == stage
        else s
        for s in SECURE.stages
    )
    return replace(SECURE, stages=stages)


@pytest.mark.parametrize(
    ("stage", "name", "changes", "match"),
    [
        ("update", "masses", {"packed_in": "component_sums"}, "unpacked field of the same stage"),
        ("update", "weighted_components", {"packed_in": "masses"}, "unpacked field of the same stage"),
        ("broadcast", "temperature", {"packed_in": "component_sums"}, "only ciphertext fields"),
        ("broadcast", "component_masses", {"packed_in": None}, "must be packed in that host's sum"),
        ("update", "masses", {"packed_in": None}, "must be packed in that host's sum"),
    ],
)
def test_a_packing_the_two_ends_could_split_differently_is_refused(stage, name, changes, match):
    _repacked("update", "masses")  # negative control: the secure declaration itself is accepted
    with pytest.raises(ConfigError, match=match):
        _repacked(stage, name, **changes)
