from __future__ import annotations

import numpy as np
import pytest
import torch

from securegmi.errors import ProtocolViolation
from securegmi.protocol import Ciphertext, DpRelease, Message, NonPrivate, Public, decode, encode


def _message() -> Message:
    return Message(
        stage="update",
        round=3,
        sender="client-1",
        payload={
            "a": Public(np.asarray(2.5)),
            "b": NonPrivate(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "c": DpRelease(np.array([1.0, -2.0]), event="counts-round-3"),
            "d": Ciphertext(b"\x00\x01ckks", key_id="abc123"),
            "e": Ciphertext(b"", key_id="abc123", event="counts-round-3", packed_in="d"),
        },
    )


def test_roundtrip_preserves_every_kind():
    m = _message()
    back = decode(encode(m))
    assert (back.stage, back.round, back.sender, back.error) == ("update", 3, "client-1", None)
    assert set(back.payload) == set(m.payload)
    for name, f in m.payload.items():
        g = back.payload[name]
        assert g.kind is f.kind
        if isinstance(f, Ciphertext):
            assert isinstance(g, Ciphertext)
            assert (g.data, g.key_id, g.event, g.packed_in) == (f.data, f.key_id, f.event, f.packed_in)
        else:
            assert not isinstance(g, Ciphertext)
            assert np.array_equal(g.value, f.value) and g.value.dtype == f.value.dtype
            assert g.value.shape == f.value.shape
    assert back.payload["c"].event == "counts-round-3"  # type: ignore[union-attr]


def test_wire_format_is_safetensors_not_pickle():
    wire = encode(_message())
    header_len = int.from_bytes(wire[:8], "little")
    assert wire[8:9] == b"{" and header_len < len(wire)
    assert b"\x80\x04" not in wire[:2]  # no pickle protocol marker


@pytest.mark.parametrize("raw", [torch.zeros(3), np.zeros(3), [1.0, 2.0]])
def test_raw_values_cannot_enter_a_payload(raw):
    with pytest.raises(ProtocolViolation, match="wrap it"):
        Message("update", 0, "client-0", {"x": raw})


def test_a_tensor_cannot_be_wrapped_either():
    with pytest.raises(ProtocolViolation, match="numpy array"):
        NonPrivate(torch.zeros(3))  # type: ignore[arg-type]


def test_a_packed_ciphertext_is_an_empty_marker():
    with pytest.raises(ProtocolViolation, match="carries no bytes of its own"):
        Ciphertext(b"\x00", key_id="abc123", packed_in="d")
    # Negative control: the marker without bytes, and bytes without packing.
    assert Ciphertext(b"", key_id="abc123", packed_in="d").packed_in == "d"
    assert Ciphertext(b"\x00", key_id="abc123").packed_in is None


def test_dp_release_must_name_its_event():
    with pytest.raises(ProtocolViolation, match="event"):
        DpRelease(np.zeros(2), event="")


@pytest.mark.parametrize("wire", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", encode(_message())[:-7]])
def test_malformed_bytes_are_a_protocol_violation(wire):
    with pytest.raises(ProtocolViolation, match="do not decode"):
        decode(wire)


def test_error_messages_carry_no_payload():
    with pytest.raises(ProtocolViolation):
        Message("update", 0, "c", {"a": Public(np.zeros(1))}, error="boom")
    back = decode(encode(Message("update", 0, "c", error="budget exceeded")))
    assert back.error == "budget exceeded" and not back.payload
