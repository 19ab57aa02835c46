#!/usr/bin/env bash
# Short fuzz runs of every cargo-fuzz target (nightly + cargo-fuzz needed).
#   ci/fuzz.sh [SECONDS_PER_TARGET]      default 30
# Without cargo-fuzz or a nightly toolchain: a loud SKIPPED line, or a failure under CI=true.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-30}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "SKIPPED: ci/fuzz.sh needs 'cargo install cargo-fuzz' and a nightly toolchain" >&2
    [[ ${CI:-} == true ]] && exit 1
    exit 0
fi
for t in nbd_handshake nvmf_pdu; do
    echo "== fuzz $t for ${SECS}s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$SECS" -max_len=4096
done
