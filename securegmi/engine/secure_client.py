"""A DP client that also encrypts every upload under the clients' CKKS key (DESIGN §3)."""

from __future__ import annotations

import numpy as np

from securegmi.core.mixture import MixtureOfVAEs
from securegmi.crypto.envelope import decrypt, encrypt
from securegmi.crypto.keys import SecretContext
from securegmi.engine.client import ClientSettings
from securegmi.engine.dp_client import ClientPrivacy, DpFedGMIClient
from securegmi.errors import ProtocolViolation
from securegmi.protocol import Message, ProtocolSpec
from securegmi.protocol.fields import Ciphertext


class SecureDpFedGMIClient(DpFedGMIClient):
    """Decrypts the aggregate it receives; encrypts what it sends. The decrypted aggregate
    never goes back to the server: only this round's own (DP) update is encrypted and sent."""

    def __init__(
        self,
        client_id: str,
        x_train: np.ndarray,
        model: MixtureOfVAEs,
        settings: ClientSettings,
        spec: ProtocolSpec,
        seed: int,
        privacy: ClientPrivacy,
        keys: SecretContext,
    ) -> None:
        super().__init__(client_id, x_train, model, settings, spec, seed, privacy)
        self.keys = keys
        self.key_id = keys.key_id

    def read_aggregate(self, message: Message) -> tuple[np.ndarray, np.ndarray]:
        sums, masses = message.payload.get("component_sums"), message.payload.get("component_masses")
        if not isinstance(sums, Ciphertext) or not isinstance(masses, Ciphertext):
            raise ProtocolViolation(f"{self.client_id}: expected an encrypted aggregate")
        k, p = self.model.n_components, self.model.parameter_count()
        return decrypt(self.keys, sums.data).reshape(k, p), decrypt(self.keys, masses.data)

    def read_vector(self, message: Message, name: str) -> np.ndarray:
        field = message.payload.get(name)
        if not isinstance(field, Ciphertext):
            raise ProtocolViolation(f"{self.client_id}: expected an encrypted {name}")
        return decrypt(self.keys, field.data).astype(np.float64)

    def encode_values(self, values: dict[str, np.ndarray | bytes]) -> dict[str, np.ndarray | bytes]:
        return {name: encrypt(self.keys, np.asarray(v)) for name, v in values.items()}
