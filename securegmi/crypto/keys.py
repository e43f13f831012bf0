"""Keys: a secret context that only clients hold, and a public one that the server gets.

The secret context is created by a key ceremony and shared among clients out of band. It uses
SEAL's symmetric encryption: its public form can neither decrypt nor encrypt, so a server holding
it can only add what clients sent.

The key id is the SHA-256 of the public context's bytes as written by the ceremony. It is fixed
then: SEAL stores some key material seeded, so re-serialising a loaded context gives other bytes
(measured: a reloaded context's public serialisation hashed differently).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tenseal as ts
from tenseal import sealapi

from securegmi.crypto.params import CkksParameters
from securegmi.errors import CryptoError
from securegmi.files import KEY_FILE, open_regular, read_bytes, write_atomic

SECRET_FILE = "secret.ckks"
PUBLIC_FILE = "public.ckks"


def key_id_of(public_bytes: bytes) -> str:
    return hashlib.sha256(public_bytes).hexdigest()


class PublicContext:
    """The evaluation-only context: parse, check and add ciphertexts. Never a secret key."""

    def __init__(self, public_bytes: bytes, params: CkksParameters) -> None:
        try:
            context = ts.context_from(public_bytes)
        except Exception as exc:
            raise CryptoError(f"public context bytes do not parse: {exc}") from exc
        if context.has_secret_key() or context.is_private():
            raise CryptoError("refusing a context that holds a secret key: the server must never have one")
        self.context = context
        self.params = params
        self.public_bytes = public_bytes
        self.key_id = key_id_of(public_bytes)
        self.seal_context = context.seal_context().data
        self.evaluator = sealapi.Evaluator(self.seal_context)

    def __repr__(self) -> str:
        return f"PublicContext(key_id={self.key_id[:12]}..., N={self.params.poly_modulus_degree})"


class SecretContext:
    """The clients' context: encrypt and decrypt. Its safe export is the public context; the
    secret bytes are written only by `save_secret`, with owner-only permissions."""

    def __init__(self, context: ts.Context, params: CkksParameters, public_bytes: bytes) -> None:
        if not context.has_secret_key():
            raise CryptoError("a secret context needs its secret key")
        self.context = context
        self.params = params
        self.public_bytes = public_bytes
        self.key_id = key_id_of(public_bytes)
        self.seal_context = context.seal_context().data
        secret_key = context.secret_key().data
        self.encoder = sealapi.CKKSEncoder(self.seal_context)
        self.encryptor = sealapi.Encryptor(self.seal_context, secret_key)
        self.decryptor = sealapi.Decryptor(self.seal_context, secret_key)

    @classmethod
    def generate(cls, params: CkksParameters) -> SecretContext:
        """The key ceremony: fresh keys for one study."""
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
        context.global_scale = params.scale
        return cls(context, params, context.serialize(save_secret_key=False))

    def public(self) -> PublicContext:
        return PublicContext(self.public_bytes, self.params)

    def __repr__(self) -> str:  # never the key material
        return f"SecretContext(key_id={self.key_id[:12]}..., N={self.params.poly_modulus_degree})"

    @staticmethod
    def check_destination(directory: Path) -> None:
        """`CryptoError` unless `save` could write to `directory`: a directory (or nothing yet)
        holding neither key file, as anything at all (a dangling link counts, and is never
        written through)."""
        if not str(directory).strip():
            raise CryptoError("the key directory is empty: name the directory to write the keys to")
        if os.path.lexists(directory) and not Path(directory).is_dir():
            raise CryptoError(f"{directory} exists and is not a directory: name a directory for the keys")
        for name in (SECRET_FILE, PUBLIC_FILE):
            if os.path.lexists(Path(directory) / name):
                raise CryptoError(f"{Path(directory) / name} exists: refusing to overwrite a key")

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write the secret context (mode 0600) and the public context to `directory` (created
        owner-only if missing). Neither may exist yet, as anything (a link included). Each is
        written whole to a temporary file beside it, fsynced, then renamed into place, so a
        write cut short (a full disk, a kill) leaves no key file at all, never a truncated one."""
        directory = Path(directory)
        self.check_destination(directory)
        secret_path, public_path = directory / SECRET_FILE, directory / PUBLIC_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CryptoError(f"cannot create the key directory {directory}: {exc.strerror}") from None
        secret = self.context.serialize(save_secret_key=True)
        write_atomic(secret_path, secret, error=CryptoError, mode=0o600, replace=False)
        try:
            write_atomic(public_path, self.public_bytes, error=CryptoError, replace=False)
        except CryptoError:
            secret_path.unlink(missing_ok=True)  # a secret without its public half is no ceremony
            raise
        return secret_path, public_path

    @classmethod
    def load(cls, directory: Path, params: CkksParameters) -> SecretContext:
        """Load a ceremony's secret context together with its public context (the key id)."""
        secret_path, public_path = directory / SECRET_FILE, directory / PUBLIC_FILE
        if not os.path.lexists(secret_path) or not os.path.lexists(public_path):
            raise CryptoError(
                f"{directory} needs both {SECRET_FILE} and {PUBLIC_FILE} from `securegmi keys new`"
            )
        with open_regular(secret_path, KEY_FILE, CryptoError) as fh:  # no link, FIFO or device
            if os.fstat(fh.fileno()).st_mode & 0o077:
                raise CryptoError(f"{secret_path} is readable by others: chmod 600 it before use")
            secret = fh.read(KEY_FILE.limit + 1)
        public = read_bytes(public_path, KEY_FILE, CryptoError)
        try:
            context = ts.context_from(secret)
        except Exception as exc:
            raise CryptoError(f"{secret_path} is not a secret CKKS context: {exc}") from exc
        return cls(context, params, public)
