"""Command line: `tfowatch run | top | doctor | probes | facts`. Errors are one line and an
exit code: 1 runtime, 2 usage, 3 doctor found a warning or worse."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from tfowatch import __version__
from tfowatch.core import signals
from tfowatch.core.kernel import KernelFacts, detect, hz_unknown, missing_bpf_caps, namespace_blind_spots
from tfowatch.core.metrics import KERNEL_HZ, TIERS
from tfowatch.core.plan import MODES, Plan, PlanError, resolve
from tfowatch.exporter import config
from tfowatch.exporter.config import OPTIONS, Settings

if TYPE_CHECKING:
    from tfowatch.exporter.web import MetricsServer
    from tfowatch.exporter.webconfig import WebConfig

EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_FINDINGS = 3  # doctor: a finding of severity warning or above
BCRYPT_MAX = 72  # bytes of a password bcrypt reads


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def build_parser() -> Parser:
    p = Parser(prog="tfowatch", description="Watch TCP Fast Open and TIME-WAIT reuse in the kernel.")
    p.add_argument("--version", action="version", version=f"tfowatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run_parser(sub)
    probes = sub.add_parser("probes", help="show what would be attached on this kernel, and why")
    probes.add_argument("--mode", choices=MODES, default="auto")
    probes.add_argument("--json", action="store_true", help="machine-readable output")
    add_top_parser(sub)
    doctor = sub.add_parser("doctor", help="explain why TFO or TIME-WAIT reuse is (not) happening")
    doctor.add_argument("--netns", action="append",
                        help="only this namespace (inode or `ip netns` name); repeatable")
    doctor.add_argument("-w", "--watch", type=positive_float, metavar="SECONDS",
                        help="also observe the probes for this long (same plan as run)")
    doctor.add_argument("--mode", choices=MODES, default="auto", help="probe tier for --watch")
    doctor.add_argument("-o", "--output", choices=("text", "json"), default="text")
    doctor.add_argument("-v", "--verbose", action="store_true",
                        help="describe namespaces without findings too")
    facts = sub.add_parser("facts", help="print the kernel facts the probe plan is resolved from")
    facts.add_argument("--json", action="store_true", default=True, help=argparse.SUPPRESS)
    return p


def add_run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="attach probes and serve Prometheus metrics",
                         description="Every option can also be a key of the --config file "
                                     "(flags win over the file).")
    defaults = Settings()
    for opt in OPTIONS:
        if opt.type is bool:  # a switch: given means true; the file can say either
            run.add_argument(opt.flag, action="store_true", default=None, help=opt.help)
            continue
        run.add_argument(opt.flag, type=opt.type, metavar=opt.key.upper(),
                         help=f"{opt.help} (default {getattr(defaults, opt.key)})")
    run.add_argument("--config", help="TOML file with any of the options above, as snake_case keys")
    run.add_argument("--check-config", action="store_true",
                     help="check the settings and web config, print them, and exit")
    run.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub.add_parser("hash-password", help="read a password on stdin, print its bcrypt hash "
                                         "for basic_auth_users in the web config")


MAX_SECONDS = 31 * 86400.0  # intervals and windows; beyond this a timer overflows


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_SECONDS:  # nan and inf fail here too
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most "
                                         f"{MAX_SECONDS:.0f}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return int(text)


def add_top_parser(sub: Any) -> None:
    from tfowatch.top.rows import SORT_KEYS

    top = sub.add_parser("top", help="live view of TFO and TIME-WAIT activity (no daemon needed)")
    top.add_argument("-i", "--interval", type=positive_float, default=1.0,
                     help="seconds between refreshes (default 1)")
    top.add_argument("-c", "--count", type=positive_int, help="stop after this many intervals")
    top.add_argument("-s", "--sort", choices=SORT_KEYS, default="activity", metavar="COLUMN",
                     help="sort by: " + ", ".join(SORT_KEYS) + " (default activity)")
    top.add_argument("-r", "--reverse", action="store_true", help="reverse the sort order")
    top.add_argument("-m", "--rows", type=positive_int, help="show at most this many rows")
    top.add_argument("-p", "--pid", type=positive_int,
                     help="only this process (its connections, and listeners it holds)")
    top.add_argument("--port", type=positive_int, help="only this listener or remote port")
    top.add_argument("--netns", help="only this network namespace (inode or `ip netns` name)")
    top.add_argument("--totals", action="store_true", help="show totals, not per-interval counts")
    top.add_argument("--mode", choices=MODES, default="auto")
    top.add_argument("--series-cap", type=positive_int, default=1000, metavar="N",
                     help="label sets per metric before rows fold into 'other' (default 1000)")
    top.add_argument("-o", "--output", choices=("screen", "table", "json"),
                     help="default: screen on a terminal, table otherwise")
    top.add_argument("--once", action="store_true", help="print one interval and exit")


def print_plan(plan: Plan) -> None:
    print(f"mode {plan.mode}: tier {plan.tier}")
    for r in plan.points:
        targets = ", ".join(f"{a.kind}:{a.target}" for a in r.attachments) or f"TcpExt {r.counter}"
        mark = "substituted" if r.substitute else "as designed"
        print(f"  {r.point:<28} [{r.tier}] {targets}")
        print(f"  {'':<28} {mark}: {r.why}")
        if r.events:
            print(f"  {'':<28} events: {', '.join(e.name.lower() for e in r.events)}")
    print("metrics: " + ", ".join(m.name for m in plan.metrics))
    print("reconciled with TcpExt: " + (", ".join(plan.reconciled) or "none"))


def tier_metrics(facts: KernelFacts) -> dict[str, list[str] | str]:
    """Per tier: the metrics it provides on this kernel, or why it cannot run here."""
    out: dict[str, list[str] | str] = {}
    for tier in TIERS:
        try:
            out[tier] = [m.name for m in resolve(facts, tier).metrics]
        except PlanError as exc:
            out[tier] = f"unavailable: {exc}"
    return out


def cmd_probes(args: argparse.Namespace) -> int:
    from tfowatch.bpf.loader import BPF_DIR, DEGRADED_FIX, SOURCES
    from tfowatch.core.netns import own_cookie

    facts = detect()
    plan = resolve(facts, args.mode)
    tiers = tier_metrics(facts)
    missing = [str(p) for p in SOURCES if not p.is_file()]
    identity = "inode+cookie" if own_cookie() else "inode"
    if args.json:
        sources = {"dir": str(BPF_DIR), "missing": missing}
        extra = {"tiers": tiers, "bpf_sources": sources, "netns_identity": identity,
                 "kernel_hz": {"hz": facts.hz, "source": facts.hz_source}}
        print(json.dumps(plan.as_dict() | extra, indent=2))
        return 0
    if missing and plan.tier != "counters":
        print(f"BPF SOURCES MISSING ({', '.join(missing)}): {DEGRADED_FIX['bpf_sources_missing']}; "
              f"`run` would fall back to the counters tier")
    print_plan(plan)
    print("network namespaces: " + ("told apart by inode and cookie (a new one that gets a gone one's "
                                    "inode starts from 0)" if identity != "inode" else
                                    "by inode only (no SO_NETNS_COOKIE before Linux 5.14): a new one "
                                    "that gets a gone one's inode inherits its series"))
    if plan.tier in KERNEL_HZ.tiers:
        print(f"blackhole state timed by CONFIG_HZ={facts.hz} ({facts.hz_source})" if facts.hz else
              f"blackhole state: {hz_unknown(facts)}")
    print("probe metrics per tier on this kernel (kernel_tcpext and self metrics in all):")
    for tier, metrics in tiers.items():
        print(f"  {tier:<10} " + (metrics if isinstance(metrics, str) else ", ".join(metrics) or "none"))
    return 0


def run_settings(args: argparse.Namespace) -> tuple[Settings, WebConfig | None]:
    """The checked settings and web config; any problem is a usage error (exit 2)."""
    from tfowatch.exporter import webconfig

    try:
        settings = config.settings({o.key: getattr(args, o.key) for o in OPTIONS}, args.config)
        web = webconfig.load(settings.web_config_file) if settings.web_config_file else None
    except config.ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    return settings, web


def describe(settings: Settings, web: WebConfig | None) -> str:
    scheme = web.scheme if web is not None else "http"
    host, port = settings.address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    parts = [f"{scheme}://{where}/metrics", f"mode {settings.mode}", f"series_cap {settings.series_cap}",
             f"netns_share {settings.netns_share}%",
             f"perf_pages {settings.perf_pages}", f"max_connections {settings.max_connections}",
             f"header_timeout {settings.header_timeout} s", f"netns_grace {settings.netns_grace} s",
             f"series_ttl {settings.series_ttl} s"]
    if settings.strict:
        parts.append("strict")
    if web is not None and web.tls is not None:
        parts.append(f"client certificates: {web.client_auth}")
    if web is not None and web.users:
        parts.append(f"basic auth: {len(web.users)} user(s)")
    return ", ".join(parts)


def cmd_hash_password() -> int:
    import bcrypt

    raw = sys.stdin.buffer.readline().rstrip(b"\n")
    if not raw:
        raise CliError("no password on stdin", EXIT_USAGE)
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        raise CliError("the password on stdin is not UTF-8", EXIT_USAGE) from exc
    if len(raw) > BCRYPT_MAX:
        raise CliError(f"the password is {len(raw)} bytes; bcrypt uses at most {BCRYPT_MAX}", EXIT_USAGE)
    print(bcrypt.hashpw(raw, bcrypt.gensalt(10)).decode())
    return 0


def stop_on_signals() -> threading.Event:
    """Check the privileges BPF needs, then route SIGINT/SIGTERM to an event. Called before
    loading BPF: a signal during start-up must still lead to a clean detach."""
    if missing := missing_bpf_caps():
        raise CliError("must run as root (or with CAP_BPF and CAP_PERFMON) to load BPF programs; "
                       f"this process lacks {' and '.join(missing)}")
    return signals.stop_event()


def cmd_run(args: argparse.Namespace) -> int:
    settings, web = run_settings(args)
    if args.check_config:
        print(f"tfowatch: config OK: {describe(settings, web)}")
        return 0
    logging.basicConfig(level="DEBUG" if args.verbose else settings.log_level,
                        format="tfowatch: %(levelname)s %(message)s")
    log = logging.getLogger("tfowatch")
    from tfowatch.exporter.daemon import Daemon
    from tfowatch.exporter.web import MetricsServer

    stop = stop_on_signals()
    host, port = settings.address
    try:  # bound before BPF loads: a port in use costs nothing and fails at once
        server = MetricsServer(host, port, web, settings.max_connections, settings.header_timeout)
    except OSError as exc:
        raise CliError(f"cannot listen on {settings.listen}: {exc.strerror}") from exc
    signals.on(signal.SIGHUP, lambda: reload_web_config(settings, server, log))
    try:
        daemon = Daemon(settings, server)
    except BaseException:
        server.close()
        raise
    for blind_spot in namespace_blind_spots():
        log.warning("%s", blind_spot)
    if web is not None and web.users and web.tls is None:
        log.warning("basic auth without TLS: passwords cross the network in clear")
    daemon.serve()
    plan = daemon.pipeline.plan
    log.info("tier %s%s, serving %s", plan.tier,
             f" (DEGRADED: planned {plan.planned_tier})" if plan.degraded else "",
             describe(settings, web))
    try:
        daemon.run(stop)
    finally:
        daemon.close()
    return 0


def reload_web_config(settings: Settings, server: MetricsServer, log: logging.Logger) -> None:
    """SIGHUP: read the web config again (a renewed certificate, changed users), as Prometheus
    reloads on SIGHUP; a config that no longer checks leaves the one in use, loudly."""
    from tfowatch.exporter import webconfig

    path = settings.web_config_file
    if not path:
        log.info("SIGHUP: no web_config_file to reload; restart to apply other settings")
        return
    try:
        server.reload(webconfig.load(path))
    except config.ConfigError as exc:
        log.error("SIGHUP: web config not reloaded, the one in use stays: %s", exc)
        return
    log.info("SIGHUP: web config %s reloaded", path)


def netns_inode(value: str) -> int:
    from tfowatch.core import nsconfig

    if value.isdigit():
        return int(value)
    for ino, name in nsconfig.names().items():
        if name == value:
            return ino
    raise CliError(f"no network namespace named {value!r} (give an inode or an `ip netns` name)",
                   EXIT_USAGE)


def cmd_top(args: argparse.Namespace) -> int:
    from tfowatch.top.session import Options, TopSession, run_plain

    if args.port is not None and args.port > 65535:
        raise CliError(f"argument --port: {args.port} is not a port (1-65535)", EXIT_USAGE)
    opts = Options(interval=args.interval, count=1 if args.once else args.count, sort=args.sort,
                   reverse=args.reverse, rows=args.rows, pid=args.pid, port=args.port,
                   netns=netns_inode(args.netns) if args.netns else None, totals=args.totals,
                   mode=args.mode, series_cap=args.series_cap)
    output = args.output or ("screen" if sys.stdout.isatty() and not args.once else "table")
    if output == "screen" and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError("-o screen needs a terminal; use -o table or -o json", EXIT_USAGE)
    stop = stop_on_signals()
    session = TopSession(opts)
    try:
        if output == "screen":
            from tfowatch.top.screen import Screen

            Screen(session, opts).run(stop)
        else:
            run_plain(session, opts, output, stop)
    except BrokenPipeError:  # `tfowatch top | head`: stop quietly, as other filters do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        session.close()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tfowatch.doctor.watch import as_json, as_text, diagnose

    only = {netns_inode(n) for n in args.netns} if args.netns else None
    if os.geteuid() != 0:
        raise CliError("doctor must run as root: it enters namespaces and reads listener sockets")
    stop = stop_on_signals() if args.watch else None
    report = diagnose(only, args.watch, args.mode, stop,
                      announce=lambda msg: print(f"tfowatch doctor: {msg}", file=sys.stderr, flush=True))
    if only and not report.namespaces:
        raise CliError("none of the namespaces given exists any more", EXIT_USAGE)
    print(as_json(report) if args.output == "json" else as_text(report, args.verbose))
    worst = report.worst
    return EXIT_FINDINGS if worst in ("warning", "critical") else 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "probes":
            return cmd_probes(args)
        if args.command == "facts":
            print(detect().to_json())
            return 0
        if args.command == "top":
            return cmd_top(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "hash-password":
            return cmd_hash_password()
        return cmd_run(args)
    except CliError as exc:
        print(f"tfowatch: {exc}", file=sys.stderr)
        return exc.code
    except PlanError as exc:
        print(f"tfowatch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tfowatch doctor | head`: stop quietly, as other filters do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
