"""A guard for tests that hand a FIFO to code that must never block on it.

Code that opens a FIFO without O_NONBLOCK waits in open() for the other end, forever in a test.
The guard is that other end: after `after` seconds a watcher opens each FIFO without blocking,
as a writer (which succeeds only if a reader holds or waits on it) and as a reader (a writer
waiting in open() then goes on), closes it at once, and reports that it had to. The blocked
code sees end-of-file (or a broken pipe) and the test fails instead of hanging CI. Code that
refuses the FIFO closes it within milliseconds, long before the watcher looks.

The watcher is a separate process, not a thread: a library that blocks in open() from C
(safetensors, SEAL) may hold the GIL, and a thread could then never run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import TracebackType

_WATCH = r"""
import os, select, sys, time
after, fifos = float(sys.argv[1]), sys.argv[2:]


def stopped(seconds):  # the test closes our stdin to stop us, between two probes
    return bool(select.select([sys.stdin], [], [], seconds)[0]) and not sys.stdin.read()


if not stopped(after):
    while True:
        for fifo in fifos:
            try:  # a writer: succeeds only if some reader holds the FIFO (or waits in open)
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                pass
            else:
                print("reader", fifo, flush=True)  # before close: the reader waits for it
                os.close(fd)
            try:  # a reader: a writer waiting in open() goes on; EAGAIN or data says one was
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            time.sleep(0.05)
            try:
                if os.read(fd, 1 << 16):
                    print("writer", fifo, flush=True)
            except BlockingIOError:
                print("writer", fifo, flush=True)
            finally:
                os.close(fd)
        if stopped(0.2):
            break
"""


class FifoGuard:
    def __init__(self, *fifos: Path, after: float = 20.0) -> None:
        self.fifos = [str(f) for f in fifos]
        self.after = after
        self.rescued: list[Path] = []

    def __enter__(self) -> FifoGuard:
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCH, str(self.after), *self.fifos],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        out, _ = self._watcher.communicate(timeout=60)  # closes its stdin: it stops between probes
        self.rescued = [Path(line.split(" ", 1)[1]) for line in out.splitlines() if " " in line]
