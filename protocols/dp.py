"""The FedGMI round with every uplink field a differentially private release (DESIGN §2).

Uplink: the soft counts m~ (Gaussian mechanism, L2 sensitivity 1 per record), which components
follow (a function of m~), and w * theta for them (DP-SGD, weighted by m~). Each is tied to its
ledger event; the ledger composes every event of the run. The server sees them in the clear:
the `secure` protocol adds CKKS on top.
"""

from __future__ import annotations

from collections.abc import Mapping

from securegmi.protocol import FieldKind, FieldSpec, ProtocolSpec, StageSpec

from ._statistics import with_statistics

NAME = "dp"


def build(
    *,
    components: int,
    parameters: int,
    top_b: int | None = None,
    statistics: Mapping[str, int] | None = None,
) -> ProtocolSpec:
    """`statistics` (sizes M, S, H) adds the DP statistics phase before the VAE rounds."""
    b = components if top_b is None else top_b
    if not 1 <= b <= components:
        raise ValueError(f"top_b must be between 1 and {components}, got {top_b}")
    dp = FieldKind.DP_RELEASE
    spec = ProtocolSpec(
        name=NAME,
        description="FedGMI round; every uplink field is a DP release on the client's ledger.",
        stages=(
            StageSpec(
                "broadcast",
                "server",
                (
                    FieldSpec(
                        "component_sums",
                        dp,
                        ("K", "P"),
                        "float32",
                        "S_k: sum of the clients' DP releases (post-processing)",
                    ),
                    FieldSpec(
                        "component_masses",
                        dp,
                        ("K",),
                        "float64",
                        "W_k: sum of the clients' released counts (post-processing)",
                    ),
                    FieldSpec(
                        "temperature",
                        FieldKind.PUBLIC,
                        (),
                        "float64",
                        "likelihood temperature of this round's E-step (public schedule)",
                    ),
                ),
            ),
            StageSpec(
                "update",
                "client",
                (
                    FieldSpec(
                        "masses",
                        dp,
                        ("K",),
                        "float64",
                        "max(m~, 0): soft counts + Gaussian noise (event counts@round)",
                    ),
                    FieldSpec(
                        "component_index",
                        dp,
                        ("B",),
                        "int64",
                        "the B largest released counts (post-processing of counts@round)",
                    ),
                    FieldSpec(
                        "weighted_components",
                        dp,
                        ("B", "P"),
                        "float32",
                        "w * theta after this round's DP-SGD steps (event dpsgd@round)",
                    ),
                ),
            ),
        ),
    ).bind(K=components, P=parameters, B=b)
    return with_statistics(spec, dp, "", statistics)
