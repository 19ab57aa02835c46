#!/usr/bin/env bash
# Miri, the interpreter that detects undefined behaviour (out-of-bounds or dangling access,
# data races, invalid values), over the unit tests of the pure-logic modules: the extent map,
# the journal (record codec, superblock, checkpoint and log recovery on RAM devices), the
# allocator, the heat sampler (concurrent recorders) and the frame codec.
#   ci/miri.sh      needs the pinned nightly with miri and rust-src; .ci/run installs it with
#                   rustup toolchain install nightly-2026-05-20 --profile minimal --component miri,rust-src
# Without it: a loud SKIPPED line, or a failure under CI=true. The last line counts the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${MIRI_TOOLCHAIN:-nightly-2026-05-20}
MODULES=(volume::extent_map volume::journal volume::allocator heat:: frame::)
# The unit tests those filters select today; fewer means a filter no longer matches.
EXPECTED=16
if ! cargo "+$TC" miri --version >/dev/null 2>&1; then
    echo "SKIPPED: ci/miri.sh needs the $TC toolchain with miri (rustup toolchain install $TC --profile minimal --component miri,rust-src)" >&2
    [[ ${CI:-} == true ]] && { echo "FAILED: miri is missing under CI=true" >&2; exit 1; }
    exit 0
fi
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Without the `s3` feature (no tokio/object_store to interpret, as in the fuzz build).
cargo "+$TC" miri test -p kiln --lib --no-default-features -- "${MODULES[@]}" 2>&1 | tee "$log"
passed=$(awk '/^test result:/ { p += $4 } END { print p + 0 }' "$log")
if ((passed < EXPECTED)); then
    echo "FAILED: miri ran $passed tests, expected $EXPECTED (${MODULES[*]})" >&2
    exit 1
fi
echo "miri: $passed tests passed (${MODULES[*]}), $(($(date +%s) - start))s"
