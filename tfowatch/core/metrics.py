"""The metric contract: every family tfowatch serves, in one table.

The exporter, the web server's own metrics, the dashboards and alerts, and the README's metric
table (scripts/metrics-table.py, checked by tests/unit/test_contract.py) are built from or checked
against FAMILIES. Which event feeds which probe family is the event table's (events.EVENTS).
Imports nothing heavy: every command may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

TIERS = ("kprobe", "sockops", "tracepoint", "counters")
ALL = TIERS
PROBED = ("kprobe", "sockops", "tracepoint")
BLACKHOLE = ("kprobe", "sockops")  # the tiers that see active TFO being disabled
LISTENER = ("kprobe", "sockops")  # the tiers that see the SYN's TFO option at a listener
TIME_WAIT = ("kprobe", "sockops")  # the tiers that see TIME-WAIT reuse (sockops: grants only)

# The parts of a scrape, each collected on its own (`source` of a family).
PROBES, KERNEL, SELF, HTTP = "probes", "kernel", "self", "http"


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: a counter's name ends in _total
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ALL  # the tiers that serve it (probe families: as the plan resolves)
    source: str = SELF
    buckets: tuple[float, ...] = ()  # histograms
    note: str = ""  # for the README's table: what a label holds

    @property
    def family(self) -> str:
        """The name prometheus_client takes (it appends _total to counters itself)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


SERVER = ("netns", "port")
CLIENT = ("netns", "port", "comm", "cgroup")
TW_AGE_BUCKETS = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# --- probe-derived: fed by events (events.EVENTS), each a series per label set ---
COOKIE_REQUESTS = Metric("tfowatch_cookie_requests_total", "counter",
                         "SYNs with an empty TFO option (cookie requests), per listener port.", SERVER,
                         LISTENER, PROBES, note="port: the listener's")
COOKIES_ISSUED = Metric("tfowatch_cookies_issued_total", "counter",
                        "SYN-ACKs carrying a TFO cookie, per listener port.", SERVER, LISTENER, PROBES)
SYN_DATA_ACCEPTED = Metric("tfowatch_syn_data_accepted_total", "counter",
                           "TFO children created from a SYN (kernel TCPFastOpenPassive), per listener port.",
                           SERVER, PROBED, PROBES)
PASSIVE_FALLBACKS = Metric("tfowatch_passive_fallbacks_total", "counter",
                           "Server-side TFO fallbacks to a normal handshake, by reason.", (*SERVER, "reason"),
                           LISTENER, PROBES)
SYN_DATA_SENT = Metric("tfowatch_syn_data_sent_total", "counter",
                       "Client SYNs that carried data, per remote port and process.", CLIENT, PROBED, PROBES,
                       note="port: the remote one")
SYN_DATA_ACKED = Metric("tfowatch_syn_data_acked_total", "counter",
                        "Client SYN data acknowledged by the server (kernel TCPFastOpenActive).", CLIENT,
                        PROBED, PROBES)
ACTIVE_FALLBACKS = Metric("tfowatch_active_fallbacks_total", "counter",
                          "Client-side TFO fallbacks, by reason.", (*CLIENT, "reason"), PROBED, PROBES)
BLACKHOLE_DISABLES = Metric("tfowatch_blackhole_disables_total", "counter",
                            "Times the kernel disabled active TFO after suspected middlebox blackholing.",
                            ("netns", "port"), BLACKHOLE, PROBES)
TW_REUSE = Metric("tfowatch_tw_reuse_total", "counter",
                  "TIME-WAIT reuse decisions at connect(), by result and refusal reason (the sockops "
                  "tier sees only grants: connects that took over a TIME-WAIT 4-tuple).",
                  ("netns", "port", "comm", "cgroup", "result", "reason"), TIME_WAIT, PROBES,
                  note="reason: empty when granted")
TW_REUSE_AGE = Metric("tfowatch_tw_reuse_age_seconds", "histogram",
                      "Age of the TIME-WAIT socket when its reuse was decided (whole seconds before "
                      "Linux 6.14 and in the sockops tier).", ("netns", "result"),
                      TIME_WAIT, PROBES, TW_AGE_BUCKETS)
CONNECT_EADDRNOTAVAIL = Metric("tfowatch_connect_eaddrnotavail_total", "counter",
                               "TCP connect() calls that failed with EADDRNOTAVAIL: no local port for "
                               "the destination (all in use, or held by TIME-WAIT sockets that may not "
                               "be reused), per remote port and process.", CLIENT, PROBED, PROBES,
                               note="port: the remote one")

# --- the kernel's own counters, and the probes against them ---
KERNEL_TCPEXT = Metric("tfowatch_kernel_tcpext_total", "counter",
                       "The kernel's own TcpExt TFO and TIME-WAIT counters, per network namespace.",
                       ("netns", "counter"), ALL, KERNEL,
                       note="counter: TCPFastOpen*, TWRecycled, TCPTimeWaitOverflow")
NETNS_UNREADABLE = Metric("tfowatch_netns_unreadable", "gauge",
                          "Network namespaces found whose counters tfowatch does not read: not its "
                          "to read (process-less ones need CAP_SYS_ADMIN), or beyond series_cap.",
                          (), ALL, KERNEL)
NETNS_RETIRED = Metric("tfowatch_netns_retired_total", "counter",
                       "Network namespaces whose series were removed, by why: gone (no process, no "
                       "bind mount) for netns_grace seconds, or inode_reused (a new namespace took its "
                       "inode, and starts from 0).", ("reason",), ALL, KERNEL,
                       note="reason: gone, inode_reused")
RETIRED_REASONS = ("gone", "inode_reused")
RECONCILE_DRIFT = Metric("tfowatch_reconcile_drift", "gauge",
                         "Probe-derived count minus the kernel counter's increase since start (0 = exact).",
                         ("netns", "metric"), PROBED, KERNEL,
                         note="every reconciled metric of the tier, in each namespace with TFO or "
                              "TIME-WAIT activity since start")

SYN_DATA_PENDING = Metric("tfowatch_syn_data_pending", "gauge",
                          "Client TFO connections open now whose SYN data was answered, in the tiers "
                          "that count acked or not-acked when a connection ends: the kernel has counted "
                          "them, tfowatch will at their end; the reconcile drift allows for them.",
                          ("netns",), ("kprobe", "tracepoint"), KERNEL,
                          note="only namespaces with one: none where the kprobe tier's client side "
                               "is sock_ops")

# The kernel's active-TFO blackhole state (core/blackhole.py), per namespace where it has
# been disabled: read by the programs at each TFO attempt and each disable they see.
_BH = ("Only namespaces where the kernel has disabled active TFO since start, or had before a "
       "TFO attempt there.")
ACTIVE_TFO_DISABLED = Metric("tfowatch_active_tfo_disabled", "gauge",
                             "1 while the kernel has active TFO disabled in the namespace after "
                             "suspected blackholing (TCPFastOpenBlackhole): its connects send no TFO "
                             f"option until tfowatch_active_tfo_reenable_seconds. {_BH}",
                             ("netns",), PROBED, KERNEL,
                             note="absent where tfowatch_kernel_hz is 0")
ACTIVE_TFO_DISABLES = Metric("tfowatch_active_tfo_disable_count", "gauge",
                             "The kernel's count of active TFO disables in the namespace since a TFO "
                             "connection last worked there; each doubles the next disable's length "
                             f"(at most 64 x tcp_fastopen_blackhole_timeout_sec). {_BH}",
                             ("netns",), PROBED, KERNEL)
ACTIVE_TFO_REENABLE = Metric("tfowatch_active_tfo_reenable_seconds", "gauge",
                             "Seconds until the kernel lets a connect in the namespace try TFO again "
                             f"(0 when it may now). {_BH}", ("netns",), PROBED, KERNEL)
ACTIVE_TFO_DISABLED_AT = Metric("tfowatch_active_tfo_last_disable_timestamp_seconds", "gauge",
                                "When the kernel last disabled active TFO in the namespace (Unix "
                                f"time). {_BH}",
                                ("netns",), PROBED, KERNEL)
BLACKHOLE_STATE = (ACTIVE_TFO_DISABLED, ACTIVE_TFO_DISABLES, ACTIVE_TFO_REENABLE, ACTIVE_TFO_DISABLED_AT)
KERNEL_HZ = Metric("tfowatch_kernel_hz", "gauge",
                   "The kernel's CONFIG_HZ, which times active TFO's blackhole state (the kernel keeps "
                   "it in jiffies), and where it was found: its config, or measured from "
                   "/proc/timer_list. 0 with source=\"\" when unknown: then tfowatch_active_tfo_disabled, "
                   "_reenable_seconds and _last_disable_timestamp_seconds are absent.",
                   ("source",), PROBED, note='source: "" when unknown')

# --- the daemon itself ---
LISTENERS_UNWATCHED = Metric("tfowatch_listeners_unwatched", "gauge",
                             "Listeners open when the sockops tier attached that it could not ask for "
                             "their SYN-ACKs (before Linux 6.12, or no process to reach them through): "
                             "their cookie requests, cookies and passive fallbacks are not seen, their "
                             "TFO children are. Found at start.", (), ("sockops",))
PROBE_ATTACHED = Metric("tfowatch_probe_attached", "gauge",
                        "1 when the probe is attached, per design-card point and target.",
                        ("point", "target", "tier"), ALL,
                        note="0 for each planned probe a degraded tier lacks")
EVENTS = Metric("tfowatch_events_total", "counter", "Events reported by the kernel programs, by type.",
                ("type",), PROBED, note="type: each event type the running programs can report")
EVENTS_LOST = Metric("tfowatch_events_lost_total", "counter",
                     "Events the perf buffer dropped before tfowatch read them.", (), PROBED)
LATE_EVENTS = Metric("tfowatch_netns_late_events_total", "counter",
                     "Events of a network namespace read after a new namespace took its inode (its "
                     "series were retired then): in tfowatch_events_total, in no series.", (), PROBED)
SERIES_DROPPED = Metric("tfowatch_series_dropped_total", "counter",
                        "Events folded into the 'other' series because a metric hit its series cap.",
                        ("metric",), PROBED, note="metric: each probe family the tier serves, 0 until a drop")
SERIES_EXPIRED = Metric("tfowatch_series_expired_total", "counter",
                        "Series removed because their count did not move for series_ttl seconds "
                        "(a label set that comes back starts again from 0).",
                        ("metric",), PROBED,
                        note="metric: each probe family the tier serves, 0 until one expires")
SERIES = Metric("tfowatch_series", "gauge",
                "Label sets each probe metric holds now (at most tfowatch_series_cap, plus one 'other').",
                ("metric",), PROBED)
SCRAPE_PART_SUCCESS = Metric("tfowatch_scrape_collector_success", "gauge",
                             "1 when this part of the scrape (probes, kernel, self) was read; 0 when it "
                             "failed and its series are left out of this scrape.", ("collector",))
SCRAPE_PART_DURATION = Metric("tfowatch_scrape_collector_duration_seconds", "gauge",
                              "Seconds this part of the scrape took to read.", ("collector",))
SERIES_CAP = Metric("tfowatch_series_cap", "gauge", "Label sets a metric may hold (series_cap).")
SERIES_CAP_PER_NETNS = Metric("tfowatch_series_cap_per_netns", "gauge",
                              "Label sets one network namespace may hold per metric (netns_share percent "
                              "of series_cap); beyond it, its events fold into its own 'other' series.")
BUILD_INFO = Metric("tfowatch_build_info", "gauge",
                    "tfowatch version, kernel, probe mode, the tier running and the tier planned for this "
                    "kernel and mode.", ("version", "kernel", "mode", "tier", "planned_tier"))
TIER_DEGRADED = Metric("tfowatch_tier_degraded", "gauge",
                       "1 when a lower tier runs than planned (the planned one could not be loaded or "
                       "attached), with why; 0 otherwise.", ("planned_tier", "tier", "reason"),
                       note='reason: "" when 0')

# --- the HTTP server ---
HTTP_REQUESTS = Metric("tfowatch_http_requests_total", "counter", "HTTP requests answered, by status code.",
                       ("code",), source=HTTP)
SCRAPE_DURATION = Metric("tfowatch_scrape_duration_seconds", "histogram",
                         "Time to build a /metrics response.", (), source=HTTP,
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
HTTP_CONNECTIONS_REFUSED = Metric("tfowatch_http_connections_refused_total", "counter",
                                  "Connections closed before their request was answered: timeout "
                                  "(request not in within header_timeout), evicted (the oldest "
                                  "unfinished request, to make room), tls_failed (handshake), "
                                  "rejected (over the thread bound).", ("reason",), source=HTTP)

FAMILIES = (COOKIE_REQUESTS, COOKIES_ISSUED, SYN_DATA_ACCEPTED, PASSIVE_FALLBACKS, SYN_DATA_SENT,
            SYN_DATA_ACKED, ACTIVE_FALLBACKS, BLACKHOLE_DISABLES, TW_REUSE, TW_REUSE_AGE,
            CONNECT_EADDRNOTAVAIL,
            KERNEL_TCPEXT, NETNS_UNREADABLE, NETNS_RETIRED, RECONCILE_DRIFT, SYN_DATA_PENDING,
            *BLACKHOLE_STATE, KERNEL_HZ,
            PROBE_ATTACHED, LISTENERS_UNWATCHED, EVENTS, EVENTS_LOST, LATE_EVENTS, SERIES_DROPPED,
            SERIES_EXPIRED, SERIES,
            SERIES_CAP, SERIES_CAP_PER_NETNS, BUILD_INFO,
            TIER_DEGRADED, SCRAPE_PART_SUCCESS, SCRAPE_PART_DURATION,
            HTTP_REQUESTS, SCRAPE_DURATION, HTTP_CONNECTIONS_REFUSED)
PROBE_METRICS = tuple(m for m in FAMILIES if m.source == PROBES)
# prometheus_client's process collector, under the tfowatch namespace (process_cpu_seconds_total, ...)
PROCESS_PREFIX = "tfowatch_process_"

# TcpExt counters exported per namespace (what the probes reconcile against is events.EVENTS').
KERNEL_COUNTERS = (
    "TCPFastOpenActive", "TCPFastOpenActiveFail", "TCPFastOpenPassive", "TCPFastOpenPassiveFail",
    "TCPFastOpenListenOverflow", "TCPFastOpenCookieReqd", "TCPFastOpenBlackhole",
    "TCPFastOpenPassiveAltKey", "TWRecycled", "TCPTimeWaitOverflow",
)
