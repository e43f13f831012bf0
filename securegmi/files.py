"""Reading and writing securegmi's own files when the file system may be hostile.

Every file securegmi reads back (a run's records, a ledger, a client's state, a key, a site's
records) is opened here: regular files only, never through a symbolic link, and never more than
a cap that fits the kind of file. A FIFO named as a ledger would otherwise block a reader
forever, a link to /dev/zero would be read until memory ran out, and a link planted in a run
directory would redirect a read (or a write) to a file elsewhere.

Every file securegmi writes is written atomically here, by `write_atomic` alone: a fresh
temporary file in the target's own directory, fsynced, then `os.replace`, which renames over
the directory entry and never follows a link there, then an fsync of the directory. A write cut
short (a full disk, a kill, a power cut) leaves the old file or the new one, never a truncated
one or none: the ledger is written ahead of every release, and a ledger that a power cut rolled
back would let the same budget be spent twice.

The module sits beside `errors` at the bottom of the layering (docs/design.md §4): the ledger
(privacy), the transcript (protocol), the keys (crypto) and the client's state (federation)
read through it, and none of them may import `records`. Each caller passes the documented
error class its own callers expect (`PrivacyError` for a ledger, `CryptoError` for a key, ...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from securegmi.errors import RunDirectoryError, SecureGMIError

MiB = 1 << 20
GiB = 1 << 30

# Not every platform has these flags; where one is missing the fstat check below still refuses
# what is not a regular file (only after an open that may block).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)


@dataclass(frozen=True)
class FileKind:
    """What a file is (for messages) and the most bytes a genuine one of its kind holds."""

    what: str
    limit: int


# Caps, each well above what securegmi writes for the largest study it runs (MNIST, 784 features,
# K = 5, 100 clients, hundreds of rounds) and well below what would exhaust a machine's memory.
JSON_FILE = FileKind("JSON record", 16 * MiB)  # config, plan, protocol, results, engine summary
LEDGER_FILE = FileKind("privacy ledger", 64 * MiB)  # a few hundred bytes per release
METRICS_FILE = FileKind("metrics file", 64 * MiB)  # one short line per round
TRANSCRIPT_FILE = FileKind("transcript", 1 * GiB)  # one line per field of every message
TRANSCRIPT_LINE = 1 * MiB  # one transcript or metrics line (metadata only, never values)
MODEL_FILE = FileKind("model file", 2 * GiB)  # K components' float32 parameters and the identifier
STATE_FILE = FileKind("saved state", 4 * GiB)  # a client's or the server's state, ciphertexts included
KEY_FILE = FileKind("CKKS context", 512 * MiB)  # a secret or public context (keys for N <= 32768)
RECORDS_FILE = FileKind("records file", 4 * GiB)  # a site's records for `securegmi infer`


def _human(size: int) -> str:
    if size >= GiB:
        return f"{size / GiB:g} GiB"
    return f"{size / MiB:g} MiB" if size >= MiB else f"{size} bytes"


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(
    path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError
) -> Iterator[IO[bytes]]:
    """`path` opened for reading, if it is a regular file (not a link) of at most `kind.limit`
    bytes; else `error` naming the file and why."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever;
        # O_NOFOLLOW: a symbolic link as the last component fails with ELOOP instead of being
        # followed. Then fstat the descriptor itself (no race with a swapped path).
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _NOCTTY)
    except FileNotFoundError:
        raise error(f"cannot read {path}: it does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise error(
                f"cannot read {path}: it is a symbolic link, and securegmi reads only the regular files "
                "it wrote, never through a link"
            ) from None
        raise error(f"cannot read {path}: {_why(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(
                f"cannot read {path}: it is {_file_type(info.st_mode)}, and securegmi reads only regular "
                "files (a FIFO or a device could block or never end)"
            )
        if info.st_size > kind.limit:
            raise error(_too_large(path, kind))
        if _NONBLOCK:  # a regular file: back to ordinary blocking reads
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def _too_large(path: Path, kind: FileKind) -> str:
    return (
        f"cannot read {path}: it is larger than the {_human(kind.limit)} a {kind.what} may hold, so it "
        "is not a file securegmi wrote"
    )


def read_bytes(path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError) -> bytes:
    """The bytes of a regular file of at most `kind.limit` bytes (see `open_regular`)."""
    with open_regular(path, kind, error) as fh:
        try:
            data = fh.read(kind.limit + 1)  # bounded even if the file grows while it is read
        except OSError as exc:
            raise error(f"cannot read {path}: {_why(exc)}") from None
    if len(data) > kind.limit:
        raise error(_too_large(path, kind))
    return data


def read_text(path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError) -> str:
    try:
        return read_bytes(path, kind, error).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {path}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json(path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError) -> Any:
    return parse_json(read_text(path, kind, error), path, error)


def parse_json(text: str, path: Path, error: type[SecureGMIError] = RunDirectoryError) -> Any:
    """JSON, with every way it can fail (a deeply nested document overflows the parser's
    recursion) as `error` naming the file."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:120] if isinstance(exc, ValueError) else "nested too deeply"
        raise error(f"cannot read {path}: it is not valid JSON ({detail})") from None


def read_lines(path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError) -> Iterator[str]:
    """The non-blank lines of a regular UTF-8 file, read one at a time: the file at most
    `kind.limit` bytes, each line at most TRANSCRIPT_LINE."""
    total = 0
    with open_regular(path, kind, error) as fh:
        while True:
            try:
                raw = fh.readline(TRANSCRIPT_LINE + 1)
            except OSError as exc:
                raise error(f"cannot read {path}: {_why(exc)}") from None
            if not raw:
                return
            total += len(raw)
            if total > kind.limit:
                raise error(_too_large(path, kind))
            if len(raw) > TRANSCRIPT_LINE:
                raise error(
                    f"cannot read {path}: it has a line longer than {_human(TRANSCRIPT_LINE)}, so it is "
                    "not a file securegmi wrote"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"cannot read {path}: it is not UTF-8 text ({exc.reason})") from None
            if line.strip():
                yield line


def refuse_link(path: Path, error: type[SecureGMIError] = RunDirectoryError) -> None:
    """`error` if `path` is a symbolic link or exists as anything but a regular file (lstat:
    the link itself, never its target)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"cannot inspect {path}: {_why(exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{path} is a symbolic link: securegmi never writes through or over a link")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is {_file_type(info.st_mode)}: securegmi writes regular files only")


def write_atomic(
    path: Path,
    data: bytes,
    *,
    error: type[SecureGMIError] = RunDirectoryError,
    mode: int = 0o644,
    replace: bool = True,
) -> None:
    """Write `data` to `path` atomically and durably: a fresh temporary file in the same
    directory (so the rename cannot cross file systems), its bytes fsynced, then `os.replace`,
    then the directory fsynced (so the rename itself survives a power cut). `path` must not be
    a link or anything but a regular file; with `replace=False` it must not exist at all."""
    path = Path(path)
    refuse_link(path, error)
    if not replace and os.path.lexists(path):
        raise error(f"{path} exists: refusing to overwrite it")
    directory = path.parent
    try:
        # mkstemp: O_CREAT | O_EXCL with a random name, mode 0600, so a name planted in advance
        # (a link at a predictable temporary name) cannot be written through.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise error(f"cannot write {path}: {_why(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())  # the bytes on disk before the name points at them
        if not replace and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "it appeared while it was written", str(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise error(f"cannot write {path}: {_why(exc)}; nothing was written") from None
        raise
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so a rename in it survives a power cut (where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_append(path: Path, error: type[SecureGMIError] = RunDirectoryError) -> IO[str]:
    """`path` opened to append UTF-8 lines (created if missing), if it is a regular file, never
    through a link. O_NONBLOCK: opening a FIFO for writing fails at once (ENXIO) when nobody
    reads it, instead of blocking; one that has a reader is refused after fstat."""
    try:
        fd = os.open(
            path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _NOCTTY,
            0o644,
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP or Path(path).is_symlink():
            raise error(f"{path} is a symbolic link: securegmi never writes through a link") from None
        if exc.errno == errno.ENXIO:
            raise error(f"{path} is a FIFO: securegmi appends to regular files only") from None
        raise error(f"cannot open {path} to append: {_why(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {_file_type(info.st_mode)}: securegmi appends to regular files only")
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def require_regular(path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError) -> None:
    """`error` unless `path` is a regular file (lstat: not a link) of at most `kind.limit` bytes;
    for a file another library opens by its path (safetensors, SEAL), checked before it does."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise error(f"cannot read {path}: it does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {_why(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(
            f"cannot read {path}: it is {_file_type(info.st_mode)}, and securegmi reads only the regular "
            "files it wrote"
        )
    if info.st_size > kind.limit:
        raise error(_too_large(path, kind))


SAFETENSORS_HEADER = 100 * MiB  # the format's own cap on its JSON header


def safetensors_metadata(
    path: Path, kind: FileKind, error: type[SecureGMIError] = RunDirectoryError
) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading its header only (8 bytes of length,
    then that much JSON), not the arrays."""
    with open_regular(path, kind, error) as fh:
        try:
            prefix = fh.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or length > SAFETENSORS_HEADER:
                raise ValueError("its header length is not that of a safetensors file")
            header = json.loads(fh.read(length).decode("utf-8"))
            metadata = header.get("__metadata__") or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise ValueError("its metadata is not a map of strings")
        except OSError as exc:
            raise error(f"cannot read {path}: {_why(exc)}") from None
        except (ValueError, AttributeError, RecursionError) as exc:
            detail = " ".join(str(exc).split())[:160]
            why = f"it is not a safetensors file securegmi wrote ({detail})"
            raise error(f"cannot read {path}: {why}") from None
    return metadata


def safetensors_arrays(
    data: bytes, path: Path, error: type[SecureGMIError] = RunDirectoryError
) -> tuple[dict[str, Any], dict[str, str]]:
    """The arrays and the metadata of safetensors bytes (read with `read_bytes`), or `error`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(data)
        length = int.from_bytes(data[:8], "little")  # the format's header: u64 size, then JSON
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its metadata is not a map of strings")
    except (SafetensorError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise error(f"cannot read {path}: it is not a safetensors file securegmi wrote ({detail})") from None
    return arrays, metadata
