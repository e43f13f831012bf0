"""The `dp` round under CKKS: every uplink value is a DP release AND encrypted (DESIGN §2-3).

The server receives the clients' pre-weighted components and counts only as ciphertexts under
the clients' shared key, adds them with an evaluation-only context, and returns the encrypted
sums; clients decrypt and divide. Round 0 has its own `start` stage: the server cannot encrypt,
so clients begin from the public initialisation. All K components are sent (top-B would need
cleartext indices, so it is not offered here).
"""

from __future__ import annotations

from collections.abc import Mapping

from securegmi.protocol import FieldKind, FieldSpec, ProtocolSpec, StageSpec

from ._statistics import with_statistics

NAME = "secure"


def build(
    *,
    components: int,
    parameters: int,
    top_b: int | None = None,
    statistics: Mapping[str, int] | None = None,
) -> ProtocolSpec:
    """`statistics` (sizes M, S, H) adds the DP statistics phase before the VAE rounds."""
    if top_b is not None and top_b != components:
        raise ValueError("the secure protocol sends all components: top-B needs cleartext indices")
    ct, public = FieldKind.CIPHERTEXT, FieldKind.PUBLIC
    temperature = FieldSpec("temperature", public, (), "float64", "likelihood temperature (public schedule)")
    spec = ProtocolSpec(
        name=NAME,
        description="FedGMI round; DP releases encrypted under the clients' CKKS key; server only adds.",
        stages=(
            StageSpec("start", "server", (temperature,)),
            StageSpec(
                "broadcast",
                "server",
                (
                    FieldSpec("component_sums", ct, ("K", "P"), "float32", "Enc(S_k), K x P values"),
                    FieldSpec("component_masses", ct, ("K",), "float64", "Enc(W_k)"),
                    temperature,
                ),
            ),
            StageSpec(
                "update",
                "client",
                (
                    FieldSpec(
                        "masses",
                        ct,
                        ("K",),
                        "float64",
                        "Enc(max(m~, 0)): DP soft counts (event counts@round)",
                    ),
                    FieldSpec(
                        "weighted_components",
                        ct,
                        ("K", "P"),
                        "float32",
                        "Enc(w * theta): DP-SGD components weighted by DP counts (event dpsgd@round)",
                    ),
                ),
            ),
        ),
    ).bind(K=components, P=parameters, B=components)
    return with_statistics(spec, ct, "Enc: ", statistics)
