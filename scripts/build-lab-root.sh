#!/bin/bash
# The VM lab's systemd root (tests/lab/test_vm_lab.py::test_systemd_unit_under_real_systemd): a
# Debian 12 root filesystem with systemd as init, built from Debian's packages with the host's
# apt sources, holding the lab kernel (its modules) and headers, BCC, and what the in-guest
# test uses. tfowatch itself is not in it: the test puts it in place with `make install`.
#     scripts/build-lab-root.sh DIR KERNEL_RELEASE
# Idempotent: kept while this script and the release are unchanged.
set -euo pipefail
dir=$1 release=$2
stamp="$dir.stamp"
want="$(sha256sum "$0" | cut -c1-16) $release"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e "$dir/sbin/init" ]; then exit 0; fi
rm -rf "$dir" "$stamp"
pkgs=(systemd systemd-sysv udev dbus iproute2 procps util-linux kmod make ca-certificates
      python3-venv python3-bpfcc "linux-image-$release" "linux-headers-$release"
      bpftool python3-pytest python3-prometheus-client python3-pyroute2)
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
  [ -e "$f" ] && sources+=("$f")
done
mkdir -p "$(dirname "$dir")"
mmdebstrap --variant=minbase --quiet --include="$(IFS=,; echo "${pkgs[*]}")" bookworm "$dir" "${sources[@]}"
echo "$want" > "$stamp"
