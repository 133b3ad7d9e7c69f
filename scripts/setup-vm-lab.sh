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
"$here/scripts/apt-ensure.sh" "${pkgs[@]}"
