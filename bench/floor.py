"""The sockops tier's hooks with programs that do nothing: a sock_ops program on the host's
root cgroup (linked as tfowatch links its own) and the connect syscall's exit tracepoint.
What they cost per connection is the floor of this interface: the kernel runs a root-cgroup
sock_ops program for every callback of every TCP socket (RTO and window init, ECN, connect,
established), whatever it does, and no flag turns those callbacks off. bench/run.py runs this
as the `floor` condition; it prints "attached" once both are in place, then waits for SIGTERM."""

from __future__ import annotations

import os
import signal

from bcc import BPF

from tfowatch.bpf.loader import attach_sock_ops

TEXT = """
int floor_sock_ops(struct bpf_sock_ops *skops) { return 1; }
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return 0; }
"""


def main() -> None:
    bpf = BPF(text=TEXT)
    link, _ = attach_sock_ops(bpf, "floor_sock_ops")
    print("attached", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os.close(link)
    bpf.cleanup()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
