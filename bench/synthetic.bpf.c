/* A synthetic event source for bench/synthetic.py: every getppid() of the target process
 * sends BATCH struct tfo_event (tfowatch/bpf/tfowatch.h, the daemon's own layout) through a perf buffer
 * like the daemon's, so the benchmark drives tfowatch's decode → aggregate path at a chosen
 * rate through the real kernel buffer, without needing that much TCP traffic. BATCH events per system call keep the
 * generator, a Python loop, from being the bottleneck. */
#include <uapi/linux/ptrace.h>
#include "tfowatch.h"

#define BATCH 8

BPF_ARRAY(target, u32, 1);     /* tgid of the generator; 0 = off */
BPF_ARRAY(submitted, u64, 1);  /* events offered to the perf buffer */
BPF_PERF_OUTPUT(events);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
	u32 zero = 0;
	u32 *tgid = target.lookup(&zero);
	u64 *n = submitted.lookup(&zero);
	struct tfo_event ev = {};

	if (!tgid || !n || *tgid != (u32)(bpf_get_current_pid_tgid() >> 32))
		return 0;
	__sync_fetch_and_add(n, BATCH);
	ev.netns = 4026531840;
	ev.pid = *tgid;
	ev.family = 2;
	bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#pragma unroll
	for (int i = 0; i < BATCH; i++) {
		ev.ts_ns = bpf_ktime_get_ns();
		ev.type = EV_SYN_DATA_SENT + (i & 1);       /* sent / acked, as real clients give */
		ev.port = 7000 + (ev.ts_ns >> 4 & 63);      /* 64 ports: 64 series per metric */
		events.perf_submit(args, &ev, sizeof(ev));
	}
	return 0;
}
