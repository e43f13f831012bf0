"""Codecs: how a protocol's values travel, as they are ("clear") or under CKKS ("ckks").

A client's codec seals the values its release policy produced and opens what the server sent;
a server's summation adds the clients' values without reading them (docs/design.md §1, §3). Under CKKS
the client side holds the secret context and the server side the public one only: it can
check and add ciphertexts, never read or make them. Every value a CKKS client decrypts passes
the release function first (rounded to the release grid), so no exact decryption, whose noise
depends on the secret key, ever reaches the model, a file or the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any, Protocol

import numpy as np
from tenseal import sealapi

from securegmi.crypto.aggregation import check_update, max_envelope_bytes, pack_sum
from securegmi.crypto.envelope import decrypt, encrypt
from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.release import release_decrypted
from securegmi.errors import ProtocolViolation
from securegmi.protocol import Ciphertext, FieldKind, FieldSpec, Message, ProtocolSpec, StageSpec
from securegmi.protocol.fields import field_array

Admitted = Mapping[str, Any]  # one reply's fields, as the summation will add them


class ClientCodec(Protocol):
    key_id: str | None

    def seal(self, values: Mapping[str, np.ndarray], stage: StageSpec) -> dict[str, np.ndarray | bytes]: ...

    def open(self, message: Message, spec: ProtocolSpec) -> dict[str, np.ndarray]: ...


class Summation(Protocol):
    key_id: str | None

    def admit(self, message: Message) -> Admitted:
        """Check one reply for adding; raise CryptoError or ProtocolViolation to reject it."""

    def add(self, admitted: Sequence[Admitted], down: FieldSpec, up: FieldSpec) -> np.ndarray | bytes:
        """The server field `down`: the sum of every admitted reply's field `up`."""


class ClearCodec:
    key_id: str | None = None

    def seal(self, values: Mapping[str, np.ndarray], stage: StageSpec) -> dict[str, np.ndarray | bytes]:
        return dict(values)

    def open(self, message: Message, spec: ProtocolSpec) -> dict[str, np.ndarray]:
        if any(isinstance(f, Ciphertext) for f in message.payload.values()):
            raise ProtocolViolation(f"{message.stage}: a clear-codec client cannot open ciphertexts")
        return {name: field_array(f) for name, f in message.payload.items()}


class CkksCodec:
    def __init__(self, keys: SecretContext) -> None:
        self.keys = keys
        self.key_id: str | None = keys.key_id

    def seal(self, values: Mapping[str, np.ndarray], stage: StageSpec) -> dict[str, np.ndarray | bytes]:
        """One envelope per field; a field the stage packs into another travels at the end of
        that one's envelope and is sealed as an empty marker."""
        sealed: dict[str, np.ndarray | bytes] = {}
        for name, v in values.items():
            if stage.require(name).packed_in is not None:
                sealed[name] = b""
                continue
            parts = [v, *(values[p.name] for p in stage.packed(name))]
            flat = np.concatenate([np.asarray(p, np.float64).ravel() for p in parts])
            sealed[name] = encrypt(self.keys, flat)
        return sealed

    def open(self, message: Message, spec: ProtocolSpec) -> dict[str, np.ndarray]:
        stage, out = spec.stage(message.stage), {}
        for name, f in message.payload.items():
            declared = stage.require(name)  # the endpoint validated it; a caller may not have
            if declared.kind is FieldKind.CIPHERTEXT:
                if not isinstance(f, Ciphertext):
                    raise ProtocolViolation(f"{message.stage}: expected {name!r} encrypted")
                if declared.packed_in is not None:
                    continue  # opened with its host's envelope
                # Li & Micciancio (EUROCRYPT 2021): exact decryptions reveal the key's noise.
                # Kept in float64: a float32 copy of a large sum could not hold the grid.
                clear = release_decrypted(decrypt(self.keys, f.data), self.keys.params.release_grid())
                layout = spec.envelope(declared)
                if clear.size != sum(prod(shape) for _, shape in layout):
                    raise ProtocolViolation(f"{message.stage}: {name!r} holds {clear.size} values")
                offset = 0
                for part, shape in layout:
                    out[part.name] = clear[offset : offset + prod(shape)].reshape(shape)
                    offset += prod(shape)
            else:
                out[name] = field_array(f)
        return out


class ClearSum:
    def __init__(self, spec: ProtocolSpec) -> None:
        self.spec = spec
        self.key_id: str | None = None

    def admit(self, message: Message) -> Admitted:
        return {name: field_array(f) for name, f in message.payload.items()}

    def add(self, admitted: Sequence[Admitted], down: FieldSpec, up: FieldSpec) -> np.ndarray | bytes:
        total = np.zeros(self.spec.resolve(down.shape))
        for values in admitted:
            if up.rows_at is None:
                total += values[up.name]
            else:  # a top-B upload: its rows belong at the components it names
                total[values[up.rows_at]] += values[up.name]
        return total.astype(down.dtype)


class CkksSum:
    """Adds ciphertexts with the public context after their structure checks."""

    def __init__(self, public: PublicContext, spec: ProtocolSpec) -> None:
        self.public, self.spec = public, spec
        self.key_id: str | None = public.key_id

    def admit(self, message: Message) -> Admitted:
        """Every field is checked before any is added: a client is added whole or not at all,
        so sums and masses stay consistent."""
        parts: dict[str, list[sealapi.Ciphertext]] = {}
        stage = self.spec.stage(message.stage)
        for name, f in message.payload.items():
            if not isinstance(f, Ciphertext):
                raise ProtocolViolation(f"{name} is not a ciphertext")
            declared = stage.require(name)  # the endpoint validated it; a caller may not have
            if declared.packed_in is not None:
                continue  # an empty marker (validated): its values are in its host's envelope
            length = self._length(declared)
            parts[name] = check_update(self.public, f.data, length, max_envelope_bytes(self.public, length))
        return parts

    def add(self, admitted: Sequence[Admitted], down: FieldSpec, up: FieldSpec) -> np.ndarray | bytes:
        if down.packed_in is not None:
            return b""  # summed within its host's envelope
        return pack_sum(self.public, [a[up.name] for a in admitted], self._length(down))

    def _length(self, f: FieldSpec) -> int:
        """Values in `f`'s envelope: its own and those of the fields packed in it."""
        return sum(prod(shape) for _, shape in self.spec.envelope(f))
