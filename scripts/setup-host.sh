#!/bin/bash
# Host set-up for tfowatch on Debian 12: packages, kernel headers BCC can compile
# against, tracefs. Idempotent; run as root.
#     scripts/setup-host.sh             development and tests (`make run`, `make test`)
#     scripts/setup-host.sh --runtime   what the daemon needs to run (`make install`)
set -euo pipefail

RUNTIME_PACKAGES=(python3-bpfcc python3-venv)
DEV_PACKAGES=(bpfcc-tools bpftool linux-headers-amd64 iproute2 nftables prometheus tmux procps
              bpftrace tcpdump podman runc mmdebstrap)  # the last three: tests/host/test_container.py
here=$(dirname "$0")

if [ "${1:-}" = --runtime ]; then
  # Headers for BCC: Debian's, unless some are installed already.
  hdrs=()
  ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1 || hdrs=(linux-headers-amd64)
  "$here/apt-ensure.sh" "${RUNTIME_PACKAGES[@]}" "${hdrs[@]}"
else
  "$here/apt-ensure.sh" "${RUNTIME_PACKAGES[@]}" "${DEV_PACKAGES[@]}"
fi

# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel ships no
# headers (our machines), link Debian's: tfowatch reads every struct field at offsets
# from the running kernel's BTF, so only macros and helper prototypes come from them.
rel=$(uname -r)
if [ ! -e "/lib/modules/$rel/build/Makefile" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  [ -n "$hdr" ] && [ -d "$common" ] || { echo "setup: no linux-headers-*-amd64 in /usr/src" >&2; exit 1; }
  mkdir -p "/lib/modules/$rel"
  ln -sfn "$hdr" "/lib/modules/$rel/build"
  ln -sfn "$common" "/lib/modules/$rel/source"
  echo "setup: linked $hdr as kernel headers for $rel"
fi

# A systemd host mounts tracefs itself (sys-kernel-tracing.mount); the tests' hosts may not.
[ "${1:-}" = --runtime ] || mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
exit 0
