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


def _update(masses: Ciphertext | DpRelease) -> Message:
    weighted = Ciphertext(encrypt(KEYS, np.zeros(12)), KEYS.key_id, "dpsgd@round0")
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
    encrypted = _update(Ciphertext(encrypt(KEYS, np.ones(3)), KEYS.key_id, "counts@round0"))
    clear = _update(DpRelease(np.ones(3), "counts@round0"))
    with pytest.raises(ProtocolViolation, match="cannot open ciphertexts"):
        ClearCodec().open(encrypted, SECURE)
    with pytest.raises(ProtocolViolation, match="expected 'masses' encrypted"):
        CkksCodec(KEYS).open(clear, SECURE)
    with pytest.raises(ProtocolViolation, match="not a ciphertext"):
        CkksSum(KEYS.public(), SECURE).admit(clear)
    # Negative control: the well-formed message opens and is admitted.
    assert np.allclose(CkksCodec(KEYS).open(encrypted, SECURE)["masses"], 1.0)
    assert set(CkksSum(KEYS.public(), SECURE).admit(encrypted)) == {"masses", "weighted_components"}
