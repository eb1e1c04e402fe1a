"""SIGTERM and SIGHUP as exceptions, like Ctrl-C's KeyboardInterrupt, so that a stopped command unwinds: every
``finally`` runs and temporary outputs are removed (see :mod:`moemerge.output_files`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CAUGHT = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when the process gets one of :data:`CAUGHT`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, unless they are
    ignored (``nohup``); the previous handlers come back afterwards."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in CAUGHT if signal.getsignal(s) not in (signal.SIG_IGN, None)}
    for signum in previous:
        signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_of(stop: KeyboardInterrupt) -> signal.Signals:
    """The signal behind a KeyboardInterrupt: SIGINT (Ctrl-C) or the one an :class:`Interrupted` carries."""
    return signal.Signals(getattr(stop, "signum", signal.SIGINT))
