#!/bin/sh
# Why the lab runs qemu with single-threaded TCG (tests/vm/lab.py, TCG): flip the two
# tracepoints tfowatch's 6.12 plan attaches, as fast as a shell can, while loopback connections
# run on both vCPUs. No tfowatch, no BPF. Run inside a lab guest, as root:
#
#   vng --run /boot/vmlinuz-6.12.117+deb12-amd64 --disable-kvm --force-9p --cpus 2 --memory 2G \
#       --exec "sh tests/vm/poke_race.sh 300" --qemu-opts="-accel tcg,thread=multi"
#
# thread=multi (qemu's default): "Oops: int3" and a panic within seconds; thread=single: the
# script ends with "survived". SECONDS defaults to 60.
set -eu
seconds=${1:-60}
events=/sys/kernel/tracing/events
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
python3 - "$seconds" <<'EOF' &
import os, socket, sys, time
end = time.time() + float(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0), backlog=512)
port = srv.getsockname()[1]
for _ in range(3):
    if os.fork() == 0:
        n = 0
        while time.time() < end:
            socket.create_connection(("127.0.0.1", port)).close()
            n += 1
        print("connections", n, flush=True)
        os._exit(0)
srv.settimeout(1)
while time.time() < end:
    try:
        srv.accept()[0].close()
    except OSError:
        pass
EOF
flips=0
end=$(( $(date +%s) + seconds ))
while [ "$(date +%s)" -lt "$end" ]; do
    for state in 1 0; do
        echo $state > $events/sock/inet_sock_set_state/enable
        echo $state > $events/tcp/tcp_destroy_sock/enable
    done
    flips=$((flips + 4))
done
wait
echo "static key flips: $flips; survived"
