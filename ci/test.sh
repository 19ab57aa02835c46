#!/usr/bin/env bash
# The test command: builds kiln and runs every test, unit and end-to-end.
# End-to-end tests drive the real binary with real clients (nbdinfo,
# qemu-img, fio). Under CI=true a missing tool fails the run; elsewhere the
# affected tests are skipped with a loud SKIPPED line.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy -- -D warnings"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo build --release"
cargo build --release
echo "== cargo test --release"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release -- --test-threads=2 2>&1 | tee "$log"
# Every fuzz target for a short time (its own build under fuzz/target; SKIPPED outside CI
# without cargo-fuzz). It prints no "test result:" lines, so the closing line below still
# counts exactly the cargo tests.
echo "== ci/fuzz.sh"
ci/fuzz.sh "${FUZZ_SECONDS:-15}"
# Miri over the pure-logic modules (a pinned nightly; SKIPPED outside CI without it).
echo "== ci/miri.sh"
ci/miri.sh
# One closing line over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
