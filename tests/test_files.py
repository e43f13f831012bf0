"""securegmi.files, the one way securegmi opens what it reads back and writes what it keeps:
regular files only (never a FIFO, a device or through a link), within a cap per kind of file,
and every write atomic. Each refusal has a negative control that shows what the plain call of
the standard library would have done with the same file."""

from __future__ import annotations

import ast
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from securegmi.errors import CryptoError, PrivacyError, RunDirectoryError
from securegmi.files import (
    LEDGER_FILE,
    TRANSCRIPT_LINE,
    FileKind,
    open_append,
    read_bytes,
    read_json,
    read_lines,
    require_regular,
    write_atomic,
)

from .fifo_guard import FifoGuard

SMALL = FileKind("test file", 1024)


def test_a_fifo_is_refused_at_once_where_a_plain_open_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "ledger.json"
    os.mkfifo(fifo)
    with FifoGuard(fifo) as guard, pytest.raises(PrivacyError, match="is a FIFO"):
        read_json(fifo, LEDGER_FILE, PrivacyError)
    assert guard.rescued == []  # it never waited for a writer
    # Negative control: the standard library's open of the same FIFO waits for a writer.
    opened = threading.Event()
    reader = threading.Thread(target=lambda: (fifo.read_bytes(), opened.set()), daemon=True)
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not opened.is_set()  # blocked in open()
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # be its writer: it reads EOF and ends
    reader.join()
    assert opened.is_set()


def test_the_fifo_guard_rescues_a_reader_that_blocks(tmp_path: Path) -> None:
    """Negative control of the guard the FIFO tests rely on: a plain read that blocks is
    unblocked (it reads end-of-file) and reported, so a regression fails instead of hanging."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with FifoGuard(fifo, after=0.2) as guard:
        assert fifo.read_bytes() == b""
    assert guard.rescued and guard.rescued[0] == fifo
    with FifoGuard(fifo, after=0.2) as guard, fifo.open("a") as fh:  # a writer that waits, too
        fh.write("x")
    assert guard.rescued and guard.rescued[0] == fifo


def test_devices_directories_and_links_are_refused_naming_the_file(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "folder.json").mkdir()
    cases = {
        tmp_path / "link.json": "symbolic link",
        tmp_path / "zero.json": "symbolic link",
        Path("/dev/zero"): "character device",
        tmp_path / "folder.json": "directory",
        tmp_path / "missing.json": "does not exist",
    }
    for path, why in cases.items():
        with pytest.raises(RunDirectoryError, match=why) as caught:
            read_bytes(path, SMALL)
        assert str(path) in str(caught.value)
        with pytest.raises(RunDirectoryError, match=why):
            require_regular(path, SMALL)
    # Negative control: the link's target is a readable regular file, and a plain read follows
    # the link to it; the refusal is of the link itself.
    assert read_bytes(target, SMALL) == (tmp_path / "link.json").read_bytes() == b"{}"


def test_a_file_over_its_kinds_cap_is_refused_and_one_at_the_cap_is_read(tmp_path: Path) -> None:
    at, over = tmp_path / "at", tmp_path / "over"
    at.write_bytes(b"x" * SMALL.limit)
    over.write_bytes(b"x" * (SMALL.limit + 1))
    assert len(read_bytes(at, SMALL)) == SMALL.limit  # negative control: the cap is the boundary
    with pytest.raises(RunDirectoryError, match="larger than the 1024 bytes a test file may hold"):
        read_bytes(over, SMALL)
    with pytest.raises(RunDirectoryError, match="larger than"):
        require_regular(over, SMALL)
    sparse = tmp_path / "sparse.json"
    with sparse.open("wb") as fh:
        fh.truncate(LEDGER_FILE.limit + 1)  # no disk used: the size is all the reader sees
    with pytest.raises(PrivacyError, match="64 MiB a privacy ledger may hold"):
        read_json(sparse, LEDGER_FILE, PrivacyError)


def test_lines_are_bounded_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n\n' + b"x" * (TRANSCRIPT_LINE + 1) + b"\n")
    lines = read_lines(path, FileKind("transcript", 1 << 30))
    assert next(lines) == '{"a": 1}\n'  # the blank line is skipped, the long one refused
    with pytest.raises(RunDirectoryError, match="line longer than 1 MiB"):
        next(lines)


def test_json_nested_too_deeply_is_a_documented_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunDirectoryError, match="nested too deeply"):
        read_json(path, FileKind("JSON", 1 << 20))


def test_writes_never_follow_a_link_and_the_plain_write_would(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "pi.png"
    link.symlink_to(victim)
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        write_atomic(link, b"PNG")
    assert victim.read_text() == "precious" and link.is_symlink()
    # Negative control: writing the path the ordinary way writes the link's target.
    link.write_bytes(b"PNG")
    assert victim.read_bytes() == b"PNG"


def test_a_planted_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    """The temporary file is a fresh random name (mkstemp, O_EXCL): a link at the old fixed
    name `<target>.tmp` is left alone."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "config.json.tmp").symlink_to(victim)
    write_atomic(tmp_path / "config.json", b"{}")
    assert (tmp_path / "config.json").read_bytes() == b"{}" and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "config.json.tmp", "victim"]


def test_a_write_cut_short_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # fails after the bytes went to the temporary
    with pytest.raises(CryptoError, match="No space left on device; nothing was written"):
        write_atomic(target, b"new" * 1000, error=CryptoError)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def _disk_events(monkeypatch: pytest.MonkeyPatch, write: Callable[[], None]) -> list[str]:
    """What `write` asks of the disk, in order: each fsync (of a regular file or of a directory)
    and each rename."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source: str, target: str) -> None:
        events.append("rename")
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "replace", replace)
        write()
    return events


def test_every_write_reaches_the_disk_before_its_rename_and_the_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after the rename must find the new bytes under the name (the file fsynced
    first) and the new name in the directory (the directory fsynced after): the ledger is
    written ahead of every release. Negative control: the hand-written temporary-file-and-
    replace the Flower adapter had syncs nothing."""
    target = tmp_path / "ledger.json"
    written = _disk_events(monkeypatch, lambda: write_atomic(target, b"{}"))
    assert written == ["fsync file", "rename", "fsync directory"]
    assert target.read_bytes() == b"{}"

    def by_hand() -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(b"[]")
        os.replace(tmp, target)

    assert _disk_events(monkeypatch, by_hand) == ["rename"]


# What writes or renames a file: only securegmi.files may call these (everything else writes
# through write_atomic, or appends through open_append).
_WRITERS = {"write_text", "write_bytes", "replace", "rename", "move", "link", "symlink_to"}


def hand_written_writes(root: Path, folders: tuple[str, ...]) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if path == root / "securegmi" / "files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner, name = node.func.value, node.func.attr
                module = owner.id if isinstance(owner, ast.Name) else None
                by_os = module in ("os", "shutil") and name in _WRITERS
                if by_os or name in {"write_text", "write_bytes", "symlink_to"}:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_every_file_the_package_writes_goes_through_the_one_atomic_writer() -> None:
    root = Path(__file__).resolve().parents[1]
    assert hand_written_writes(root, ("securegmi", "cli", "protocols")) == []


def test_the_writer_check_catches_a_hand_written_write(tmp_path: Path) -> None:
    # Negative control: each way around write_atomic, planted in a package module.
    (tmp_path / "securegmi").mkdir()
    (tmp_path / "securegmi" / "a.py").write_text(
        "import os\nfrom pathlib import Path\n"
        "Path('x.tmp').write_bytes(b'')\nos.replace('x.tmp', 'x')\nPath('y').write_text('')\n"
    )
    assert hand_written_writes(tmp_path, ("securegmi",)) == [
        "securegmi/a.py:3 write_bytes",
        "securegmi/a.py:4 replace",
        "securegmi/a.py:5 write_text",
    ]


def test_no_clobber_writes_refuse_an_existing_name_even_a_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "secret.ckks").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CryptoError, match="symbolic link"):
        write_atomic(tmp_path / "secret.ckks", b"key", error=CryptoError, replace=False)
    assert not (tmp_path / "nowhere").exists()


def test_appending_to_a_fifo_or_a_link_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "transcript.jsonl"
    os.mkfifo(fifo)
    with FifoGuard(fifo) as guard, pytest.raises(RunDirectoryError, match="FIFO"):
        open_append(fifo)  # nobody reads it: O_NONBLOCK makes the open fail (ENXIO), not wait
    assert guard.rescued == []
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # now somebody does: fstat refuses it
    try:
        with pytest.raises(RunDirectoryError, match="a FIFO"):
            open_append(fifo)
    finally:
        os.close(reader)
    victim = tmp_path / "victim"
    victim.write_text("")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        open_append(tmp_path / "metrics.jsonl")
    with open_append(tmp_path / "new.jsonl") as fh:  # negative control: a regular file appends
        fh.write("{}\n")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n" and victim.read_text() == ""
