/* tfowatch BPF programs (BCC).
 *
 * Kernel struct fields are read at offsets taken from the running kernel's BTF
 * (OFF_* / BIT_* macros passed by tfowatch/bpf/loader.py), never from the compile
 * headers, which may belong to another kernel.
 *
 * Which sections are compiled is decided by the probe plan:
 *   PASSIVE_KPROBE  tcp_try_fastopen entry+return attached (else server-side TFO
 *                   children are counted from sock:inet_sock_set_state)
 *   ACTIVE_KPROBE   tcp_connect (or tcp_send_syn_data) entry attached: it names the
 *                   connecting task (with SOCKOPS_ACTIVE, the rest is sock_ops'); without
 *                   SOCKOPS_ACTIVE its return too, reading what the SYN carried (else SYN
 *                   data sent / client fallbacks are read at SYN_SENT exit)
 *   TW_KPROBE       tcp_twsk_unique entry+return attached
 *   BLACKHOLE_KPROBE tcp_fastopen_active_disable_ofo_check attached (else, with
 *                   BLACKHOLE_SOCKOPS, its check replayed as a TFO client closes)
 *   PLAIN_CONNECTS  also report connects that did not attempt TFO (doctor --watch;
 *                   off for `run`, where it would cost an event per connection)
 *   IN_KERNEL_COUNTS count events per label set in `counts` (`run`); `top` and `doctor`
 *                   need every event (pid, remote address) and leave it off
 *   CGROUP_NAMES    cgroup:cgroup_mkdir attached: the path of each new cgroup v2, so a
 *                   client whose cgroup is gone by the time its counts are read keeps its name
 *   CONNECT_ERRORS  syscalls:sys_exit_connect attached: TCP connect()s that fail with
 *                   EADDRNOTAVAIL, per process and remote port
 *   CONNECT_AT_EXIT   the call's arguments read at its exit (x86-64's saved registers); else
 *                     sys_enter_connect keeps them for the exit
 *   SOCKOPS         one BPF sock_ops program on the cgroup v2 root (on_sock_ops), for:
 *   SOCKOPS_PASSIVE   the server side (the sockops tier: listeners, SYN-ACKs, children)
 *   SOCKOPS_ACTIVE    the client side (the sockops tier, and the kprobe tier where the
 *                     kernel has sock_ops: outcomes at the SYN-ACK)
 *   TW_SOCKOPS        connects that took over a TIME-WAIT 4-tuple (the sockops tier)
 *   STATE_TRACEPOINTS sock:inet_sock_set_state and tcp:tcp_destroy_sock attached (a side
 *                   neither kprobes nor sock_ops cover)
 *
 * Every event increments `totals` (exact, per CPU, never lost) and is also either
 * counted in `counts` or sent through the `events` perf buffer for attribution in Python.
 */
#include <uapi/linux/ptrace.h>
#include "tfowatch.h"

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define PROTO_TCP 6
#define AF_INET 2
#define AF_INET6 10
#define TFO_SERVER_ENABLE 2
#define TFO_COOKIE_UNAVAILABLE 1
#define TFO_DATA_NOT_ACKED 2
#define TFO_SYN_RETRANSMITTED 3

BPF_PERCPU_ARRAY(totals, u64, EV_TYPE_MAX);
BPF_PERF_OUTPUT(events);
#if IN_KERNEL_COUNTS
BPF_HASH(counts, struct count_key, struct count_val, MAX_COUNTS);
#endif

/* Client sockets between connect() and their fate; LRU bounds memory. */
struct conn {
	u64 cgroup_id;
	u64 netns_cookie;
	u32 pid;
	u32 netns;
	u16 dport;
	u8 attempted; /* MSG_FASTOPEN / TCP_FASTOPEN_CONNECT seen at connect time */
	u8 pending;   /* SYN data sent, acked-or-not not yet known */
	u8 flags_added; /* sock_ops: the callback flags tfowatch set on it, cleared at its close */
	u8 established; /* sock_ops: its SYN-ACK was counted (it stays tracked until it closes) */
	u16 family;
	u8 daddr[16];
	char comm[16];
};
BPF_TABLE("lru_hash", u64, struct conn, conns, MAX_CONNS);

/* Every kernel read. Called through its own pointer: when BCC's probe of the running kernel's
 * helpers fails (as it does with only the unit's capabilities), BCC rewrites calls to
 * bpf_probe_read_kernel into the legacy bpf_probe_read, which sock_ops programs may not call. */
static long (*kread)(void *dst, u32 size, const void *unsafe_ptr) = (void *)BPF_FUNC_probe_read_kernel;

/* A kernel value of `type` at address p (0 when unreadable). */
#define READ_KERNEL(type, p) ({ type __v = 0; kread(&__v, sizeof(__v), (p)); __v; })
#define read_u64(p) READ_KERNEL(u64, p)
#define read_u32(p) READ_KERNEL(u32, p)
#define read_u16(p) READ_KERNEL(u16, p)
#define read_s8(p) READ_KERNEL(s8, p)

/* A kernel pointer, and how to read through it. Most are addresses, read with
 * bpf_probe_read_kernel (~23 ns a read). A sock_ops callback's full socket is a BTF pointer
 * (bpf_skc_to_tcp_sock): the verifier checks every load through it, and through the pointers
 * loaded from it, against the kernel's BTF, and such a load costs ~4 ns (docs/PERFORMANCE.md).
 * The helpers below take either; `btf` is a constant at each call site, so once they are
 * inlined only one way of reading is compiled. */
struct kp {
	const void *p;
	int btf;
};
#define KP(ptr) ((struct kp){ (const void *)(ptr), 0 })
#define KP_BTF(ptr) ((struct kp){ (const void *)(ptr), 1 })

/* The `type` at byte `off` of k (0 when unreadable), and the pointer there, read alike. */
#define KREAD(type, k, off) ((k).btf ? (type)BTF_LOAD(type, (k).p + (off)) \
					: READ_KERNEL(type, (k).p + (off)))
/* One load instruction, written in assembly: BCC would rewrite a C dereference of a pointer
 * that may come from a kprobe into a probe read (and cannot rewrite one inside a macro). */
#define BTF_LOAD(type, addr) ({ u64 __v; asm("%0 = *(" #type " *)(%1 + 0)" : "=r"(__v) : "r"(addr)); __v; })
#define KPTR(k, off) ((struct kp){ (const void *)KREAD(u64, k, off), (k).btf })

/* A bitfield at a BTF bit offset (little-endian), at most 8 bits wide. */
static __always_inline u32 read_bits(struct kp base, u32 bit_off, u32 nbits)
{
	u16 v = KREAD(u16, base, bit_off / 8);

	return (v >> (bit_off % 8)) & ((1u << nbits) - 1);
}

#define TP_BIT(sk, name) read_bits((sk), BIT_TP_##name, NBITS_TP_##name)

static __always_inline struct kp sk_net(struct kp sk)
{
	return KPTR(sk, OFF_SK_NET);
}

static __always_inline u32 net_inum(struct kp net)
{
	return KREAD(u32, net, OFF_NET_INUM);
}

static __always_inline u64 net_cookie(struct kp net)
{
#if HAVE_NET_COOKIE
	return KREAD(u64, net, OFF_NET_COOKIE);
#else
	return 0; /* before 5.12: the inode alone names a namespace */
#endif
}

/* A namespace is its inode (the `netns` label) and its cookie: the kernel gives a dead
 * namespace's inode to the next new one at once, never its cookie. */
#define SET_NETNS(dst, net) do { struct kp __n = (net); \
	(dst)->netns = net_inum(__n); (dst)->netns_cookie = net_cookie(__n); } while (0)

#if IN_KERNEL_COUNTS
/* 1 when counted in `counts`; 0 when the event must go out as a sample instead. */
static __always_inline int count_in_kernel(const struct tfo_event *ev)
{
	struct count_key k = {};
	struct count_val init = {}, *v;

	if (ev->type == EV_TW_REUSE_GRANTED || ev->type == EV_TW_REUSE_REFUSED)
		return 0;
	k.cgroup_id = ev->cgroup_id;
	k.netns = ev->netns;
	k.netns_cookie = ev->netns_cookie;
	k.type = ev->type;
	k.port = ev->port;
	k.reason = ev->reason;
	__builtin_memcpy(k.comm, ev->comm, sizeof(k.comm));
	v = counts.lookup(&k);
	if (!v) {
		init.pid = ev->pid;
		counts.insert(&k, &init); /* fails if another CPU was first, or the map is full */
		v = counts.lookup(&k);
		if (!v)
			return 0;
	}
	__sync_fetch_and_add(&v->count, 1);
	v->pid = ev->pid;
	return 1;
}
#endif

static __always_inline void emit(void *ctx, struct tfo_event *ev)
{
	u32 idx = ev->type;
	u64 *n = totals.lookup(&idx);

	if (n)
		(*n)++;
#if IN_KERNEL_COUNTS
	if (count_in_kernel(ev))
		return;
#endif
	ev->ts_ns = bpf_ktime_get_ns();
	events.perf_submit(ctx, ev, sizeof(*ev));
}

static __always_inline void emit_server(void *ctx, u32 type, struct kp net, u16 port)
{
	struct tfo_event ev = {};

	ev.type = type;
	SET_NETNS(&ev, net);
	ev.port = port;
	emit(ctx, &ev);
}

static __always_inline void emit_client(void *ctx, u32 type, const struct conn *c)
{
	struct tfo_event ev = {};

	ev.type = type;
	ev.netns = c->netns;
	ev.netns_cookie = c->netns_cookie;
	ev.port = c->dport;
	ev.pid = c->pid;
	ev.cgroup_id = c->cgroup_id;
	ev.family = c->family;
	__builtin_memcpy(ev.comm, c->comm, sizeof(ev.comm));
	__builtin_memcpy(ev.daddr, c->daddr, sizeof(ev.daddr));
	emit(ctx, &ev);
}

/* The remote address of a socket (a TIME-WAIT one too: both start with sock_common). */
static __always_inline void read_addr(u16 *family, u8 *daddr, struct kp sk)
{
	u32 *words = (u32 *)daddr; /* 4-byte aligned in every struct that holds one */

	*family = KREAD(u16, sk, OFF_SKC_FAMILY);
	if (*family != AF_INET6) {
		words[0] = KREAD(u32, sk, OFF_SKC_DADDR);
	} else if (!sk.btf) {
		kread(daddr, 16, sk.p + OFF_SKC_V6_DADDR);
	} else {
		words[0] = KREAD(u32, sk, OFF_SKC_V6_DADDR);
		words[1] = KREAD(u32, sk, OFF_SKC_V6_DADDR + 4);
		words[2] = KREAD(u32, sk, OFF_SKC_V6_DADDR + 8);
		words[3] = KREAD(u32, sk, OFF_SKC_V6_DADDR + 12);
	}
}

#define read_daddr(ev, sk) read_addr(&(ev)->family, (ev)->daddr, (sk))

static __always_inline u32 client_fail(struct kp sk)
{
#if HAVE_CLIENT_FAIL
	return TP_BIT(sk, CLIENT_FAIL);
#else
	return 0; /* before 5.5 the kernel does not record why a client fell back */
#endif
}

/* Each namespace's active-TFO blackhole state as the kernel keeps it (net->ipv4), read at
 * every TFO attempt and every disable seen; the daemon exports it. Times are CLOCK_MONOTONIC,
 * from the kernel's jiffies stamp (KERNEL_HZ = tfowatch_kernel_hz: its config, or measured; 0 when unknown: no times). */
struct blackhole_key {
	u64 netns_cookie;
	u32 netns;
	u32 pad;
};
struct blackhole_state {
	u64 since_ns;  /* when active TFO was last disabled */
	u64 until_ns;  /* when the kernel lets a connect try TFO again */
	u32 times;     /* tfo_active_disable_times: disables since active TFO last worked */
	u32 timeout_s; /* tcp_fastopen_blackhole_timeout_sec, doubled per disable (at most 64x) */
};
BPF_HASH(blackholes, struct blackhole_key, struct blackhole_state, 4096);
/* 1 once any namespace's active TFO was seen disabled: until then a TFO attempt where TFO
 * works (nearly all of them) needs no lookup in `blackholes` to know there is no news. */
BPF_ARRAY(blackhole_seen, u32, 1);

/* `disabling`: called just before the kernel disables (it writes the stamp and the count
 * after), so the state it is about to write is noted. */
static __always_inline void note_blackhole(struct kp net, int disabling)
{
	struct blackhole_key k = {};
	struct blackhole_state st = {}, *was;
	u64 stamp, now_j;
	u32 shift, zero = 0, *seen = blackhole_seen.lookup(&zero);

	st.times = KREAD(u32, net, OFF_NET_TFO_DISABLE_TIMES) + (disabling ? 1 : 0);
	if (!seen || (!st.times && !*seen))
		return; /* every TFO attempt where TFO works, until a disable is seen: one read */
	SET_NETNS(&k, net);
	if (!st.times) { /* never disabled, or TFO worked again since: news only if it was */
		was = blackholes.lookup(&k);
		if (!was || !was->times)
			return;
	}
	*seen = 1;
	now_j = bpf_jiffies64();
	stamp = disabling ? now_j : KREAD(u64, net, OFF_NET_TFO_DISABLE_STAMP);
	st.timeout_s = KREAD(u32, net, OFF_NET_BLACKHOLE_TIMEOUT);
#if KERNEL_HZ
	if (st.times && now_j >= stamp) {
		shift = st.times - 1 > 6 ? 6 : st.times - 1;
		st.since_ns = bpf_ktime_get_ns() - (now_j - stamp) * 1000000000ULL / KERNEL_HZ;
		st.until_ns = st.since_ns + ((u64)st.timeout_s << shift) * 1000000000ULL;
	}
#endif
	blackholes.update(&k, &st);
}

/* Client: what the SYN carried, read once the SYN has been sent. */
static __always_inline void client_syn_outcome(void *ctx, struct kp sk, const struct conn *c)
{
	if (c->attempted) /* where active TFO is disabled, this is what it meets */
		note_blackhole(sk_net(sk), 0);
	if (TP_BIT(sk, SYN_DATA))
		emit_client(ctx, EV_SYN_DATA_SENT, c);
	if (client_fail(sk) == TFO_COOKIE_UNAVAILABLE)
		emit_client(ctx, EV_COOKIE_UNAVAILABLE, c);
	else if (c->attempted && !TP_BIT(sk, SYN_FASTOPEN))
		emit_client(ctx, EV_TFO_DISABLED, c);
#if PLAIN_CONNECTS
	if (!c->attempted)
		emit_client(ctx, EV_PLAIN_CONNECT, c);
#endif
}

/* Client: SYN-ACK processed; was the SYN data acked? */
static __always_inline void client_resolve(void *ctx, struct kp sk, struct conn *c)
{
	u32 fail;

	if (!c->pending)
		return;
	c->pending = 0;
	if (TP_BIT(sk, SYN_DATA_ACKED)) {
		emit_client(ctx, EV_SYN_DATA_ACKED, c);
		return;
	}
	fail = client_fail(sk);
	if (fail == TFO_DATA_NOT_ACKED)
		emit_client(ctx, EV_DATA_NOT_ACKED, c);
	else if (fail == TFO_SYN_RETRANSMITTED)
		emit_client(ctx, EV_SYN_RETRANSMITTED, c);
}

static __always_inline int fastopen_attempted(struct kp sk)
{
	return KREAD(u64, sk, OFF_TP_FASTOPEN_REQ) != 0 || TP_BIT(sk, FASTOPEN_CONNECT);
}

/* Who connects: the task in whose context the connect runs. */
static __always_inline void conn_task(struct conn *c)
{
	c->pid = bpf_get_current_pid_tgid() >> 32;
	c->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&c->comm, sizeof(c->comm));
}

/* Where a client connects: its namespace, the remote port and address. */
static __always_inline void conn_dest(struct conn *c, struct kp sk)
{
	SET_NETNS(c, sk_net(sk));
	c->dport = __builtin_bswap16(KREAD(u16, sk, OFF_SKC_DPORT));
	read_addr(&c->family, c->daddr, sk);
}

static __always_inline void track_connect(struct kp sk, u16 dport, u16 family,
					      const u8 *daddr4, const u8 *daddr6)
{
	u64 key = (u64)sk.p;
	struct conn c = {};

	c.family = family;
	if (family == AF_INET6)
		__builtin_memcpy(c.daddr, daddr6, sizeof(c.daddr));
	else
		__builtin_memcpy(c.daddr, daddr4, 4);
	conn_task(&c);
	SET_NETNS(&c, sk_net(sk));
	c.dport = dport;
	c.attempted = fastopen_attempted(sk);
	conns.update(&key, &c);
}

/* Server: a child leaves SYN_RECV; TFO children are counted here when the
 * tcp_try_fastopen kprobe is not attached. */
static __always_inline void on_child_leaves_syn_recv(void *ctx, struct kp sk, u16 sport)
{
#if !PASSIVE_KPROBE
#if HAVE_SYN_FASTOPEN_CHILD
	int tfo_child = TP_BIT(sk, SYN_FASTOPEN_CHILD);
#else
	int tfo_child = TP_BIT(sk, SYN_DATA_ACKED);
#endif
	if (tfo_child)
		emit_server(ctx, EV_SYN_DATA_ACCEPTED, sk_net(sk), sport);
#endif
}

#if STATE_TRACEPOINTS
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	struct kp sk = KP(args->skaddr);
	u64 key = (u64)sk.p;
	int old = args->oldstate, new = args->newstate;
	struct conn *c;

	if (args->protocol != PROTO_TCP)
		return 0;
	if (old == TCP_CLOSE && new == TCP_SYN_SENT) {
		track_connect(sk, args->dport, args->family, args->daddr, args->daddr_v6);
		return 0;
	}
	if (old == TCP_SYN_RECV) {
		on_child_leaves_syn_recv(args, sk, args->sport);
		return 0;
	}
	/* A tracked client socket matters only when it leaves SYN_SENT or ESTABLISHED, or
	 * closes: skip the map lookup on every other transition (half of them). */
	if (old != TCP_SYN_SENT && old != TCP_ESTABLISHED && new != TCP_CLOSE)
		return 0;
	c = conns.lookup(&key);
	if (!c)
		return 0;
	if (old == TCP_SYN_SENT) {
#if !ACTIVE_KPROBE /* else the tcp_connect kprobe's return read what the SYN carried */
		client_syn_outcome(args, sk, c);
#endif
		/* syn_data_acked is set just after this transition: resolve later. */
		if (new == TCP_ESTABLISHED && TP_BIT(sk, SYN_DATA))
			c->pending = 1;
	} else if (old == TCP_ESTABLISHED) {
		client_resolve(args, sk, c);
	}
	if (new == TCP_CLOSE)
		conns.delete(&key);
	return 0;
}

TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	struct kp sk = KP(args->skaddr);
	u64 key = (u64)sk.p;
	struct conn *c = conns.lookup(&key);

	if (!c)
		return 0;
	client_resolve(args, sk, c);
	conns.delete(&key);
	return 0;
}
#endif

#if PASSIVE_KPROBE
/* tcp_try_fastopen(sk, skb, req, foc, dst): sk is the listener, softirq context. */
struct passive_call {
	const void *sk;
	const void *foc;
	const void *net; /* the listener's: it outlives the call */
	u16 port;
	s8 len_in;
	u8 gate; /* 0 = open, 1 = server TFO disabled for this listener, 2 = queue full */
};
BPF_PERCPU_ARRAY(passive_calls, struct passive_call, 1);

int on_try_fastopen(struct pt_regs *ctx, const void *sk, const void *skb, const void *req,
		    const void *foc)
{
	u32 zero = 0;
	struct passive_call *pc = passive_calls.lookup(&zero);
	const void *net = sk_net(KP(sk)).p;
	u32 sysctl, max_qlen, qlen, seq, end_seq;

	if (!pc)
		return 0;
	pc->sk = sk;
	pc->foc = foc;
	pc->net = net;
	pc->port = read_u16(sk + OFF_SK_NUM);
	pc->len_in = read_s8(foc + OFF_FOC_LEN);
	seq = read_u32(skb + OFF_SKB_CB + OFF_TCB_SEQ);
	end_seq = read_u32(skb + OFF_SKB_CB + OFF_TCB_END_SEQ);
	sysctl = read_u32(net + OFF_NET_TCP_FASTOPEN);
	max_qlen = read_u32(sk + OFF_TP_FOQ_MAX_QLEN);
	qlen = read_u32(sk + OFF_TP_FOQ_QLEN);
	pc->gate = 0;
	if (pc->len_in >= 0 || end_seq != seq + 1) {
		if (!(sysctl & TFO_SERVER_ENABLE) || max_qlen == 0)
			pc->gate = 1;
		else if (qlen >= max_qlen)
			pc->gate = 2;
	}
	if (pc->len_in == 0)
		emit_server(ctx, EV_COOKIE_REQUEST, KP(pc->net), pc->port);
	return 0;
}

int on_try_fastopen_ret(struct pt_regs *ctx)
{
	u32 zero = 0;
	struct passive_call *pc = passive_calls.lookup(&zero);
	int len_out;

	if (!pc || !pc->sk)
		return 0;
	len_out = read_s8(pc->foc + OFF_FOC_LEN);
	if (PT_REGS_RC(ctx))
		emit_server(ctx, EV_SYN_DATA_ACCEPTED, KP(pc->net), pc->port);
	else if (pc->gate == 1)
		emit_server(ctx, EV_SERVER_DISABLED, KP(pc->net), pc->port);
	else if (pc->gate == 2 && len_out < 0)
		emit_server(ctx, EV_QUEUE_OVERFLOW, KP(pc->net), pc->port);
	else if (pc->len_in > 0)
		emit_server(ctx, EV_INVALID_COOKIE, KP(pc->net), pc->port);
	if (len_out > 0)
		emit_server(ctx, EV_COOKIE_ISSUED, KP(pc->net), pc->port);
	pc->sk = 0;
	return 0;
}
#endif

/* A client's connect, in the connecting task (TCP_CONNECT_CB, or the tcp_connect kprobe's
 * entry): who connects where, into c. 1 when it is a TFO attempt, to be tracked; a plain
 * connect is reported (PLAIN_CONNECTS) or costs only the reads that tell it is plain. */
static __always_inline int connect_seen(void *ctx, struct kp sk, struct conn *c)
{
	c->attempted = fastopen_attempted(sk);
	if (!c->attempted && !PLAIN_CONNECTS)
		return 0;
	conn_task(c);
	conn_dest(c, sk);
	if (!c->attempted) {
		emit_client(ctx, EV_PLAIN_CONNECT, c);
		return 0;
	}
	return 1;
}

#if ACTIVE_KPROBE && SOCKOPS_ACTIVE
/* tcp_connect(sk) / tcp_send_syn_data(sk, syn) entry, in the connecting task, which the
 * sock_ops programs of 6.1 and 6.12 may not ask about: a TFO attempt's entry in `conns`, which
 * sock_ops' TCP_CONNECT_CB (inside this call) finds and takes on from there. */
int on_connect(struct pt_regs *ctx, const void *sk)
{
	u64 key = (u64)sk;
	struct conn c = {};

	if (connect_seen(ctx, KP(sk), &c))
		conns.update(&key, &c);
	return 0;
}
#elif ACTIVE_KPROBE
/* tcp_connect(sk) / tcp_send_syn_data(sk, syn): process context; the tracepoints follow the
 * connection (SOCKOPS_ACTIVE is off: the kprobe tier without its sock_ops part). */
BPF_HASH(active_calls, u64, const void *, 4096);

int on_connect(struct pt_regs *ctx, const void *sk)
{
	u64 id = bpf_get_current_pid_tgid();

	active_calls.update(&id, &sk);
	return 0;
}

int on_connect_ret(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	const void **skp = active_calls.lookup(&id);
	struct conn *c;
	u64 key;

	if (!skp)
		return 0;
	key = (u64)*skp;
	active_calls.delete(&id);
	c = conns.lookup(&key);
	if (!c)
		return 0;
	/* TCP_FASTOPEN_CONNECT allocates fastopen_req after SYN_SENT is set. */
	c->attempted |= fastopen_attempted(KP(key));
	client_syn_outcome(ctx, KP(key), c);
	return 0;
}
#endif

#if TW_KPROBE
/* tcp_twsk_unique(sk, sktw, twp): may the connecting sk take over sktw's 4-tuple? */
struct tw_call {
	const void *sk;
	const void *tw;
	u64 twp;
};
BPF_HASH(tw_calls, u64, struct tw_call, 4096);

int on_twsk_unique(struct pt_regs *ctx, const void *sk, const void *tw, void *twp)
{
	u64 id = bpf_get_current_pid_tgid();
	struct tw_call call = {};

	call.sk = sk;
	call.tw = tw;
	call.twp = (u64)twp;
	tw_calls.update(&id, &call);
	return 0;
}

static __always_inline u8 tw_refuse_reason(const void *net, u32 ts_stamp, u32 age_ms)
{
	u32 reuse = read_u32(net + OFF_NET_TW_REUSE) & 0xff;

	if (!ts_stamp)
		return TW_NO_TIMESTAMPS;
	if (reuse == 0)
		return TW_REUSE_DISABLED;
#if HAVE_TW_ENTRY_STAMP
	if (age_ms <= read_u32(net + OFF_NET_TW_REUSE_DELAY))
		return TW_TOO_RECENT;
#else
	if (age_ms < 1000) /* kernel: ktime_get_seconds() after the stamp, 1 s granularity */
		return TW_TOO_RECENT;
#endif
	return TW_NOT_LOOPBACK;
}

int on_twsk_unique_ret(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	struct tw_call *call = tw_calls.lookup(&id);
	struct tfo_event ev = {};
	const void *net;
	u32 ts_stamp;
	u64 now = bpf_ktime_get_ns();

	if (!call)
		return 0;
	net = sk_net(KP(call->tw)).p;
	ts_stamp = read_u32(call->tw + OFF_TW_TS_RECENT_STAMP);
#if HAVE_TW_ENTRY_STAMP
	ev.age_ms = (u32)(now / 1000000) - read_u32(call->tw + OFF_TW_ENTRY_STAMP);
#else
	ev.age_res = 1;
	ev.age_ms = ((u32)(now / 1000000000) - ts_stamp) * 1000;
#endif
	ev.type = PT_REGS_RC(ctx) ? EV_TW_REUSE_GRANTED : EV_TW_REUSE_REFUSED;
	if (ev.type == EV_TW_REUSE_REFUSED)
		ev.reason = tw_refuse_reason(net, ts_stamp, ev.age_ms);
	SET_NETNS(&ev, KP(net));
	ev.port = __builtin_bswap16(read_u16(call->tw + OFF_SKC_DPORT));
	read_daddr(&ev, KP(call->tw));
	ev.pid = id >> 32;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
	tw_calls.delete(&id);
	emit(ctx, &ev);
	return 0;
}
#endif

/* tcp_fastopen_active_disable(sk): active TFO disabled in the namespace (it counts, and
 * disables, only when the blackhole timeout is set). `before`: called ahead of the kernel's
 * own disable (a kprobe at its entry), not after it. */
static __always_inline void emit_blackhole(void *ctx, struct kp sk, int before)
{
	struct kp net = sk_net(sk);
	struct tfo_event ev = {};

	if (!KREAD(u32, net, OFF_NET_BLACKHOLE_TIMEOUT))
		return;
	note_blackhole(net, before);
	ev.type = EV_BLACKHOLE_DISABLE;
	SET_NETNS(&ev, net);
	ev.port = __builtin_bswap16(KREAD(u16, sk, OFF_SKC_DPORT));
	read_daddr(&ev, sk);
	emit(ctx, &ev);
}

#if BLACKHOLE_KPROBE || BLACKHOLE_SOCKOPS
#define TCPHDR_FIN 0x01
/* The kernel's tcp_fastopen_active_disable_ofo_check(), run when a socket is destroyed (just
 * after it closes): a TFO connection that received no data and holds only a FIN out of order
 * was black-holed after its handshake, and active TFO is disabled. Replayed here, as the
 * kernel calls tcp_fastopen_active_disable() inline (tcp_fastopen.c): no probe sees that call. */
static __always_inline void fin_only_ofo(void *ctx, struct kp sk)
{
	const void *node;

	if (!TP_BIT(sk, SYN_FASTOPEN) || KREAD(u32, sk, OFF_TP_DATA_SEGS_IN))
		return;
	/* an address, read so: its skb is found by arithmetic on it, which the verifier does
	 * not allow on a BTF pointer (and it is read only for a TFO socket that got no data) */
	node = (const void *)read_u64(sk.p + OFF_TP_OOO_QUEUE);
	if (!node)
		return;
	if (read_u64(node + OFF_RB_LEFT) || read_u64(node + OFF_RB_RIGHT))
		return; /* the only segment out of order: a root without children */
	if (read_u16(node - OFF_SKB_RBNODE + OFF_SKB_CB + OFF_TCB_TCP_FLAGS) & TCPHDR_FIN)
		emit_blackhole(ctx, sk, 1);
}
#endif

#if BLACKHOLE_KPROBE
/* tcp_fastopen_active_disable_ofo_check(sk), from tcp_v4_destroy_sock() and tcp_disconnect(). */
int on_ofo_check(struct pt_regs *ctx, const void *sk)
{
	fin_only_ofo(ctx, KP(sk));
	return 0;
}
#endif

#if DETECT_KPROBE || DETECT_SOCKOPS
/* The kernel's blackhole detection (tcp_fastopen_active_detect_blackhole), run at every
 * retransmission timeout of a socket that sent a TFO option or SYN data, or is a TFO child:
 * on its third consecutive timeout, or an earlier one that gives up, it counts
 * TCPFastOpenActiveFail and (with a blackhole timeout set) disables active TFO in the
 * namespace. A client is labelled by its tracked connect; a server's TFO child (or a client
 * whose entry the LRU dropped) by its namespace and port only: the listener's, or the remote. */
static __always_inline void on_tfo_timeout(void *ctx, struct kp sk, u32 timeouts, u32 expired)
{
	int client = TP_BIT(sk, SYN_FASTOPEN) || TP_BIT(sk, SYN_DATA);
	u64 key = (u64)sk.p;
	struct conn anon = {}, *c;

	if (!client && !TP_BIT(sk, SYN_DATA_ACKED))
		return;
	if (timeouts != 2 && !(timeouts < 2 && expired))
		return;
	c = conns.lookup(&key);
	if (c) {
		emit_client(ctx, EV_TFO_TIMEOUT, c);
	} else {
		SET_NETNS(&anon, sk_net(sk));
		anon.dport = client ? __builtin_bswap16(KREAD(u16, sk, OFF_SKC_DPORT)) : KREAD(u16, sk, OFF_SK_NUM);
		read_addr(&anon.family, anon.daddr, sk);
		emit_client(ctx, EV_TFO_TIMEOUT, &anon);
	}
#if BLACKHOLE_SOCKOPS || BLACKHOLE_KPROBE
	/* the detection's kprobe runs before the kernel disables; RTO_CB after it */
	emit_blackhole(ctx, sk, DETECT_KPROBE);
#endif
}
#endif

#if DETECT_KPROBE
/* tcp_fastopen_active_detect_blackhole(sk, expired), from tcp_write_timeout(). */
int on_detect_blackhole(struct pt_regs *ctx, const void *sk, int expired)
{
	on_tfo_timeout(ctx, KP(sk), READ_KERNEL(u8, sk + OFF_ICSK_RETRANSMITS), (u8)expired);
	return 0;
}
#endif

#if SOCKOPS
/* BPF sock_ops on the cgroup v2 root (attached by loader.py with a BPF link, beside any other
 * sock_ops program; it goes with the daemon). It only reads: it never reserves or writes a
 * header option and never sets a reply, so no packet and no socket changes. It asks for the
 * callbacks it reads in (bpf_sock_ops_cb_flags_set, OR-ed with the flags set already) and
 * clears the ones it added once it has what it needs. */
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
#define TFO_OPTION 34
#define TCPOPT_EXP 254
#define TFO_EXP_MAGIC 0xF989
#define SYNACK_FLAG BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
#if DETECT_SOCKOPS /* a TFO socket's retransmission timeouts, for the kernel's blackhole detection */
#define RTO_FLAG BPF_SOCK_OPS_RTO_CB_FLAG
#else
#define RTO_FLAG 0
#endif
#define CLIENT_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | RTO_FLAG)

/* The kernel's struct sock of a callback, as an address: bpf_sock_ops_kern starts with it (the
 * program's ctx pointer is that struct). A request socket (a SYN-ACK's) is only had so. */
static __always_inline const void *ops_sk(struct bpf_sock_ops *skops)
{
	return (const void *)read_u64((const void *)skops);
}

/* The full socket of a callback as a BTF pointer (loads through it are checked by the
 * verifier, and cheap); .p is 0 where the callback has none. */
static __always_inline struct kp ops_full_sk(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	return KP_BTF(sk ? bpf_skc_to_tcp_sock(sk) : 0);
}

static __always_inline void ops_set_flags(struct bpf_sock_ops *skops, u32 add)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | add);
}

static __always_inline void ops_clear_flags(struct bpf_sock_ops *skops, u32 ours)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~ours);
}

#if SOCKOPS_PASSIVE
struct listener_key {
	u64 netns_cookie;
	u32 netns;
	u16 port;
	u16 pad;
};
/* Listeners flagged for their SYN-ACKs, per (namespace, port): 1 when tfowatch set the flag,
 * so the children that inherit it have it cleared; 0 when one had it already (another
 * program's, left alone). */
BPF_TABLE("lru_hash", struct listener_key, u8, synack_listeners, MAX_LISTENERS);
/* The same per port alone, so that most children need no synack_listeners lookup (a hash of
 * the namespace, whose reads and lookup cost more than the rest of the callback): */
#define PORT_NONE 0  /* tfowatch flagged no listener on this port */
#define PORT_OURS 1  /* tfowatch set the flag of every listener it knows on this port */
/* PORT_MIXED (from adopt.py): one had it already, or could not be adopted: look it up */
BPF_ARRAY(synack_ports, u8, 65536);

static __always_inline void note_synack_port(u16 port, u8 ours)
{
	u32 i = port;
	u8 *state = synack_ports.lookup(&i);

	if (state && *state != PORT_MIXED)
		*state = ours ? PORT_OURS : PORT_MIXED;
}

static __always_inline void listener_key(struct listener_key *k, struct kp sk, u16 port)
{
	SET_NETNS(k, sk_net(sk));
	k->port = port;
}

/* listen(): ask for the SYN-ACKs of this listener (the only place the received SYN's TFO
 * option can be read). Listeners opened before tfowatch started are not seen here. */
static __always_inline void so_listen(struct bpf_sock_ops *skops)
{
	struct kp sk = ops_full_sk(skops);
	struct listener_key k = {};
	u8 ours = !(skops->bpf_sock_ops_cb_flags & SYNACK_FLAG), *was;

	if (!sk.p)
		return;
	listener_key(&k, sk, skops->local_port);
	was = synack_listeners.lookup(&k);
	if (was)
		ours &= *was;
	synack_listeners.update(&k, &ours);
	note_synack_port(k.port, ours);
	ops_set_flags(skops, SYNACK_FLAG);
}

/* The length of the cookie in the received SYN's TFO option: 0 for a cookie request, -1 when
 * the SYN has none. Both forms: RFC 7413's kind 34, and the experimental kind 254 with magic
 * 0xF989, which a Linux client switches to (and back) each time a request got no cookie. */
static __always_inline s32 syn_tfo_cookie_len(struct bpf_sock_ops *skops)
{
	u8 opt[20] = {};
	long n;

	opt[0] = TFO_OPTION;
	n = bpf_load_hdr_opt(skops, opt, sizeof(opt), BPF_LOAD_HDR_OPT_TCP_SYN);
	if (n >= 2)
		return n - 2;
	opt[0] = TCPOPT_EXP;
	opt[1] = 4;
	opt[2] = TFO_EXP_MAGIC >> 8;
	opt[3] = TFO_EXP_MAGIC & 0xff;
	n = bpf_load_hdr_opt(skops, opt, sizeof(opt), BPF_LOAD_HDR_OPT_TCP_SYN);
	return n >= 4 ? n - 4 : -1;
}

/* A listener's SYN-ACK (the request sock, in softirq, right after tcp_try_fastopen): what
 * the SYN's TFO option asked, and what the kernel decided, as the kprobe tier reads it. */
static __always_inline void so_synack(void *ctx, struct bpf_sock_ops *skops)
{
	const void *req, *listener;
	struct kp net;
	s32 len_in;
	u32 sysctl, max_qlen;
	u16 port = skops->local_port;

	if (skops->args[0] != 0 || (skops->skb_tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) != (TCPHDR_SYN | TCPHDR_ACK))
		return; /* an MSS estimate, or a SYN-ACK in syncookie mode (TFO is off for it) */
	/* The SYN's option first: most SYNs carry none, and then no kernel read is needed. */
	len_in = syn_tfo_cookie_len(skops);
	if (len_in < 0)
		return; /* no TFO option in the SYN (or no SYN to read, on a retransmission) */
	req = ops_sk(skops);
	if (READ_KERNEL(u8, req + OFF_TREQ_TFO_LISTENER))
		return; /* an accepted TFO child's: counted at PASSIVE_ESTABLISHED */
	if (READ_KERNEL(u8, req + OFF_REQ_NUM_RETRANS))
		return; /* a retransmission: the first SYN-ACK was counted */
	listener = (const void *)read_u64(req + OFF_REQ_LISTENER);
	net = sk_net(KP(listener));
	sysctl = read_u32(net.p + OFF_NET_TCP_FASTOPEN);
	max_qlen = read_u32(listener + OFF_TP_FOQ_MAX_QLEN);
	if (len_in == 0)
		emit_server(ctx, EV_COOKIE_REQUEST, net, port);
	if (!(sysctl & TFO_SERVER_ENABLE) || max_qlen == 0) {
		emit_server(ctx, EV_SERVER_DISABLED, net, port);
		return;
	}
	if (read_u32(listener + OFF_TP_FOQ_QLEN) >= max_qlen) {
		emit_server(ctx, EV_QUEUE_OVERFLOW, net, port);
		return;
	}
	if (len_in > 0)
		emit_server(ctx, EV_INVALID_COOKIE, net, port);
	emit_server(ctx, EV_COOKIE_ISSUED, net, port); /* a request, or a valid one for a bad cookie */
}

/* Whether the SYN-ACK flag a child inherited from its listener is tfowatch's. */
static __always_inline int synack_flag_ours(struct kp sk, u16 port)
{
	struct listener_key k = {};
	u32 i = port;
	u8 *state = synack_ports.lookup(&i), *ours;

	if (!state || *state != PORT_MIXED)
		return state && *state == PORT_OURS;
	listener_key(&k, sk, port);
	ours = synack_listeners.lookup(&k);
	return ours && *ours;
}

/* A passive child is made (a TFO child at SYN time): count it if TFO, and clear the SYN-ACK
 * flag it inherited from a listener tfowatch flagged (else every segment it sends would run
 * this program). */
static __always_inline void so_passive(void *ctx, struct bpf_sock_ops *skops)
{
	struct kp sk = ops_full_sk(skops);
	u32 flags = skops->bpf_sock_ops_cb_flags, tfo;

	if (!sk.p)
		return;
	tfo = KREAD(u64, sk, OFF_TP_FASTOPEN_RSK) != 0;
	if (tfo)
		emit_server(ctx, EV_SYN_DATA_ACCEPTED, sk_net(sk), skops->local_port);
	if ((flags & SYNACK_FLAG) && synack_flag_ours(sk, skops->local_port))
		flags &= ~SYNACK_FLAG;
	if (tfo) /* its timeouts count in the kernel's blackhole detection too */
		flags |= RTO_FLAG;
	if (flags != skops->bpf_sock_ops_cb_flags)
		bpf_sock_ops_cb_flags_set(skops, flags);
}

#endif /* SOCKOPS_PASSIVE */

/* A connect that took over a TIME-WAIT socket's 4-tuple: tcp_twsk_unique() granted it and
 * copied the TIME-WAIT socket's timestamp state, so the new socket has a ts_recent_stamp
 * before its SYN is sent (a new socket has none; TWRecycled counts the same grants). The age
 * is the TIME-WAIT socket's, from its last timestamp, in whole seconds (CLOCK_MONOTONIC, as
 * the kernel stamps it). Refusals are not seen here: see CONNECT_ERRORS. */
static __always_inline void so_tw_takeover(void *ctx, struct kp sk)
{
	u32 stamp = KREAD(u32, sk, OFF_TP_TS_RECENT_STAMP);
	struct tfo_event ev = {};

	if (!stamp)
		return;
	ev.type = EV_TW_REUSE_GRANTED;
	ev.age_res = 1;
	ev.age_ms = ((u32)(bpf_ktime_get_ns() / 1000000000) - stamp) * 1000;
	SET_NETNS(&ev, sk_net(sk));
	ev.port = __builtin_bswap16(KREAD(u16, sk, OFF_SKC_DPORT));
	read_daddr(&ev, sk);
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
	emit(ctx, &ev);
}

/* A tracked client's later callbacks asked for; c remembers which flags were ours to add
 * (so_client_closed clears only those). */
static __always_inline void follow_client(struct bpf_sock_ops *skops, struct conn *c)
{
	c->flags_added = CLIENT_FLAGS & ~skops->bpf_sock_ops_cb_flags;
	ops_set_flags(skops, CLIENT_FLAGS);
}

/* connect() (or the first sendmsg of TCP_FASTOPEN_CONNECT), before the SYN is built: who
 * connects where. Only TFO attempts are tracked, and asked for their state changes. */
static __always_inline void so_connect(void *ctx, struct bpf_sock_ops *skops)
{
	struct kp sk = ops_full_sk(skops);
	u64 key = (u64)sk.p;
	struct conn c = {}, *made;

	if (!sk.p)
		return;
#if TW_SOCKOPS
	so_tw_takeover(ctx, sk);
#endif
#if ACTIVE_KPROBE
	/* The kprobe tier: the tcp_connect kprobe's entry, just before this callback, made the
	 * entry of a TFO attempt with who connects (6.1 refuses sock_ops bpf_get_current_pid_tgid,
	 * 6.12 bpf_get_current_comm), and reported a plain connect. */
	if (!fastopen_attempted(sk))
		return;
	made = conns.lookup(&key);
	if (made) {
		follow_client(skops, made);
		return;
	}
	c.attempted = 1; /* the kprobe did not run (a kprobe missed): tracked without its task */
	conn_dest(&c, sk);
#else
	if (!connect_seen(ctx, sk, &c))
		return;
#endif
	follow_client(skops, &c);
	conns.update(&key, &c);
}

/* The client's SYN-ACK (ACTIVE_ESTABLISHED: before the kernel sets syn_data_acked, so the
 * ack is read from snd_una). The socket stays tracked until it closes. Every client socket
 * passes here; only those so_connect tracked carry the state flag it set, so the others (the
 * plain connections) cost no lookup. */
static __always_inline void so_client_established(void *ctx, struct bpf_sock_ops *skops)
{
	struct kp sk;
	u64 key;
	struct conn *c;

	if (!(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		return;
	sk = ops_full_sk(skops);
	key = (u64)sk.p;
	if (!sk.p)
		return;
	c = conns.lookup(&key);
	if (!c)
		return;
	c->established = 1;
	client_syn_outcome(ctx, sk, c);
	if (TP_BIT(sk, SYN_DATA)) {
		if (skops->snd_una == skops->snd_nxt)
			emit_client(ctx, EV_SYN_DATA_ACKED, c);
		else if (skops->total_retrans)
			emit_client(ctx, EV_SYN_RETRANSMITTED, c);
		else
			emit_client(ctx, EV_DATA_NOT_ACKED, c);
	}
}

/* A tracked client socket closes: what its SYN carried when it never had a SYN-ACK. */
static __always_inline void so_client_closed(void *ctx, struct bpf_sock_ops *skops)
{
	struct kp sk = ops_full_sk(skops);
	u64 key = (u64)sk.p;
	struct conn *c;

	if (!sk.p)
		return;
	c = conns.lookup(&key);
	if (!c)
		return;
	if (!c->established)
		client_syn_outcome(ctx, sk, c);
#if BLACKHOLE_SOCKOPS
	fin_only_ofo(ctx, sk);
#endif
	if (c->flags_added) /* a socket disconnected (AF_UNSPEC) may connect again, without TFO */
		ops_clear_flags(skops, c->flags_added);
	conns.delete(&key);
}

#if SOCKOPS_PASSIVE
#define LEVEL_TCP 6
/* OPT_CB_FLAGS: TCP_BPF_SOCK_OPS_CB_FLAGS (6.12), from adopt.py */
/* tfowatch's pid: the only caller whose setsockopt() on_adopt acts on (adopt.py sets it). */
BPF_ARRAY(adopter, u32, 1);

/* A listener opened before tfowatch attached never passes TCP_LISTEN_CB. adopt.py calls
 * setsockopt(SOL_TCP, 1008) on a duplicate of its fd (pidfd_getfd), which runs this cgroup
 * setsockopt program on tfowatch's own cgroup for the few milliseconds it takes: the listener
 * gets the SYN-ACK flag as if its listen() had been seen, and the kernel's setsockopt is
 * skipped. Any other setsockopt() passes untouched. Before 6.12 bpf_setsockopt() knows no
 * 1008, and the caller gets EPERM: the listener stays unwatched (and is counted so). */
int on_adopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct listener_key k = {};
	int zero = 0, flags = 0;
	u32 *tgid = adopter.lookup(&zero);
	u8 ours;

	if (ctx->level != LEVEL_TCP || ctx->optname != OPT_CB_FLAGS || !tgid ||
	    (u32)(bpf_get_current_pid_tgid() >> 32) != *tgid)
		return 1;
	if (sk->state != BPF_TCP_LISTEN)
		return 0;
	if (bpf_getsockopt(sk, LEVEL_TCP, OPT_CB_FLAGS, &flags, sizeof(flags)))
		return 0;
	ours = !(flags & SYNACK_FLAG);
	flags |= SYNACK_FLAG;
	if (bpf_setsockopt(sk, LEVEL_TCP, OPT_CB_FLAGS, &flags, sizeof(flags)))
		return 0;
	/* bpf_sockopt_kern starts with the kernel's struct sock, as bpf_sock_ops_kern does */
	listener_key(&k, KP(read_u64((const void *)ctx)), sk->src_port);
	if (synack_listeners.insert(&k, &ours) == 0) /* a listen() seen meanwhile keeps its own */
		note_synack_port(k.port, ours);
	ctx->optlen = -1; /* handled: the kernel's setsockopt() is skipped */
	return 1;
}
#endif

static __always_inline void sock_ops_dispatch(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
#if SOCKOPS_PASSIVE
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		so_listen(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		so_synack(skops, skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		so_passive(skops, skops);
		break;
#endif
#if SOCKOPS_ACTIVE
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		so_connect(skops, skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		so_client_established(skops, skops);
		break;
	case BPF_SOCK_OPS_STATE_CB: /* args[0]: old state, args[1]: new */
		if (skops->args[1] == TCP_CLOSE)
			so_client_closed(skops, skops);
		break;
#endif
#if DETECT_SOCKOPS
	case BPF_SOCK_OPS_RTO_CB: { /* right after the kernel's blackhole detection, with its values */
		struct kp sk = ops_full_sk(skops);

		if (sk.p)
			on_tfo_timeout(skops, sk, skops->args[0], skops->args[2]);
		break;
	}
#endif
	}
}

#if PROFILE_OPS
/* bench/callbacks.py only, never a shipped build: each callback's runs and nanoseconds, timed
 * around the dispatch; slot PROFILE_CLOCK times two clock reads alone (what the timing adds). */
#define PROFILE_SLOTS 64
#define PROFILE_CLOCK (PROFILE_SLOTS - 1)
struct op_cost {
	u64 runs;
	u64 ns;
};
BPF_PERCPU_ARRAY(op_costs, struct op_cost, PROFILE_SLOTS);

static __always_inline void op_cost_add(u32 slot, u64 ns)
{
	struct op_cost *c = op_costs.lookup(&slot);

	if (c) {
		c->runs++;
		c->ns += ns;
	}
}
#endif

int on_sock_ops(struct bpf_sock_ops *skops)
{
#if PROFILE_OPS
	u64 t0 = bpf_ktime_get_ns(), t1 = bpf_ktime_get_ns();
	u32 op = skops->op;

	op_cost_add(PROFILE_CLOCK, t1 - t0);
	t0 = bpf_ktime_get_ns();
	sock_ops_dispatch(skops);
	op_cost_add(op < PROFILE_CLOCK ? op : PROFILE_CLOCK - 1, bpf_ktime_get_ns() - t0);
#else
	sock_ops_dispatch(skops);
#endif
	return 1;
}
#endif

#if CONNECT_ERRORS
/* connect(2) failing with EADDRNOTAVAIL on a TCP socket: no local port could be found for the
 * 4-tuple (every ephemeral port in use for that destination, or held by TIME-WAIT sockets that
 * may not be reused). The refusal signal of the tiers that do not see tcp_twsk_unique, per
 * process and remote port; io_uring's connect and 32-bit socketcall() are not seen. */
#define EADDRNOTAVAIL 99
struct connect_call {
	u64 uservaddr;
	u32 fd;
};

#if CONNECT_AT_EXIT
/* The call's arguments at its exit, from the task's saved user registers (x86-64: di holds
 * the fd and si the address; the kernel reads them from there and never writes them back):
 * one tracepoint run per connect(2), which returns at once unless it failed so. */
static __always_inline int connect_call(struct connect_call *call)
{
	const void *regs = (const void *)bpf_task_pt_regs(bpf_get_current_task_btf());

	call->fd = read_u64(regs + OFF_PT_REGS_DI);
	call->uservaddr = read_u64(regs + OFF_PT_REGS_SI);
	return 1;
}
#else
/* Where the registers are not known: the arguments kept from the call's entry. */
BPF_HASH(connect_calls, u64, struct connect_call, 4096);

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	u64 id = bpf_get_current_pid_tgid();
	struct connect_call call = {};

	call.uservaddr = (u64)args->uservaddr;
	call.fd = args->fd;
	connect_calls.update(&id, &call);
	return 0;
}

static __always_inline int connect_call(struct connect_call *call)
{
	u64 id = bpf_get_current_pid_tgid();
	struct connect_call *kept = connect_calls.lookup(&id);

	if (!kept)
		return 0;
	*call = *kept;
	connect_calls.delete(&id);
	return 1;
}
#endif

/* The struct sock of this task's file descriptor fd (0 when there is none). */
static __always_inline const void *fd_sock(u32 fd)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *files = (const void *)read_u64(task + OFF_TASK_FILES);
	const void *fdt = (const void *)read_u64(files + OFF_FILES_FDT);
	const void *file;

	if (!fdt || fd >= read_u32(fdt + OFF_FDT_MAX_FDS))
		return 0;
	file = (const void *)read_u64((const void *)read_u64(fdt + OFF_FDT_FD) + fd * sizeof(u64));
	if (!file)
		return 0;
	return (const void *)read_u64((const void *)read_u64(file + OFF_FILE_PRIVATE) + OFF_SOCKET_SK);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	struct connect_call call = {};
	struct tfo_event ev = {};
	const void *sk;
	u8 addr[8] = {};
	long ret = args->ret;

#if CONNECT_AT_EXIT
	if (ret != -EADDRNOTAVAIL) /* nearly every call: nothing else is read */
		return 0;
#endif
	if (!connect_call(&call) || ret != -EADDRNOTAVAIL) /* (the entry's copy goes either way) */
		return 0;
	sk = fd_sock(call.fd); /* a socket: connect() on anything else fails with ENOTSOCK */
	if (!sk || read_u16(sk + OFF_SK_PROTOCOL) != PROTO_TCP)
		return 0;
	bpf_probe_read_user(addr, sizeof(addr), (const void *)call.uservaddr);
	ev.family = *(u16 *)addr;
	if (ev.family == AF_INET6)
		bpf_probe_read_user(ev.daddr, 16, (const void *)(call.uservaddr + 8));
	else
		__builtin_memcpy(ev.daddr, addr + 4, 4);
	ev.type = EV_CONNECT_EADDRNOTAVAIL;
	ev.port = ((u16)addr[2] << 8) | addr[3];
	SET_NETNS(&ev, sk_net(KP(sk)));
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	ev.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
	emit(args, &ev);
	return 0;
}
#endif

#if CGROUP_NAMES
/* cgroup id -> its path in the v2 tree, as each cgroup is made (CGROUP_PATH_LEN and
 * MAX_CGROUP_PATHS come from loader.py). LRU: a removed cgroup's name lasts until that many
 * newer cgroups are made, long after its counts were read. */
struct cgroup_path {
	char path[CGROUP_PATH_LEN];
};
BPF_TABLE("lru_hash", u64, struct cgroup_path, cgroup_paths, MAX_CGROUP_PATHS);

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	struct cgroup_path p = {};
	u64 id = args->id;

	if (args->root != 0) /* hierarchy 0 is the v2 tree; cgroup v1 ids are another space */
		return 0;
	TP_DATA_LOC_READ_STR(p.path, path, sizeof(p.path));
	cgroup_paths.update(&id, &p);
	return 0;
}
#endif
