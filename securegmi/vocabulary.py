"""The names on the wire and in the ledger, defined once.

Stage names, field names and release (ledger event) names are `StrEnum`s, in the way Flower's
`flwr.common.constant.MessageType` names its message types: each member *is* its string, so
the wire format, the transcript and the ledger files hold exactly the strings they held when
these were bare literals, and an old file parses unchanged. Event ids, which say which release
covers a value (`counts@round3`), are built and parsed by `EventId` alone.

The module sits at the bottom of the layering beside `errors` (DESIGN §4): the ledger (privacy),
the declarations (protocol, protocols/), the federation and the audit all name these, and the
privacy layer may not import `protocol`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from securegmi.errors import ProtocolViolation


class _Name(StrEnum):
    # repr as the plain string: error messages quote names with !r, and must read as before.
    def __repr__(self) -> str:
        return repr(self.value)


class Stage(_Name):
    """Every stage a protocol may declare."""

    START = "start"  # round 0's downlink in every protocol: public values only
    BROADCAST = "broadcast"  # FedGMI's downlink: the sums of the clients' updates
    UPDATE = "update"  # FedGMI's uplink: w and w * theta
    # The statistics phase (protocols/_round.py): each uplink stage carries one field of its
    # own name, and the downlink after it that field's sum.
    MOMENTS = "moments"
    CLUSTER_STATS = "cluster_stats"
    HISTOGRAM = "histogram"
    MOMENT_TOTALS = "moment_totals"
    CLUSTER_TOTALS = "cluster_totals"
    HISTOGRAMS = "histograms"
    # Split DP-SGD: one step per round.
    GRADIENT = "gradient"
    GRADIENT_TOTALS = "gradient_totals"
    # Split DP-SGD of the source classifier distilled from the statistics: one step per round.
    IDENTIFIER_GRADIENT = "identifier_gradient"
    IDENTIFIER_TOTALS = "identifier_totals"


class FieldName(_Name):
    """Every field a protocol may declare."""

    TEMPERATURE = "temperature"  # public: the likelihood temperature's schedule
    COMPONENT_SUMS = "component_sums"  # S_k = sum_c w_ck theta_ck
    COMPONENT_MASSES = "component_masses"  # W_k = sum_c w_ck
    MASSES = "masses"  # w_ck
    COMPONENT_INDEX = "component_index"  # which components an update carries (top-B)
    WEIGHTED_COMPONENTS = "weighted_components"  # w_ck theta_ck
    MOMENTS = "moments"
    CLUSTER_STATS = "cluster_stats"
    HISTOGRAM = "histogram"
    GRADIENT = "gradient"
    IDENTIFIER_GRADIENT = "identifier_gradient"
    AGGREGATE = "aggregate"  # a private phase's sum of the uplink field
    # Public, in a server stage: how many client releases its sums add (DESIGN §2, law 3).
    CONTRIBUTIONS = "contributions"


class EventName(_Name):
    """What a ledger entry (and the `DpRelease` it covers) released."""

    COUNTS = "counts"  # the em design's soft counts
    DPSGD = "dpsgd"  # DP-SGD steps
    MOMENTS = "moments"  # the statistics phase, in order
    CLUSTERS = "clusters"
    HISTOGRAM = "histogram"
    # Not a release: the provenance a server gives every sum it sends (post-processing).
    AGGREGATE = "aggregate"


class Placement(_Name):
    """Where a release's DP noise sits (`noise_placement`, `sgd_placement`, a plan's `placement`)."""

    # Every upload carries the full noise: sound whatever the server may decrypt.
    LOCAL = "local"
    # Each client adds a share and only the CKKS sum is decrypted (the secure protocol only).
    SPLIT = "split"


class PrivateDesign(_Name):
    """How a private run finds its components (`private_training`; docs/design.md §2)."""

    STATISTICS = "statistics"  # DP statistics identify the components, then DP-SGD fits them
    EM = "em"  # DP-SGD EM with soft counts every round: the reference it is measured against


_EVENT_ID = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)@round(?P<round>0|[1-9][0-9]*)")


@dataclass(frozen=True)
class EventId:
    """Which release covers a value: the release's name and the round it was made in. Its
    text form, `name@round<t>`, is what messages, transcripts and ledgers hold."""

    name: str
    round: int

    def __post_init__(self) -> None:
        if type(self.round) is not int or self.round < 0:  # bool is an int, and no round
            raise ProtocolViolation(f"an event's round is a non-negative integer, got {self.round!r}")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ProtocolViolation(f"an event's name is letters, digits, '_', '.' or '-', got {self.name!r}")

    def __str__(self) -> str:
        return f"{self.name}@round{self.round}"

    @classmethod
    def parse(cls, text: object) -> EventId:
        """The id `str(event_id)` wrote; ProtocolViolation, naming it, for anything else."""
        match = _EVENT_ID.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ProtocolViolation(
                f"{text!r:.80} is not an event id: one reads <release>@round<t>, e.g. 'counts@round3'"
            )
        return cls(match["name"], int(match["round"]))
