"""Per-namespace TFO and TIME-WAIT configuration, decoded into what it means."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfowatch.core import netns
from tfowatch.core.kernel import SYSCTLS

# net.ipv4.tcp_fastopen bits (Documentation/networking/ip-sysctl.rst)
TFO_CLIENT = 0x1  # send SYN data with a cookie
TFO_SERVER = 0x2  # accept SYN data on listeners with TCP_FASTOPEN
TFO_ALL_LISTENERS = 0x400  # TFO on every listener, TCP_FASTOPEN or not
TFO_BITS = {
    TFO_CLIENT: "client",
    TFO_SERVER: "server",
    0x4: "client_no_cookie",     # send SYN data without a cookie
    0x200: "server_no_cookie",   # accept SYN data without a cookie
    TFO_ALL_LISTENERS: "server_all_listeners",
}


def tfo_flags(value: int) -> list[str]:
    return [name for bit, name in TFO_BITS.items() if value & bit]


@dataclass
class NamespaceConfig:
    netns: int
    name: str  # `ip netns` name, or the inode as text
    raw: dict[str, str] = field(default_factory=dict)

    def number(self, key: str) -> int | None:
        try:
            return int(self.raw[key])
        except (KeyError, ValueError):
            return None

    @property
    def tcp_fastopen(self) -> int | None:
        return self.number("tcp_fastopen")

    @property
    def tfo_flags(self) -> list[str]:
        return tfo_flags(self.tcp_fastopen or 0)

    @property
    def tw_reuse(self) -> int | None:
        return self.number("tcp_tw_reuse")

    @property
    def blackhole_timeout_s(self) -> int | None:
        return self.number("tcp_fastopen_blackhole_timeout_sec")

    def as_dict(self) -> dict[str, object]:
        return {"netns": self.netns, "name": self.name,
                "tcp_fastopen": None if self.tcp_fastopen is None else hex(self.tcp_fastopen),
                "tcp_fastopen_flags": self.tfo_flags, "tcp_tw_reuse": self.tw_reuse,
                "blackhole_timeout_s": self.blackhole_timeout_s}


def names() -> dict[int, str]:
    """inode -> `ip netns` name, for the namespaces that have one."""
    out: dict[int, str] = {}
    if netns.RUN_NETNS.is_dir():
        for entry in netns.RUN_NETNS.iterdir():
            try:
                out[netns.inode(entry)] = entry.name
            except OSError:
                continue
    return out


def read(only: set[int] | None = None, handles: dict[int, str] | None = None) -> dict[int, NamespaceConfig]:
    """The configuration of every namespace found (or those in `only`); `handles` is
    netns.discover()'s result when the caller has it already."""
    named = names()
    out: dict[int, NamespaceConfig] = {}
    for ino, handle in (netns.discover() if handles is None else handles).items():
        if only is not None and ino not in only:
            continue
        try:
            raw = netns.sysctls(handle, SYSCTLS)
        except OSError:  # vanished
            continue
        out[ino] = NamespaceConfig(ino, named.get(ino, str(ino)), raw)
    return out
