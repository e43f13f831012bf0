"""The aggregation server: additions only (DESIGN §1), so the same logic holds under CKKS."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from securegmi.engine.client import BROADCAST, payload_array
from securegmi.engine.statistics import AGGREGATE_FIELD, START, downlink_stage
from securegmi.errors import RunAbortedError
from securegmi.privacy.calibration import StatisticsPlan
from securegmi.protocol import SERVER, Message, ProtocolSpec
from securegmi.protocol.payload import build_payload

AGGREGATE = "aggregate"


class AggregationServer:
    """Keeps S_k = sum_c u_ck and W_k = sum_c w_ck; it never divides, clients do."""

    def __init__(
        self, initial_components: np.ndarray, spec: ProtocolSpec, statistics: StatisticsPlan | None = None
    ) -> None:
        # Round 0 broadcasts the public initialisation as S = theta, W = 1.
        self.sums = np.asarray(initial_components, dtype=np.float32).copy()
        self.masses = np.ones(len(self.sums))
        self.spec = spec
        self.statistics = statistics
        self.total: np.ndarray | None = None  # the last statistics round's sum

    def broadcast(self, round_index: int, temperature: float) -> Message:
        if self.statistics is not None and round_index <= self.statistics.rounds:
            return statistics_downlink(self.spec, self.statistics, round_index, self.total, temperature)
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
        first = next(iter(updates.values()))
        if first.stage != "update":
            assert self.statistics is not None
            require_cohort(self.statistics, len(updates), first.round)
            self.total = np.sum([payload_array(m, m.stage) for m in updates.values()], axis=0)
            return {}
        sums = np.zeros_like(self.sums, dtype=np.float64)
        masses = np.zeros(len(self.sums))
        for message in updates.values():
            index = payload_array(message, "component_index")
            sums[index] += payload_array(message, "weighted_components")
            masses += payload_array(message, "masses")
        self.sums, self.masses = sums.astype(np.float32), masses
        return {}


def statistics_downlink(
    spec: ProtocolSpec,
    plan: StatisticsPlan,
    round_index: int,
    total: np.ndarray | bytes | None,
    temperature: float,
    key_id: str | None = None,
) -> Message:
    """The statistics phase's downlink: `start`, then the previous round's sum."""
    stage = downlink_stage(plan, round_index)
    if stage == START:
        values: dict[str, np.ndarray | bytes] = {"temperature": np.asarray(temperature, dtype=np.float64)}
        payload = build_payload(spec.stage(stage), values)
    else:
        assert total is not None
        events = {AGGREGATE_FIELD: f"{AGGREGATE}@round{round_index - 1}"}
        payload = build_payload(spec.stage(stage), {AGGREGATE_FIELD: total}, events, key_id)
    return Message(stage=stage, round=round_index, sender=SERVER, payload=payload)


def require_cohort(plan: StatisticsPlan, accepted: int, round_index: int) -> None:
    """Split noise is sized so that `min_clients` shares carry the full noise: a smaller sum is
    under-noised and must never be released, so the round is abandoned."""
    if accepted < plan.min_clients:
        raise RunAbortedError(
            f"round {round_index}: {accepted} statistics releases arrived, the minimum cohort is "
            f"{plan.min_clients}; with fewer the sum would carry less than the planned noise, so the "
            "round is abandoned and nothing is released"
        )
