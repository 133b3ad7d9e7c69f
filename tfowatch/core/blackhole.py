"""A namespace's active-TFO blackhole state, as the kernel keeps it (net->ipv4's disable count
and jiffies stamp, and its tcp_fastopen_blackhole_timeout_sec) and the BPF programs note it
at each TFO attempt and each disable they see (tfowatch.bpf.c, note_blackhole).

After a disable the kernel sends no TFO option until stamp + timeout * 2^min(count-1, 6);
a connect after that tries TFO again, and the count goes back to 0 once such a connection
(not over loopback) receives data."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Blackhole:
    times: int  # disables since active TFO last worked
    timeout_s: int  # the namespace's tcp_fastopen_blackhole_timeout_sec
    since_ns: int  # CLOCK_MONOTONIC of the last disable; 0 when unknown (no CONFIG_HZ)
    until_ns: int  # CLOCK_MONOTONIC when TFO may be tried again

    @property
    def timed(self) -> bool:
        """Whether its times are known (the kernel's CONFIG_HZ was)."""
        return self.since_ns > 0

    def disabled(self, now_ns: int) -> bool:
        return self.times > 0 and self.timeout_s > 0 and self.timed and now_ns < self.until_ns

    def reenable_in(self, now_ns: int) -> float:
        """Seconds until the kernel lets a connect try TFO again (0 when it may now)."""
        return max(0.0, (self.until_ns - now_ns) / 1e9) if self.disabled(now_ns) else 0.0

    def since_unix(self, now_ns: int) -> float:
        """The last disable as a Unix time."""
        return time.time() - (now_ns - self.since_ns) / 1e9
