#!/usr/bin/env bash
# Short fuzz runs of every cargo-fuzz target in fuzz/ on the stable toolchain.
#   ci/fuzz.sh [SECONDS_PER_TARGET]      default 15
# cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation); RUSTC_BOOTSTRAP=1 lets
# the stable compiler accept them, so no nightly toolchain is needed. One `cargo fuzz build`
# builds every target (kiln without its `s3` feature: see fuzz/Cargo.toml) into fuzz/target,
# the corpora go to fuzz/corpus/TARGET (both ignored by git); crashes land in
# fuzz/artifacts/TARGET and fail the run. Without cargo-fuzz: a loud SKIPPED line, or a
# failure under CI=true (.ci/run installs it). The last line gives the build and total time.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-15}
# Every [[bin]] of fuzz/Cargo.toml, in the order they run.
TARGETS=(nbd_handshake nvmf_pdu journal_record config_toml mirror_sb)
# Seed corpora and dictionaries, where a target has them (read-only; new units go to corpus/).
declare -A SEEDS=([config_toml]=../configs)
declare -A DICTS=([config_toml]=dict/config_toml.dict)
# -a: debug assertions and overflow checks on, so an integer overflow is a crash too.
BUILD_FLAGS=(-a)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "SKIPPED: ci/fuzz.sh needs cargo-fuzz (cargo install cargo-fuzz --locked --version 0.13.2)" >&2
    [[ ${CI:-} == true ]] && { echo "FAILED: cargo-fuzz is missing under CI=true" >&2; exit 1; }
    exit 0
fi
export RUSTC_BOOTSTRAP=1
listed=$(cargo fuzz list | sort | tr '\n' ' ')
wanted=$(printf '%s\n' "${TARGETS[@]}" | sort | tr '\n' ' ')
if [[ $listed != "$wanted" ]]; then
    echo "FAILED: fuzz/Cargo.toml has targets '$listed' but ci/fuzz.sh runs '$wanted'" >&2
    exit 1
fi
t0=$SECONDS
echo "== cargo fuzz build ${BUILD_FLAGS[*]} (all targets)"
cargo fuzz build "${BUILD_FLAGS[@]}"
build_s=$((SECONDS - t0))
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${TARGETS[@]}"; do
    echo "== fuzz $t for ${SECS}s"
    mkdir -p "corpus/$t"
    extra=()
    [[ -n ${DICTS[$t]:-} ]] && extra+=("-dict=${DICTS[$t]}")
    # shellcheck disable=SC2086  # SEEDS holds zero or one directory
    if ! cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" ${SEEDS[$t]:-} -- \
        -max_total_time="$SECS" -max_len=4096 -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAILED: fuzz target $t crashed; the input is in fuzz/artifacts/$t; reproduce with" \
            "(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD_FLAGS[*]} $t artifacts/$t/FILE)" >&2
        exit 1
    fi
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log"
done
echo "fuzz: ${#TARGETS[@]} targets, ${SECS}s each, no crash; build ${build_s}s, total $((SECONDS - t0))s"
