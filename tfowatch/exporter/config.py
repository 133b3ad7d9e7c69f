"""`tfowatch run` settings: one table of options that is both the command line flags and the
keys of the TOML config file. Flags override the file; every value is checked here, so a bad
one is a one-line error (exit 2) before anything is loaded into the kernel."""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tfowatch.core.plan import MODES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A bad setting; the message names it and says what is expected."""


def split_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [ADDR]:PORT) -> (host, port); an empty host means all IPv4 addresses."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"bad listen address {value!r}: expected HOST:PORT, e.g. {Settings.listen}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _listen(value: str) -> None:
    """A well-formed address whose name resolves now: a typo fails at start, not at the first
    scrape. Checked once, with the other settings; `Settings.address` only parses."""
    host, _ = split_listen(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"bad listen address {value!r}: {host}: {exc.strerror}") from exc
        except UnicodeError as exc:  # an empty label or one over 63 characters (IDNA)
            raise ConfigError(f"bad listen address {value!r}: {host!r} is not a host name") from exc


def _one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}")
    return check


def _at_least(low: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < low:
            raise ConfigError(f"must be at least {low}, not {value}")
    return check


def _between(low: int, high: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if not low <= value <= high:
            raise ConfigError(f"must be from {low} to {high}, not {value}")
    return check


PENDING_PER_SLOT = 16  # HTTP connections still sending their request, per answer slot
MAX_PERF_PAGES = 16384  # 64 MiB per CPU; BCC overflows its size at 2**19 pages and dies or loses events


def _power_of_two(value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ConfigError(f"must be a power of two (perf buffers are), not {value}")
    if value > MAX_PERF_PAGES:
        raise ConfigError(f"must be at most {MAX_PERF_PAGES} (64 MiB per CPU), not {value}")


@dataclass(frozen=True)
class Option:
    key: str  # TOML key; the flag is --key-with-dashes
    type: type
    help: str
    check: Callable[[Any], None] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@dataclass
class Settings:
    listen: str = "127.0.0.1:19135"
    mode: str = "auto"
    series_cap: int = 1000
    netns_share: int = 50
    perf_pages: int = 256
    log_level: str = "INFO"
    web_config_file: str | None = None
    max_connections: int = 16
    header_timeout: int = 5
    netns_grace: int = 300
    series_ttl: int = 3600
    strict: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return split_listen(self.listen)


OPTIONS = (
    Option("listen", str, "HOST:PORT for /metrics", _listen),
    Option("mode", str, "probe tier: " + ", ".join(MODES) + " (auto: the best available)",
           _one_of(MODES)),
    Option("series_cap", int, "label sets per metric; more are folded into an 'other' series",
           _at_least(1)),
    Option("netns_share", int, "percent of series_cap one network namespace may hold per metric; "
           "beyond it, its events fold into its own 'other' series", _between(1, 100)),
    Option("perf_pages", int, "perf buffer pages per CPU (a power of two, at most 16384)", _power_of_two),
    Option("log_level", str, "one of " + ", ".join(LOG_LEVELS), _one_of(LOG_LEVELS)),
    Option("web_config_file", str,
           "YAML in node_exporter's --web.config.file format: TLS, client CA, basic auth users"),
    Option("max_connections", int, "HTTP requests answered at once; connections still sending "
           f"their request are bounded at {PENDING_PER_SLOT} times this (a new one cuts the oldest)",
           _at_least(1)),
    Option("header_timeout", int, "seconds a client has for its whole request, TLS handshake and "
           "headers included; then it is cut", _between(1, 60)),
    Option("netns_grace", int, "seconds a network namespace that is gone keeps its series (its last "
           "counters) before they are removed", _between(0, 86400)),
    Option("series_ttl", int, "seconds a series whose count does not move is kept; then it is removed, "
           "with its in-kernel count (0: never)", _between(0, 30 * 86400)),
    Option("strict", bool, "exit (status 1) instead of running a lower tier than planned, "
           "e.g. when the BPF sources are missing or a probe cannot attach"),
)
assert [o.key for o in OPTIONS] == [f.name for f in fields(Settings)]


def _checked(opt: Option, value: Any, name: str) -> Any:
    """`value` if it is right for `opt`; `name` is how the error refers to it."""
    if not isinstance(value, opt.type) or (isinstance(value, bool) and opt.type is not bool):
        kind = {int: "whole number", bool: "boolean (true or false)"}.get(opt.type, "string")
        raise ConfigError(f"{name} must be a {kind}, not {value!r}")
    if opt.check is not None:
        try:
            opt.check(value)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    return value


def read_file(path: str) -> dict[str, Any]:
    """The TOML file's settings, each checked; unknown keys are errors (a typo is never ignored)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 (byte {exc.start})") from exc
    known = {o.key: o for o in OPTIONS}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config {path}: unknown key {key!r} (known: {', '.join(known)})")
        _checked(known[key], value, f"config {path}: {key}")
    if data.get("web_config_file"):  # a path in a file is the file's, not the working directory's
        data["web_config_file"] = str(Path(path).resolve().parent / data["web_config_file"])
    return data


def settings(flags: dict[str, Any], path: str | None) -> Settings:
    """Defaults, then the file, then the flags given (None = not given)."""
    values = read_file(path) if path else {}
    for opt in OPTIONS:
        if flags.get(opt.key) is not None:
            values[opt.key] = _checked(opt, flags[opt.key], opt.flag)
    return Settings(**values)
