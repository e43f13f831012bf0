"""SEAL ciphertexts to and from bytes.

TenSEAL's high-level vectors cannot produce seeded ciphertexts; SEAL's symmetric encryption
stores the pseudo-random half of a fresh ciphertext as a seed, halving the upload
(bench/results/tuning.md#seeded-ciphertexts). SEAL's Python bindings
save and load through file paths only (`Ciphertext.save(str)`, `load(context, str)`; no bytes,
stream or compression-mode overload in TenSEAL 0.3.18), so the bytes pass through a file.

On Linux that file is an anonymous memory file (`memfd_create`) reached through its
`/proc/self/fd` path: it has no name in any directory, so nothing is left behind if the process
dies, no other user's process can open it, and there are no directory operations per chunk
(a private directory made every chunk's save and load slower:
bench/results/tuning.md#seeded-ciphertexts). Elsewhere it is a private temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tenseal import sealapi


@contextmanager
def _memory_file() -> Iterator[tuple[int, str]]:
    """An open, empty, private file and a path SEAL can open it by; closed (and so freed) after."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("securegmi-ciphertext", os.MFD_CLOEXEC)
        try:
            yield fd, f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = Path(tempfile.mkdtemp(prefix="securegmi-"))
    path = directory / "ct"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield fd, str(path)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        directory.rmdir()


def save_bytes(obj: sealapi.Ciphertext | sealapi.SerializableCiphertext) -> bytes:
    with _memory_file() as (fd, path):
        obj.save(path)
        return os.pread(fd, os.fstat(fd).st_size, 0)


def load_ciphertext(context: sealapi.SEALContext, data: bytes) -> sealapi.Ciphertext:
    """Parse bytes as a ciphertext valid for `context` (SEAL checks parameters on load)."""
    with _memory_file() as (fd, path):
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError("short write of a ciphertext into its scratch file")
        ciphertext = sealapi.Ciphertext()
        ciphertext.load(context, path)
        return ciphertext
