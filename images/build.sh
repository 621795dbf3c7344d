#!/usr/bin/env bash
# Builds the default guest image into images/out/guest.elf.
#
# GUEST_OUT=PATH writes the image there instead, and GUEST_TARGET_DIR=DIR builds in DIR instead
# of guest/target (a build with other C programs, CBENCH_EXTRA, must not race the default one).
#
# The guest is a freestanding x86_64-unknown-none binary (guest/.cargo/config.toml picks the
# target; guest/build.rs adds the linker script and --no-pie). The copy is atomic, so tests that
# run this concurrently never see a half-written image.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
profile="${GUEST_PROFILE:-release}"

if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
    echo "images/build.sh: the x86_64-unknown-none target is missing; run: rustup target add x86_64-unknown-none" >&2
    exit 1
fi

# The guest has its own workspace and config: build from its directory, with none of an outer
# cargo's settings leaking in.
unset CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET RUSTC_WORKSPACE_WRAPPER
target="${GUEST_TARGET_DIR:-$root/guest/target}"
out="${GUEST_OUT:-$here/out/guest.elf}"
(cd "$root/guest" && CARGO_TARGET_DIR="$target" cargo build --quiet --profile "$profile")
mkdir -p "$(dirname "$out")"
tmp="$(mktemp "$(dirname "$out")/.guest.elf.XXXXXX")"
cp "$target/x86_64-unknown-none/$profile/guest" "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$out"
