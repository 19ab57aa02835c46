#!/usr/bin/env bash
# Builds the guest payload of issue 8's NVMe tests for ci/guest-nvme-test.sh
# --payload DIR (the payload contract of ci/lab/README.md): a statically linked
# kiln in PAYLOAD_DIR/bin, ci/lab/guest-nvme-run.sh as guest-run.sh (run on
# vfio-pci) and ci/lab/guest-nvme-verify.sh as guest-verify.sh (run after the
# kernel driver took the controller back).
#
#   ci/lab/nvme-payload.sh PAYLOAD_DIR
#
# The static build goes to target/static (CARGO_TARGET_DIR) so it does not
# disturb the normal build; KILN_STATIC_BIN skips the build and uses that binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:?usage: $0 PAYLOAD_DIR}
mkdir -p "$dir/bin"
bin=${KILN_STATIC_BIN:-}
if [ -z "$bin" ]; then
  echo "== static kiln (target/static)"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/static \
    cargo build --release --quiet --target x86_64-unknown-linux-gnu --bin kiln
  bin=target/static/x86_64-unknown-linux-gnu/release/kiln
fi
ldd "$bin" 2>&1 | grep -Eq "statically linked|not a dynamic executable" ||
  { echo "$bin is not statically linked" >&2; exit 1; }
cp "$bin" "$dir/bin/kiln"
strip --strip-debug "$dir/bin/kiln" 2>/dev/null || true
cp ci/lab/guest-nvme-run.sh "$dir/guest-run.sh"
cp ci/lab/guest-nvme-verify.sh "$dir/guest-verify.sh"
cp ci/lab/guest-nvme-lib.sh "$dir/kiln-lib.sh"
chmod +x "$dir/guest-run.sh" "$dir/guest-verify.sh" "$dir/bin/kiln"
