"""Phase logs: which step of a run is going and what it cost (wall time, peak memory), on the ``moemerge`` logger.

The library only logs (at INFO); the command line shows these lines on stderr unless ``--quiet``.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("moemerge")


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log ``name ...`` on entry and ``name: S s, peak memory M MiB`` when the block finishes."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s, peak memory %.0f MiB", name, time.perf_counter() - start, peak_memory_mib())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it is replaced under test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_phases(enabled: bool) -> None:
    """Send the phase logs to stderr as ``moemerge: ...`` lines, or silence them."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("moemerge: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.WARNING)
