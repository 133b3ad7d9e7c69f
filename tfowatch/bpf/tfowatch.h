/* Event layout shared by the BPF programs and tfowatch/core/events.py.
 * tests/test_event_layout.py fails when the two drift apart. */
#ifndef TFOWATCH_H
#define TFOWATCH_H

/* One event = one increment of one metric. */
enum tfo_event_type {
	EV_COOKIE_REQUEST = 1,       /* server: SYN with an empty TFO option */
	EV_COOKIE_ISSUED = 2,        /* server: SYN-ACK carries a cookie */
	EV_SYN_DATA_ACCEPTED = 3,    /* server: TFO child created */
	EV_INVALID_COOKIE = 4,       /* server fallback: cookie matched no key */
	EV_QUEUE_OVERFLOW = 5,       /* server fallback: TFO queue full */
	EV_SERVER_DISABLED = 6,      /* server fallback: no server TFO for this listener */
	EV_SYN_DATA_SENT = 7,        /* client: SYN carried data */
	EV_SYN_DATA_ACKED = 8,       /* client: SYN-ACK acked the SYN data */
	EV_COOKIE_UNAVAILABLE = 9,   /* client fallback: no cached cookie, request sent */
	EV_DATA_NOT_ACKED = 10,      /* client fallback: SYN data not acked */
	EV_SYN_RETRANSMITTED = 11,   /* client fallback: SYN was retransmitted */
	EV_TFO_DISABLED = 12,        /* client fallback: active TFO disabled, no option sent */
	EV_BLACKHOLE_DISABLE = 13,   /* client: kernel disabled active TFO (blackhole) */
	EV_TW_REUSE_GRANTED = 14,    /* connect() took over a TIME-WAIT socket */
	EV_TW_REUSE_REFUSED = 15,    /* connect() could not reuse a TIME-WAIT socket */
	EV_PLAIN_CONNECT = 16,       /* client: connect() without TFO (doctor --watch only) */
	EV_CONNECT_EADDRNOTAVAIL = 17, /* client: TCP connect() failed: no local port for the 4-tuple */
	EV_TFO_TIMEOUT = 18,         /* a TFO socket's third retransmission timeout (TCPFastOpenActiveFail) */
	EV_TYPE_MAX = 19,
};

/* Why a TIME-WAIT reuse was refused (tfo_event.reason for EV_TW_REUSE_REFUSED). */
enum tw_refuse_reason {
	TW_NO_TIMESTAMPS = 1,  /* the peer did not use TCP timestamps */
	TW_REUSE_DISABLED = 2, /* net.ipv4.tcp_tw_reuse = 0 */
	TW_TOO_RECENT = 3,     /* TIME-WAIT socket younger than the reuse delay */
	TW_NOT_LOOPBACK = 4,   /* tcp_tw_reuse = 2 (loopback only) or FIN_WAIT2 substate */
};

struct tfo_event {
	__u64 ts_ns;     /* bpf_ktime_get_ns() */
	__u64 cgroup_id; /* client events: cgroup v2 id of the connecting task; 0 for server */
	__u64 netns_cookie; /* the namespace's cookie (unique for the boot; 0: kernel has none) */
	__u32 netns;     /* network namespace inode (the kernel reuses a dead namespace's) */
	__u32 pid;       /* client events: tgid of the connecting process; 0 for server */
	__u32 type;      /* enum tfo_event_type */
	__u32 age_ms;    /* TIME-WAIT events: age of the TIME-WAIT socket */
	__u16 port;      /* server: listener port; client/TIME-WAIT: remote port */
	__u8 reason;     /* enum tw_refuse_reason */
	__u8 age_res;    /* age resolution: 0 = ms, 1 = whole seconds (pre-6.14, sockops tier) */
	char comm[16];   /* client events: task comm; empty for server */
	__u8 daddr[16];  /* client events: remote address (IPv4 in the first 4 bytes) */
	__u16 family;    /* client events: AF_INET or AF_INET6; 0 for server */
};

/* In-kernel counts (IN_KERNEL_COUNTS, `tfowatch run`): one entry per label set of an
 * event, so the daemon reads a map at scrape time instead of one perf sample per event.
 * TIME-WAIT events (their age feeds a histogram) and events that find the map full still
 * go through the perf buffer. */
struct count_key {
	__u64 cgroup_id; /* as tfo_event */
	__u64 netns_cookie;
	__u32 netns;
	__u32 type;      /* enum tfo_event_type */
	__u16 port;
	__u8 reason;
	__u8 pad;
	char comm[16];
};

struct count_val {
	__u64 count;
	__u32 pid;       /* the last process seen with this key: names its cgroup */
	__u32 pad;
};

#endif
