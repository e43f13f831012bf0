"""The plain FedGMI round: no DP, no encryption. Every data-derived field is NON_PRIVATE, so the
audit reports each one as an unprotected disclosure. For baselines and debugging only."""

from __future__ import annotations

from securegmi.protocol import FieldKind, ProtocolSpec

from ._round import fedgmi_protocol, heaviest

NAME = "plain"
DESCRIBE = {
    "component_sums": "S_k = sum_c w_ck theta_ck",
    "component_masses": "W_k = sum_c w_ck; a client sets theta_k = S_k / W_k",
    "masses": "w_ck: the client's soft counts sum_x r_k(x), zero where not sent",
    "component_index": "which components follow (the client's B heaviest)",
    "weighted_components": "w_ck * theta_ck for the components in component_index",
}


def build(*, components: int, parameters: int, top_b: int | None = None) -> ProtocolSpec:
    """The plain protocol for K components of P parameters each; a client uploads its B
    heaviest components (B = K unless `top_b` is set)."""
    return fedgmi_protocol(
        NAME,
        "FedGMI round in the clear (docs/design.md §1); nothing is protected.",
        FieldKind.NON_PRIVATE,
        DESCRIBE,
        release="none",
        codec="clear",
        dims={"K": components, "P": parameters, "B": heaviest(components, top_b)},
    )
