"""Release policies: what a client discloses each round, and how.

A `Client` holds one policy and one codec (`codec`). The policy turns the server's decoded
message into the values of the client's reply and the ledger event that covers each of them;
the codec decides how they travel. New privacy mechanisms are new policies, never new client
classes. This module holds the interface and the non-private policy; `dp_release` the private
ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from securegmi.core.fine_clusters import FineClusterModel
from securegmi.errors import ProtocolViolation
from securegmi.federation.local import LocalLearner
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import START

BROADCAST, UPDATE = "broadcast", "update"


@dataclass(frozen=True)
class Reply:
    """The values of a client's reply, by field name, and the ledger event covering each."""

    stage: str
    values: Mapping[str, np.ndarray]
    events: Mapping[str, str] = field(default_factory=dict)


class ReleasePolicy(Protocol):
    @property
    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger; None for a policy that releases nothing under DP."""

    @property
    def identifier(self) -> FineClusterModel | None:
        """A source identifier built from released statistics, where the policy has one."""

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        """The reply to the server's `stage` message of round `round_index` (decoded values)."""

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """What the policy carries from round to round, to rebuild it in a fresh process."""

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None: ...


def expect_stage(client_id: str, round_index: int, stage: str, expected: str) -> None:
    if stage != expected:
        raise ProtocolViolation(f"{client_id}: round {round_index} expects stage {expected!r}, got {stage!r}")


class PlainRelease:
    """Discloses what FedGMI computes, as it is: soft counts and w * theta (plain protocol)."""

    ledger: PrivacyLedger | None = None
    identifier: FineClusterModel | None = None

    def __init__(self, learner: LocalLearner) -> None:
        self.learner = learner

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        expect_stage(self.learner.client_id, round_index, stage, START if round_index == 0 else BROADCAST)
        self.learner.adopt(inbound)
        masses = self.learner.em_round(round_index, float(inbound["temperature"]))
        return Reply(UPDATE, self.learner.upload(masses))

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return {}, {}

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        pass
