"""The `dp` round under CKKS: every uplink value is a DP release AND encrypted (docs/design.md §2-3).

The server receives the clients' pre-weighted components and weights only as ciphertexts under
the clients' shared key, adds them with an evaluation-only context, and returns the encrypted
sums; clients decrypt and divide. All K components are sent (top-B would need cleartext
indices, so it is not offered here). The K masses travel in the free slots of the components'
last ciphertext chunk rather than in a chunk of their own (a sixteenth of the chunks a client
encrypts per round on digits).
"""

from __future__ import annotations

from collections.abc import Mapping

from securegmi.errors import ConfigError
from securegmi.protocol import FieldKind, ProtocolSpec

from ._round import fedgmi_protocol

NAME = "secure"
DESCRIBE = {
    "component_sums": "Enc(S_k), K x P values",
    "component_masses": "Enc(W_k), in the last chunk of component_sums",
    "masses": "Enc(w): DP weights (event counts@round, or the histogram release's), in the last "
    "chunk of weighted_components",
    "weighted_components": "Enc(w * theta): DP-SGD components (event dpsgd@round)",
}


def build(
    *, components: int, parameters: int, top_b: int | None = None, statistics: Mapping[str, int] | None = None
) -> ProtocolSpec:
    if top_b is not None and top_b != components:
        raise ConfigError("the secure protocol sends all components: top-B needs cleartext indices")
    return fedgmi_protocol(
        NAME,
        "FedGMI round; DP releases encrypted under the clients' CKKS key; server only adds.",
        FieldKind.CIPHERTEXT,
        DESCRIBE,
        release="dp",
        codec="ckks",
        dims={"K": components, "P": parameters, "B": components},
        statistics=statistics,
        pack_masses=True,
    )
