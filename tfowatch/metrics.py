"""The metric contract: names, help, labels, and which event feeds which metric.

Dashboards, alerts and `tfowatch top` build on these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfowatch.events import EventType, RefuseReason


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...]


SERVER = ("netns", "port")
CLIENT = ("netns", "port", "comm", "cgroup")

COOKIE_REQUESTS = Metric("tfowatch_cookie_requests_total",
                         "SYNs with an empty TFO option (cookie requests), per listener port.", SERVER)
COOKIES_ISSUED = Metric("tfowatch_cookies_issued_total",
                        "SYN-ACKs carrying a TFO cookie, per listener port.", SERVER)
SYN_DATA_ACCEPTED = Metric("tfowatch_syn_data_accepted_total",
                           "TFO children created from a SYN (kernel TCPFastOpenPassive), per listener port.",
                           SERVER)
PASSIVE_FALLBACKS = Metric("tfowatch_passive_fallbacks_total",
                           "Server-side TFO fallbacks to a normal handshake, by reason.", (*SERVER, "reason"))
SYN_DATA_SENT = Metric("tfowatch_syn_data_sent_total",
                       "Client SYNs that carried data, per remote port and process.", CLIENT)
SYN_DATA_ACKED = Metric("tfowatch_syn_data_acked_total",
                        "Client SYN data acknowledged by the server (kernel TCPFastOpenActive).", CLIENT)
ACTIVE_FALLBACKS = Metric("tfowatch_active_fallbacks_total",
                          "Client-side TFO fallbacks, by reason.", (*CLIENT, "reason"))
BLACKHOLE_DISABLES = Metric("tfowatch_blackhole_disables_total",
                            "Times the kernel disabled active TFO after suspected middlebox blackholing.",
                            ("netns", "port"))
TW_REUSE = Metric("tfowatch_tw_reuse_total",
                  "TIME-WAIT reuse decisions at connect(), by result and refusal reason.",
                  ("netns", "port", "comm", "cgroup", "result", "reason"))
TW_REUSE_AGE = Metric("tfowatch_tw_reuse_age_seconds",
                      "Age of the TIME-WAIT socket when its reuse was decided.", ("netns", "result"))

PROBE_METRICS = (COOKIE_REQUESTS, COOKIES_ISSUED, SYN_DATA_ACCEPTED, PASSIVE_FALLBACKS,
                 SYN_DATA_SENT, SYN_DATA_ACKED, ACTIVE_FALLBACKS, BLACKHOLE_DISABLES,
                 TW_REUSE, TW_REUSE_AGE)

# event type -> (metric, value of the `reason` label or None)
EVENT_METRIC: dict[EventType, tuple[Metric, str | None]] = {
    EventType.COOKIE_REQUEST: (COOKIE_REQUESTS, None),
    EventType.COOKIE_ISSUED: (COOKIES_ISSUED, None),
    EventType.SYN_DATA_ACCEPTED: (SYN_DATA_ACCEPTED, None),
    EventType.INVALID_COOKIE: (PASSIVE_FALLBACKS, "invalid_cookie"),
    EventType.QUEUE_OVERFLOW: (PASSIVE_FALLBACKS, "queue_overflow"),
    EventType.SERVER_DISABLED: (PASSIVE_FALLBACKS, "server_disabled"),
    EventType.SYN_DATA_SENT: (SYN_DATA_SENT, None),
    EventType.SYN_DATA_ACKED: (SYN_DATA_ACKED, None),
    EventType.COOKIE_UNAVAILABLE: (ACTIVE_FALLBACKS, "cookie_unavailable"),
    EventType.DATA_NOT_ACKED: (ACTIVE_FALLBACKS, "data_not_acked"),
    EventType.SYN_RETRANSMITTED: (ACTIVE_FALLBACKS, "syn_retransmitted"),
    EventType.TFO_DISABLED: (ACTIVE_FALLBACKS, "tfo_disabled"),
    EventType.BLACKHOLE_DISABLE: (BLACKHOLE_DISABLES, None),
    EventType.TW_REUSE_GRANTED: (TW_REUSE, None),
    EventType.TW_REUSE_REFUSED: (TW_REUSE, None),
}

REFUSE_REASONS = {
    RefuseReason.NO_TIMESTAMPS: "no_timestamps",
    RefuseReason.REUSE_DISABLED: "reuse_disabled",
    RefuseReason.TOO_RECENT: "too_recent",
    RefuseReason.NOT_LOOPBACK: "not_loopback",
}

TW_AGE_BUCKETS = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# TcpExt counters exported per namespace, and what the probes reconcile against them.
KERNEL_COUNTERS = (
    "TCPFastOpenActive", "TCPFastOpenActiveFail", "TCPFastOpenPassive", "TCPFastOpenPassiveFail",
    "TCPFastOpenListenOverflow", "TCPFastOpenCookieReqd", "TCPFastOpenBlackhole",
    "TCPFastOpenPassiveAltKey", "TWRecycled", "TCPTimeWaitOverflow",
)


@dataclass(frozen=True)
class Reconciliation:
    """tfowatch_reconcile_drift{metric=label}: probe events of `events` minus counter delta."""

    label: str
    counter: str
    events: tuple[EventType, ...]


RECONCILIATIONS = (
    Reconciliation("cookie_requests", "TCPFastOpenCookieReqd", (EventType.COOKIE_REQUEST,)),
    Reconciliation("syn_data_accepted", "TCPFastOpenPassive", (EventType.SYN_DATA_ACCEPTED,)),
    Reconciliation("invalid_cookie", "TCPFastOpenPassiveFail", (EventType.INVALID_COOKIE,)),
    Reconciliation("queue_overflow", "TCPFastOpenListenOverflow", (EventType.QUEUE_OVERFLOW,)),
    Reconciliation("syn_data_acked", "TCPFastOpenActive", (EventType.SYN_DATA_ACKED,)),
    Reconciliation("syn_data_not_acked", "TCPFastOpenActiveFail",
                   (EventType.DATA_NOT_ACKED, EventType.SYN_RETRANSMITTED)),
    Reconciliation("tw_reuse_granted", "TWRecycled", (EventType.TW_REUSE_GRANTED,)),
    Reconciliation("blackhole_disables", "TCPFastOpenBlackhole", (EventType.BLACKHOLE_DISABLE,)),
)
