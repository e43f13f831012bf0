"""Ed25519 signing keys of the clients, and the registry of their public keys.

The key ceremony gives every client its own signing key (`SigningKey.generate`), written only
to that client's side with owner-only permissions, and collects the public keys into a
`SignerRegistry` (client id -> 32-byte Ed25519 public key), which the study registers. A client
signs every message it sends and every ledger entry it writes; the server checks each uplink
message against the registry, and the audit checks the transcript and the ledgers against it.
Whoever rewrites a run's records without the clients' keys cannot sign the rewrite.

What is signed is a domain-separated statement (canonical JSON with a `domain` string), never
raw payload bytes, so a signature made for one purpose (a message, a ledger entry) is never
valid for another. Keys and signatures travel as hex; nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securegmi.errors import CryptoError
from securegmi.files import JSON_FILE, open_regular, read_json, write_atomic

SIGNING_KEY_SUFFIX = ".ed25519"  # <client>.ed25519: one client's private key, hex, mode 0600
SIGNERS_FILE = "signers.json"  # the registry of public keys
_HEX_KEY = re.compile(r"[0-9a-f]{64}")
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_KEY_BYTES = 32


def statement(domain: str, content: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: `content` under `domain`, as canonical JSON."""
    return json.dumps({"domain": domain, **content}, sort_keys=True, separators=(",", ":")).encode()


class SigningKey:
    """One client's Ed25519 private key. Its repr never shows the key; `save` is the only
    place its bytes are written."""

    def __init__(self, client_id: str, private: Ed25519PrivateKey) -> None:
        self.client_id = client_id
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, client_id: str) -> SigningKey:
        return cls(client_id, Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> str:
        """The signature of `message`, as hex (128 characters)."""
        return self._private.sign(message).hex()

    def __repr__(self) -> str:
        return f"SigningKey(client={self.client_id!r}, public={self.public_bytes.hex()[:12]}...)"

    @staticmethod
    def path_in(directory: Path, client_id: str) -> Path:
        return Path(directory) / f"{client_id}{SIGNING_KEY_SUFFIX}"

    def save(self, directory: Path) -> Path:
        """Write the private key (hex, mode 0600) to `directory` (created owner-only): never over
        an existing file, never through a link."""
        directory = Path(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CryptoError(f"cannot create the key directory {directory}: {exc.strerror}") from None
        path = self.path_in(directory, self.client_id)
        raw = self._private.private_bytes_raw().hex().encode()
        write_atomic(path, raw, error=CryptoError, mode=0o600, replace=False)
        return path

    @classmethod
    def load(cls, directory: Path, client_id: str) -> SigningKey:
        """`client_id`'s key from `directory`; `CryptoError` for a key others can read, or one
        that is not 32 bytes of hex."""
        path = cls.path_in(directory, client_id)
        if not os.path.lexists(path):
            raise CryptoError(f"{path} does not exist: {client_id}'s signing key is made by the key ceremony")
        with open_regular(path, JSON_FILE, CryptoError) as fh:  # no link, FIFO or device
            if os.fstat(fh.fileno()).st_mode & 0o077:
                raise CryptoError(f"{path} is readable by others: chmod 600 it before use")
            text = fh.read(4 * _KEY_BYTES).decode("ascii", "replace").strip()
        if not _HEX_KEY.fullmatch(text):
            raise CryptoError(f"{path} is not an Ed25519 signing key (32 bytes as hex)")
        return cls(client_id, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text)))


class SignerRegistry:
    """The public keys the study registered, by client id: what every signature is checked
    against. `fingerprint` (SHA-256 of its canonical JSON) is what an auditor compares with the
    study's record of the registration."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for client, key in keys.items():
            if not (isinstance(client, str) and isinstance(key, bytes) and len(key) == _KEY_BYTES):
                raise CryptoError(f"signer {client!r}: an Ed25519 public key is 32 bytes")
        self._keys = MappingProxyType(dict(sorted(keys.items())))
        self._verifiers = {c: Ed25519PublicKey.from_public_bytes(k) for c, k in self._keys.items()}

    @classmethod
    def of(cls, keys: Mapping[str, SigningKey]) -> SignerRegistry:
        return cls({client: key.public_bytes for client, key in keys.items()})

    def __contains__(self, client: object) -> bool:
        return client in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SignerRegistry) and dict(self._keys) == dict(other._keys)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"SignerRegistry({len(self)} signers, fingerprint={self.fingerprint[:12]}...)"

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": "ed25519", "signers": {c: k.hex() for c, k in self._keys.items()}}

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> SignerRegistry:
        if not (isinstance(data, dict) and data.get("algorithm") == "ed25519"):
            raise CryptoError("a signer registry is a JSON object with algorithm 'ed25519'")
        signers = data.get("signers")
        if not isinstance(signers, dict) or not all(
            isinstance(k, str) and _HEX_KEY.fullmatch(k) for k in signers.values()
        ):
            raise CryptoError("a signer registry's 'signers' maps each client id to its public key (hex)")
        return cls({c: bytes.fromhex(k) for c, k in signers.items()})

    def save(self, path: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        write_atomic(Path(path), text.encode(), error=CryptoError)

    @classmethod
    def load(cls, path: Path) -> SignerRegistry:
        return cls.from_json(read_json(Path(path), JSON_FILE, CryptoError))

    def verify(self, client: str, message: bytes, signature: str) -> None:
        """`CryptoError` unless `signature` is `client`'s signature of `message`."""
        verifier = self._verifiers.get(client)
        if verifier is None:
            raise CryptoError(f"{client!r} is not a registered signer")
        if not (isinstance(signature, str) and _HEX_SIGNATURE.fullmatch(signature)):
            raise CryptoError("a malformed signature" if signature else "no signature")
        try:
            verifier.verify(bytes.fromhex(signature), message)
        except InvalidSignature:
            raise CryptoError(f"the signature does not verify against {client}'s registered key") from None

    def valid(self, client: str, message: bytes, signature: str) -> bool:
        try:
            self.verify(client, message, signature)
        except CryptoError:
            return False
        return True
