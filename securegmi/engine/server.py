"""The aggregation server: additions only (DESIGN §1), so the same logic holds under CKKS."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from securegmi.engine.client import BROADCAST, payload_array
from securegmi.protocol import SERVER, Message, ProtocolSpec
from securegmi.protocol.payload import build_payload

AGGREGATE = "aggregate"


class AggregationServer:
    """Keeps S_k = sum_c u_ck and W_k = sum_c w_ck; it never divides, clients do."""

    def __init__(self, initial_components: np.ndarray, spec: ProtocolSpec) -> None:
        # Round 0 broadcasts the public initialisation as S = theta, W = 1.
        self.sums = np.asarray(initial_components, dtype=np.float32).copy()
        self.masses = np.ones(len(self.sums))
        self.spec = spec

    def broadcast(self, round_index: int, temperature: float) -> Message:
        values: dict[str, np.ndarray | bytes] = {
            "component_sums": self.sums,
            "component_masses": self.masses,
            "temperature": np.asarray(temperature, dtype=np.float64),
        }
        # Under a DP protocol the aggregate is post-processing of the clients' last releases.
        provenance = f"{AGGREGATE}@round{round_index - 1}"
        events = {"component_sums": provenance, "component_masses": provenance}
        payload = build_payload(self.spec.stage(BROADCAST), values, events)
        return Message(stage=BROADCAST, round=round_index, sender=SERVER, payload=payload)

    def aggregate(self, updates: Mapping[str, Message]) -> dict[str, str]:
        """Add every update (they were validated on receipt); nothing is rejected here."""
        sums = np.zeros_like(self.sums, dtype=np.float64)
        masses = np.zeros(len(self.sums))
        for message in updates.values():
            index = payload_array(message, "component_index")
            sums[index] += payload_array(message, "weighted_components")
            masses += payload_array(message, "masses")
        self.sums, self.masses = sums.astype(np.float32), masses
        return {}
