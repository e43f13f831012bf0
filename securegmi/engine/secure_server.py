"""The server of the secure protocol: an evaluation-only CKKS context and additions only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from tenseal import sealapi

from securegmi.crypto.aggregation import check_update, max_envelope_bytes, pack_sum
from securegmi.crypto.keys import PublicContext
from securegmi.engine.client import BROADCAST, START
from securegmi.engine.server import AGGREGATE, require_cohort, statistics_downlink
from securegmi.errors import CryptoError, ProtocolViolation
from securegmi.privacy.calibration import StatisticsPlan
from securegmi.protocol import SERVER, Message, ProtocolSpec
from securegmi.protocol.fields import Ciphertext
from securegmi.protocol.payload import build_payload

_FIELDS = ("masses", "weighted_components")


class SecureAggregationServer:
    """Holds the public context only: it can check and add ciphertexts, never read or make them."""

    def __init__(
        self,
        public: PublicContext,
        spec: ProtocolSpec,
        components: int,
        parameters: int,
        statistics: StatisticsPlan | None = None,
    ) -> None:
        self.public = public
        self.spec = spec
        self.statistics = statistics
        self.lengths = {"masses": components, "weighted_components": components * parameters}
        if statistics is not None:
            dims = spec.dims
            self.lengths |= {"moments": dims["M"], "cluster_stats": dims["S"], "histogram": dims["H"]}
        self.total: bytes | None = None  # Enc(the last statistics round's sum)
        self.sums: bytes | None = None  # Enc(S), K x P values
        self.masses: bytes | None = None  # Enc(W), K values
        self.rejected: dict[str, str] = {}

    def broadcast(self, round_index: int, temperature: float) -> Message:
        if self.statistics is not None and round_index <= self.statistics.rounds:
            return statistics_downlink(
                self.spec, self.statistics, round_index, self.total, temperature, self.public.key_id
            )
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
        stage = next(iter(updates.values())).stage
        fields = _FIELDS if stage == "update" else (stage,)
        checked: dict[str, list[list[sealapi.Ciphertext]]] = {name: [] for name in fields}
        self.rejected = {}
        for sender, message in updates.items():
            try:
                parts = {}
                for name in fields:
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
            for name in fields:
                checked[name].append(parts[name])
        if stage != "update":
            assert self.statistics is not None
            require_cohort(self.statistics, len(checked[stage]), next(iter(updates.values())).round)
            if checked[stage]:
                self.total = pack_sum(self.public, checked[stage], self.lengths[stage])
            return self.rejected
        if checked["masses"]:
            self.masses = pack_sum(self.public, checked["masses"], self.lengths["masses"])
            self.sums = pack_sum(
                self.public, checked["weighted_components"], self.lengths["weighted_components"]
            )
        return self.rejected
