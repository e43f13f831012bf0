"""A guard for tests that hand a FIFO to code that must never block on it.

A reader that opens a FIFO without O_NONBLOCK waits in open() until a writer comes, forever in
a test. The guard is that writer: after `after` seconds it opens the FIFO's write end without
blocking, which succeeds only if some reader holds (or waits on) the other end, and closes it
at once, so the blocked reader sees end-of-file and the test goes on to fail instead of hanging
CI. Its `rescued` flag says whether it had to. A reader that refuses the FIFO closes it within
milliseconds, long before the guard looks.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType


class FifoGuard:
    def __init__(self, *fifos: Path, after: float = 20.0) -> None:
        self.fifos = fifos
        self.rescued: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(after,), daemon=True)

    def _watch(self, after: float) -> None:
        if self._stop.wait(after):
            return
        while not self._stop.is_set():
            for fifo in self.fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody is reading it
                    continue
                os.close(fd)
                self.rescued.append(fifo)
            self._stop.wait(0.2)

    def __enter__(self) -> FifoGuard:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
