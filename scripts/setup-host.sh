#!/bin/bash
# Host set-up for tfowatch on Debian 12: packages, kernel headers BCC can compile
# against, tracefs. Idempotent; run as root. Used by `make run` and `make test`.
set -euo pipefail

APT_PACKAGES=(python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 python3-venv
              iproute2 nftables prometheus tmux procps bpftrace
              podman runc mmdebstrap)  # the container image test (tests/test_container.py)

"$(dirname "$0")/apt-ensure.sh" "${APT_PACKAGES[@]}"

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

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
exit 0
