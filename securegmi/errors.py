"""The one exception tree of securegmi.

Every error a user can cause derives from :class:`SecureGMIError`, so callers (the CLI above all)
can report it as a message instead of a traceback. Messages say what is wrong and what to do.
Anything else that escapes securegmi is a bug (the CLI says so, with exit code 70). docs/guides/cli.md's
"Errors and exit codes" section lists the classes; keep the two in step.
"""

from __future__ import annotations


class SecureGMIError(Exception):
    """Base class of every error securegmi raises on purpose."""


class ConfigError(SecureGMIError, ValueError):
    """A configuration value, a protocol declaration or a component's shape is invalid; the
    message names the field and the accepted range."""


class DataError(SecureGMIError, ValueError):
    """Records cannot be read or used: a dataset that cannot be loaded or split, records that are
    empty, non-finite, of the wrong feature count or outside the decoder's range."""


class RefusalError(SecureGMIError):
    """A check at one end of a link refused a message: nothing was sent, or what arrived was not
    added. A round goes on without that client; the subclasses say which check refused."""


class ProtocolViolation(RefusalError):
    """A message does not match its protocol's declaration; nothing was sent or accepted."""


class RunDirectoryError(SecureGMIError):
    """A run directory is missing, incomplete or would be overwritten."""


class BudgetExceededError(RefusalError):
    """A round's privacy events would exceed a client's budget; the round is refused and
    nothing is sent."""


class PrivacyError(SecureGMIError):
    """A privacy configuration or module that cannot give the stated guarantee."""


class RunAbortedError(SecureGMIError):
    """A run could not go on (e.g. every client refused a round); completed rounds are on disk."""


class CryptoError(RefusalError):
    """Unsafe CKKS parameters, a wrong key, or a ciphertext that fails its structure checks."""


class SignatureError(ProtocolViolation, CryptoError):
    """A message or ledger entry without a valid Ed25519 signature of its sender's registered
    key: forged, altered, replayed from another round, stage or run, or signed by another
    client. Nothing of it is accepted."""
