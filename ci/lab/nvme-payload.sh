#!/usr/bin/env bash
# Builds the guest payload of issue 8's NVMe tests for ci/guest-nvme-test.sh
# --payload DIR (the payload contract of ci/lab/README.md): a statically linked
# kiln in PAYLOAD_DIR/bin, ci/lab/guest-nvme-run.sh as guest-run.sh (run on
# vfio-pci) and ci/lab/guest-nvme-verify.sh as guest-verify.sh (run after the
# kernel driver took the controller back).
#
#   ci/lab/nvme-payload.sh PAYLOAD_DIR
#
# By default the payload carries the normal release binary (target/release/kiln,
# built by ci/test.sh before the tests) with the shared libraries ldd names and a
# wrapper that starts it through the payload's own loader, so no second build is
# needed. KILN_PAYLOAD_STATIC=1 builds a statically linked kiln in target/static
# instead; KILN_STATIC_BIN uses a given static binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:?usage: $0 PAYLOAD_DIR}
mkdir -p "$dir/bin"
bin=${KILN_STATIC_BIN:-}
if [ -z "$bin" ] && [ "${KILN_PAYLOAD_STATIC:-0}" = 1 ]; then
  echo "== static kiln (target/static)"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/static \
    cargo build --release --quiet --target x86_64-unknown-linux-gnu --bin kiln
  bin=target/static/x86_64-unknown-linux-gnu/release/kiln
fi
if [ -n "$bin" ]; then
  ldd "$bin" 2>&1 | grep -Eq "statically linked|not a dynamic executable" ||
    { echo "$bin is not statically linked" >&2; exit 1; }
  cp "$bin" "$dir/bin/kiln"
  strip --strip-debug "$dir/bin/kiln" 2>/dev/null || true
else
  bin=target/release/kiln
  [ -x "$bin" ] || cargo build --release --quiet --bin kiln
  mkdir -p "$dir/lib"
  cp "$bin" "$dir/lib/kiln"
  strip --strip-debug "$dir/lib/kiln" 2>/dev/null || true
  loader=""
  # Every shared library the binary needs, and the loader itself, by real path.
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    cp -L "$lib" "$dir/lib/"
    case $lib in */ld-linux*) loader=$(basename "$lib") ;; esac
  done
  [ -n "$loader" ] || { echo "no ELF loader in ldd $bin" >&2; exit 1; }
  cat > "$dir/bin/kiln" <<WRAP
#!/bin/sh
exec /payload/lib/$loader --library-path /payload/lib /payload/lib/kiln "\$@"
WRAP
fi
cp ci/lab/guest-nvme-run.sh "$dir/guest-run.sh"
cp ci/lab/guest-nvme-verify.sh "$dir/guest-verify.sh"
cp ci/lab/guest-nvme-lib.sh "$dir/kiln-lib.sh"
chmod +x "$dir/guest-run.sh" "$dir/guest-verify.sh" "$dir/bin/kiln"
