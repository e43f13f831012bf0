"""The server of the secure protocol: an evaluation-only CKKS context and additions only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from tenseal import sealapi

from securegmi.crypto.aggregation import check_update, max_envelope_bytes, pack_sum
from securegmi.crypto.keys import PublicContext
from securegmi.engine.client import BROADCAST, START
from securegmi.engine.server import AGGREGATE
from securegmi.errors import CryptoError, ProtocolViolation
from securegmi.protocol import SERVER, Message, ProtocolSpec
from securegmi.protocol.fields import Ciphertext
from securegmi.protocol.payload import build_payload

_FIELDS = ("masses", "weighted_components")


class SecureAggregationServer:
    """Holds the public context only: it can check and add ciphertexts, never read or make them."""

    def __init__(self, public: PublicContext, spec: ProtocolSpec, components: int, parameters: int) -> None:
        self.public = public
        self.spec = spec
        self.lengths = {"masses": components, "weighted_components": components * parameters}
        self.sums: bytes | None = None  # Enc(S), K x P values
        self.masses: bytes | None = None  # Enc(W), K values
        self.rejected: dict[str, str] = {}

    def broadcast(self, round_index: int, temperature: float) -> Message:
        t = np.asarray(temperature, dtype=np.float64)
        if self.sums is None or self.masses is None:
            payload = build_payload(self.spec.stage(START), {"temperature": t})
            return Message(stage=START, round=round_index, sender=SERVER, payload=payload)
        provenance = f"{AGGREGATE}@round{round_index - 1}"
        payload = build_payload(
            self.spec.stage(BROADCAST),
            {"component_sums": self.sums, "component_masses": self.masses, "temperature": t},
            {"component_sums": provenance, "component_masses": provenance},
            self.public.key_id,
        )
        return Message(stage=BROADCAST, round=round_index, sender=SERVER, payload=payload)

    def aggregate(self, updates: Mapping[str, Message]) -> dict[str, str]:
        """Add every update whose ciphertexts pass the structure checks; return why the others
        were rejected. A client is added whole or not at all, so S and W stay consistent."""
        checked: dict[str, list[list[sealapi.Ciphertext]]] = {name: [] for name in _FIELDS}
        self.rejected = {}
        for sender, message in updates.items():
            try:
                parts = {}
                for name in _FIELDS:
                    field = message.payload.get(name)
                    if not isinstance(field, Ciphertext):
                        raise ProtocolViolation(f"{name} is not a ciphertext")
                    length = self.lengths[name]
                    parts[name] = check_update(
                        self.public, field.data, length, max_envelope_bytes(self.public, length)
                    )
            except (CryptoError, ProtocolViolation) as exc:
                self.rejected[sender] = str(exc)
                continue
            for name in _FIELDS:
                checked[name].append(parts[name])
        if checked["masses"]:
            self.masses = pack_sum(self.public, checked["masses"], self.lengths["masses"])
            self.sums = pack_sum(
                self.public, checked["weighted_components"], self.lengths["weighted_components"]
            )
        return self.rejected
