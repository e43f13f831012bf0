"""Each codec and server refuses what does not fit its protocol, with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from securegmi.crypto.envelope import encrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.errors import ConfigError, CryptoError, ProtocolViolation
from securegmi.federation.codec import CkksCodec, CkksSum, ClearCodec
from securegmi.federation.server import Server
from securegmi.protocol import Ciphertext, DpRelease, Message
from securegmi.protocols import plain, secure

PLAIN = plain.build(components=3, parameters=4)
SECURE = secure.build(components=3, parameters=4)
KEYS = SecretContext.generate(CkksParameters(max_clients=2))


def _update(masses: Ciphertext | DpRelease, envelope: np.ndarray | None = None) -> Message:
    """An update of the secure protocol: its masses travel after the components' 12 values."""
    values = np.r_[np.zeros(12), np.ones(3)] if envelope is None else envelope
    weighted = Ciphertext(encrypt(KEYS, values), KEYS.key_id, "dpsgd@round0")
    return Message("update", 0, "client-0", {"masses": masses, "weighted_components": weighted})


def test_a_server_needs_the_public_context_exactly_when_its_protocol_encrypts():
    with pytest.raises(CryptoError, match="public context"):
        Server(SECURE)
    with pytest.raises(ConfigError, match="drop the public context"):
        Server(PLAIN, KEYS.public())
    # Negative control: each protocol with what it needs.
    assert Server(SECURE, KEYS.public()).summation.key_id == KEYS.key_id
    assert Server(PLAIN).summation.key_id is None


def test_the_codecs_refuse_a_field_of_the_wrong_kind():
    encrypted = _update(Ciphertext(b"", KEYS.key_id, "counts@round0", "weighted_components"))
    clear = _update(DpRelease(np.ones(3), "counts@round0"))
    with pytest.raises(ProtocolViolation, match="cannot open ciphertexts"):
        ClearCodec().open(encrypted, SECURE)
    with pytest.raises(ProtocolViolation, match="expected 'masses' encrypted"):
        CkksCodec(KEYS).open(clear, SECURE)
    with pytest.raises(ProtocolViolation, match="not a ciphertext"):
        CkksSum(KEYS.public(), SECURE).admit(clear)
    # Negative control: the well-formed message opens and is admitted.
    assert np.allclose(CkksCodec(KEYS).open(encrypted, SECURE)["masses"], 1.0)
    assert set(CkksSum(KEYS.public(), SECURE).admit(encrypted)) == {"weighted_components"}


def test_a_packed_envelope_of_the_wrong_length_is_refused_not_split_wrongly():
    marker = Ciphertext(b"", KEYS.key_id, "counts@round0", "weighted_components")
    short = _update(marker, envelope=np.zeros(12))  # the masses left out of the envelope
    with pytest.raises(ProtocolViolation, match="holds 12 values"):
        CkksCodec(KEYS).open(short, SECURE)
    with pytest.raises(CryptoError, match="does not match the expected"):
        CkksSum(KEYS.public(), SECURE).admit(short)
    # Negative control: the full envelope splits into the components and the masses.
    opened = CkksCodec(KEYS).open(_update(marker, np.r_[np.arange(12.0), [7, 8, 9]]), SECURE)
    np.testing.assert_allclose(opened["weighted_components"], np.arange(12.0).reshape(3, 4), atol=1e-6)
    np.testing.assert_allclose(opened["masses"], [7, 8, 9], atol=1e-6)
