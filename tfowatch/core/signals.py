"""Signals act on a thread of their own, never inside a Python signal handler.

A Python handler runs in the main thread between two bytecodes, wherever that thread is. One
that called `Event.set()` while the main thread was inside `Event.wait()` (which holds the
same lock at its start and end) waited for itself for ever: `tfowatch top` ignored SIGTERM in
CI's 6.1 guest. Here the C-level handler only writes the signal's number to a pipe
(`signal.set_wakeup_fd`); a daemon thread reads it and runs the action, taking any lock it
needs like any other thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

_actions: dict[int, Callable[[], None]] = {}
_relay: threading.Thread | None = None


def on(sig: signal.Signals, action: Callable[[], None]) -> None:
    """Run `action` (on the relay thread) each time `sig` arrives. Main thread only, as
    signal.signal is."""
    global _relay
    _actions[sig] = action
    if _relay is None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        _relay = threading.Thread(target=_run, args=(read_fd,), daemon=True, name="tfowatch-signals")
        _relay.start()
    signal.signal(sig, _wake_only)


def stop_event() -> threading.Event:
    """An event SIGINT and SIGTERM set."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        on(sig, stop.set)
    return stop


def _wake_only(signum: int, frame: object) -> None:
    """The Python-level handler: nothing, so that the signal neither kills nor raises (the
    wakeup fd has the signal already)."""


def _run(read_fd: int) -> None:
    while True:
        for signum in os.read(read_fd, 64):
            action = _actions.get(signum)
            if action is None:
                continue
            try:
                action()
            except Exception as exc:  # the relay must live on: the next SIGTERM still stops
                logging.getLogger("tfowatch").error("%s: %s", signal.Signals(signum).name, exc)
