"""Ctrl-C (SIGINT) and SIGTERM (a launcher, SLURM, ``kill``) both become a KeyboardInterrupt in the main
thread, so a run stops the same way for either and can report where it stopped in one line.

:func:`received` stays true after the first signal: under torchrun a rank may see its peer's exit as a
failed collective before its own signal is handled, and that failure is then part of the stop, not a bug.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, List

_received: List[int] = []


def _raise_interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def received() -> bool:
    """Whether SIGINT or SIGTERM arrived while :func:`stop_on_signals` was active."""
    return bool(_received)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt; the previous handlers come back after
    it. Outside the main thread (where Python allows no handlers) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
