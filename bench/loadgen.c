/* The benchmarks' connection load in C (bench/run.py --load c): the same server and client as
 * bench/load.py, with the same arguments and output, without Python's cost per connection, so
 * the rate at saturation is the kernel's and tfowatch's, not the interpreter's.
 *
 *   loadgen server PORT WORKERS
 *   loadgen client ADDR PORT WORKERS SECONDS [--rate N] [--plain]
 *   loadgen syscall CALLS
 *
 * Built by bench/run.py with the system's cc into a temporary directory.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char PAYLOAD[] = "GET / HTTP/1.0\r\n\r\n";

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
	double d = t - now();
	struct timespec ts;

	if (d <= 0)
		return;
	ts.tv_sec = (time_t)d;
	ts.tv_nsec = (long)((d - ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

/* One worker: its own SO_REUSEPORT listener with TCP_FASTOPEN; read, answer, await the close. */
static void serve(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, qlen = 4096, ls = socket(AF_INET, SOCK_STREAM, 0);
	char buf[256];

	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
	    setsockopt(ls, IPPROTO_TCP, TCP_FASTOPEN, &qlen, sizeof(qlen)) ||
	    bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 4096))
		die("listen");
	if (write(1, "ready\n", 6) != 6)
		die("write");
	for (;;) {
		int c = accept(ls, NULL, NULL);

		if (c < 0)
			continue;
		if (recv(c, buf, sizeof(buf), 0) > 0 && send(c, "ok", 2, MSG_NOSIGNAL) == 2)
			recv(c, buf, 16, 0); /* the client's reset ends it */
		close(c);
	}
}

/* One connection, ended with a reset (SO_LINGER 0) so no side keeps TIME-WAIT: 0 when answered. */
static int connect_once(const struct sockaddr_in *a, int plain)
{
	struct linger reset = { 1, 0 };
	struct timeval timeout = { 5, 0 };
	char buf[16];
	int ok, s = socket(AF_INET, SOCK_STREAM, 0);

	if (s < 0)
		return -1;
	setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	if (plain)
		ok = connect(s, (const struct sockaddr *)a, sizeof(*a)) == 0 &&
		     send(s, PAYLOAD, sizeof(PAYLOAD) - 1, MSG_NOSIGNAL) > 0;
	else
		ok = sendto(s, PAYLOAD, sizeof(PAYLOAD) - 1, MSG_FASTOPEN | MSG_NOSIGNAL,
			    (const struct sockaddr *)a, sizeof(*a)) > 0;
	ok = ok && recv(s, buf, sizeof(buf), 0) > 0;
	close(s);
	return ok ? 0 : -1;
}

static void work(const struct sockaddr_in *a, int plain, double start, double end, double rate, int out)
{
	long conns = 0, errors = 0;
	double interval = rate > 0 ? 1.0 / rate : 0, due = start, t;
	char line[64];
	int n;

	while ((t = now()) < end) {
		if (interval) {
			sleep_until(due);
			due += interval;
		}
		if (connect_once(a, plain)) {
			errors++;
			continue;
		}
		if (now() >= start)
			conns++;
	}
	n = snprintf(line, sizeof(line), "%ld %ld\n", conns, errors);
	if (write(out, line, n) != n) /* one write per worker: lines do not interleave */
		exit(2);
}

static int client(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	int workers, plain = 0, fds[2], i;
	double seconds, rate = 0, start, end;
	long conns = 0, errors = 0, c, e;
	FILE *results;

	if (argc < 6)
		return 2;
	if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1)
		die("address");
	a.sin_port = htons(atoi(argv[3]));
	workers = atoi(argv[4]);
	seconds = atof(argv[5]);
	for (i = 6; i < argc; i++) {
		if (!strcmp(argv[i], "--plain"))
			plain = 1;
		else if (!strcmp(argv[i], "--rate") && i + 1 < argc)
			rate = atof(argv[++i]);
	}
	connect_once(&a, plain); /* the first TFO connection fetches the cookie */
	start = now() + 0.3;
	end = start + seconds;
	if (pipe(fds))
		die("pipe");
	for (i = 0; i < workers; i++) {
		if (fork() == 0) {
			close(fds[0]);
			work(&a, plain, start, end, rate / workers, fds[1]);
			_exit(0);
		}
	}
	close(fds[1]);
	while (wait(NULL) > 0)
		;
	results = fdopen(fds[0], "r");
	while (results && fscanf(results, "%ld %ld", &c, &e) == 2) {
		conns += c;
		errors += e;
	}
	printf("{\"conns\": %ld, \"errors\": %ld, \"seconds\": %g}\n", conns, errors, seconds);
	return 0;
}

/* What a syscall that tfowatch never looks at costs with whatever is attached to the syscall
 * path (a syscall tracepoint puts every task's every syscall on the slow path): getppid(2)'s
 * time in ns, the best of 5 rounds (the least disturbed by the machine's neighbours). */
static int syscall_cost(long calls)
{
	double best = 1e9;

	for (int round = 0; round < 5; round++) {
		double t0 = now(), ns;

		for (long i = 0; i < calls / 5; i++)
			syscall(SYS_getppid);
		ns = (now() - t0) * 1e9 / (calls / 5);
		if (ns < best)
			best = ns;
	}
	printf("{\"getppid_ns\": %.1f}\n", best);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "server")) {
		for (int i = 1; i < atoi(argv[3]); i++)
			if (fork() == 0)
				break;
		serve(atoi(argv[2]));
	}
	if (argc >= 2 && !strcmp(argv[1], "client"))
		return client(argc, argv);
	if (argc == 3 && !strcmp(argv[1], "syscall"))
		return syscall_cost(atol(argv[2]));
	fprintf(stderr, "usage: loadgen server PORT WORKERS | client ADDR PORT WORKERS SECONDS "
			"[--rate N] [--plain] | syscall CALLS\n");
	return 2;
}
