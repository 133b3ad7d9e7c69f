"""SIGTERM stops the process whatever its main thread is doing: the stop event is set off the
main thread (tfowatch.core.signals). A Python handler that set it itself deadlocked when the
signal landed inside the main thread's own Event.wait (`tfowatch top` in CI's 6.1 guest)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

# The main thread waits on the stop event as the daemon's and top's loops do, with no timeout
# at all, so that it is nearly always inside Event.wait's locked part: where a signal hung it.
# Each stop it sees it says, and clears, for the next signal.
CHILD = """
import os, sys
from tfowatch.core import signals
stop = signals.stop_event()
os.write(1, b"r")
while True:
    if stop.wait(0):
        stop.clear()
        os.write(1, b"s")
"""
SIGNALS = 200  # the handler that set the event itself hung within the first 5, 5 runs of 5
ACK_S = 5.0


def test_every_sigterm_and_sigint_is_acted_on_while_the_main_thread_waits_on_the_event() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert child.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)

    def ack(expect: bytes) -> bool:
        deadline = time.monotonic() + ACK_S
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                got = os.read(child.stdout.fileno(), 1)  # type: ignore[union-attr]
                assert got == expect, f"child said {got!r}, not {expect!r} (it ended?)"
                return True
        return False

    try:
        assert ack(b"r"), "the child did not start"
        for n in range(1, SIGNALS + 1):
            sig = (signal.SIGTERM, signal.SIGINT)[n % 2]
            child.send_signal(sig)
            assert ack(b"s"), f"{sig.name} {n} of {SIGNALS} was not acted on within {ACK_S:.0f} s"
    finally:
        child.kill()
        child.wait()
