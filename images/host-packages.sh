#!/usr/bin/env bash
# Installs the host packages the guest build and the C benchmarks need, if any is missing:
# gcc, g++ and binutils (the guest's C runtime and the C programs are built with them) and
# mimalloc (the native anchor of `make bench-c`). Debian/Ubuntu; run as root (or with sudo).
set -euo pipefail
want=(gcc g++ binutils libmimalloc2.0)
missing=()
for p in "${want[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "images/host-packages.sh: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y "${missing[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update >/dev/null
    $sudo apt-get install -y "${missing[@]}" >/dev/null
}
