#!/bin/bash
# VM lab set-up (issue 3): qemu, busybox, and each lab kernel's image and headers.
# Idempotent; run as root. virtme-ng comes from PyPI with the test extras.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(qemu-system-x86 busybox-static)
while read -r rel; do
  case "$rel" in ''|'#'*) continue ;; esac
  pkgs+=("linux-image-$rel" "linux-headers-$rel")
done < "$here/tests/vm/kernels.txt"
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-vm-lab: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
