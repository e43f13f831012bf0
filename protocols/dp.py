"""The FedGMI round with every uplink field a differentially private release (docs/design.md §2).

Uplink: the soft counts m~ (Gaussian mechanism, L2 sensitivity 1 per record), which components
follow (a function of m~), and w * theta for them (DP-SGD, weighted by m~). Each is tied to its
ledger event; the ledger composes every event of the run. The server sees them in the clear:
the `secure` protocol adds CKKS on top. `statistics` (sizes M, S, H) adds the DP statistics
phase before the VAE rounds; its weights are then post-processing of the histogram release.
"""

from __future__ import annotations

from collections.abc import Mapping

from securegmi.protocol import FieldKind, ProtocolSpec

from ._round import fedgmi_protocol, heaviest

NAME = "dp"
DESCRIBE = {
    "component_sums": "S_k: sum of the clients' DP releases (post-processing)",
    "component_masses": "W_k: sum of the clients' released weights (post-processing)",
    "masses": "w = max(m~, 0): DP weights (event counts@round, or the histogram release's)",
    "component_index": "the B largest released weights (post-processing of the same event)",
    "weighted_components": "w * theta after this round's DP-SGD steps (event dpsgd@round)",
}


def build(
    *, components: int, parameters: int, top_b: int | None = None, statistics: Mapping[str, int] | None = None
) -> ProtocolSpec:
    return fedgmi_protocol(
        NAME,
        "FedGMI round; every uplink field is a DP release on the client's ledger.",
        FieldKind.DP_RELEASE,
        DESCRIBE,
        release="dp",
        codec="clear",
        dims={"K": components, "P": parameters, "B": heaviest(components, top_b)},
        statistics=statistics,
    )
