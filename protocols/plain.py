"""The plain FedGMI round: no DP, no encryption. Every data-derived field is NON_PRIVATE, so the
audit reports each one as an unprotected disclosure. For baselines and debugging only."""

from __future__ import annotations

from securegmi.protocol import FieldKind, FieldSpec, ProtocolSpec, StageSpec

NAME = "plain"


def build(*, components: int, parameters: int, top_b: int | None = None) -> ProtocolSpec:
    """The plain protocol for K components of P parameters each; a client uploads its B
    heaviest components (B = K unless `top_b` is set)."""
    b = components if top_b is None else top_b
    if not 1 <= b <= components:
        raise ValueError(f"top_b must be between 1 and {components}, got {top_b}")
    return ProtocolSpec(
        name=NAME,
        description="FedGMI round in the clear (DESIGN §1); nothing is protected.",
        stages=(
            StageSpec(
                "broadcast",
                "server",
                (
                    FieldSpec(
                        "component_sums",
                        FieldKind.NON_PRIVATE,
                        ("K", "P"),
                        "float32",
                        "S_k = sum_c w_ck theta_ck (public initialisation in round 0)",
                    ),
                    FieldSpec(
                        "component_masses",
                        FieldKind.NON_PRIVATE,
                        ("K",),
                        "float64",
                        "W_k = sum_c w_ck; a client sets theta_k = S_k / W_k",
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
                        FieldKind.NON_PRIVATE,
                        ("K",),
                        "float64",
                        "w_ck: the client's soft counts sum_x r_k(x), zero where not sent",
                    ),
                    FieldSpec(
                        "component_index",
                        FieldKind.NON_PRIVATE,
                        ("B",),
                        "int64",
                        "which components follow (the client's B heaviest)",
                    ),
                    FieldSpec(
                        "weighted_components",
                        FieldKind.NON_PRIVATE,
                        ("B", "P"),
                        "float32",
                        "w_ck * theta_ck for the components in component_index",
                    ),
                ),
            ),
        ),
    ).bind(K=components, P=parameters, B=b)
