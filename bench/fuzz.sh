#!/usr/bin/env bash
# Long fuzz runs: every cargo-fuzz target in fuzz/ for RUNS executions (default 10,000,000,
# issue 10's acceptance), one after the other, on the stable toolchain (RUSTC_BOOTSTRAP=1,
# as ci/fuzz.sh). Writes executions, exec/s, wall time, corpus size and crashes per target
# into bench/RESULTS.md between the fuzz markers and prints a last line
# `fuzz: T targets, E executions, C crashes`.
#   bench/fuzz.sh [RUNS] [TARGET...]       e.g. bench/fuzz.sh 10000000
# MAX_SECONDS=N caps each target's run (libFuzzer -max_total_time; 0 = no cap): the table
# then shows the executions actually reached. The runs go one at a time under `nice`.
# Needs cargo-fuzz (cargo install cargo-fuzz --locked --version 0.13.2). The corpora persist
# in fuzz/corpus/TARGET between runs; crashes land in fuzz/artifacts/TARGET.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export ROOT
cd "$ROOT/fuzz"
RUNS=${1:-10000000}
shift || true
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(nbd_handshake nvmf_pdu journal_record config_toml mirror_sb)
declare -A SEEDS=([config_toml]=../configs)
declare -A DICTS=([config_toml]=dict/config_toml.dict)
BUILD_FLAGS=(-a)
MAX_SECONDS=${MAX_SECONDS:-0}
FUZZ_FLAGS=(-max_len=4096 -rss_limit_mb=1024 -malloc_limit_mb=256 -print_final_stats=1
    -max_total_time="$MAX_SECONDS")

cargo fuzz --version >/dev/null 2>&1 || { echo "bench/fuzz.sh needs cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
cargo fuzz build "${BUILD_FLAGS[@]}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rows=""
total=0
crashes_total=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    # Crash, leak, timeout and out-of-memory inputs; not slow-unit-* (a slow unit is no failure).
    failures() { find "artifacts/$1" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l; }
    before=$(failures "$t")
    extra=()
    [[ -n ${DICTS[$t]:-} ]] && extra+=("-dict=${DICTS[$t]}")
    echo "== fuzz $t for $RUNS runs"
    start=$(date +%s.%N)
    rc=0
    # shellcheck disable=SC2086  # SEEDS holds zero or one directory
    nice -n 10 cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" ${SEEDS[$t]:-} -- \
        -runs="$RUNS" "${FUZZ_FLAGS[@]}" "${extra[@]}" >"$WORK/$t.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$WORK/$t.log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=$(($(failures "$t") - before))
    [[ $rc -ne 0 && $crashes -eq 0 ]] && crashes=1 # died without an artifact (e.g. killed)
    secs=$(python3 -c "print(f'{$end - $start:.0f}')")
    echo "$t: executions=${execs:-?} exec_per_s=${rate:-?} seconds=$secs corpus=$corpus crashes=$crashes rc=$rc"
    [[ $rc -ne 0 ]] && tail -n 30 "$WORK/$t.log"
    rows+="| $t | ${execs:-?} | ${rate:-?} | $secs | $corpus | $crashes |"$'\n'
    total=$((total + ${execs:-0}))
    crashes_total=$((crashes_total + crashes))
done
final="fuzz: ${#TARGETS[@]} targets, $total executions, $crashes_total crashes"
ROWS=$rows FINAL=$final RUNS=$RUNS MAX_SECONDS=$MAX_SECONDS HOST="$(nproc) cores, $(cargo fuzz --version), $(rustc --version)" \
    python3 - <<'PY'
import os, re
rows, final = os.environ["ROWS"], os.environ["FINAL"]
cap = int(os.environ["MAX_SECONDS"])
capped = f" or {cap} s, whichever came first" if cap else ""
section = f"""<!-- BEGIN fuzz -->
## Fuzzing (bench/fuzz.sh)

Each cargo-fuzz target for {int(os.environ['RUNS']):,} executions{capped}, one after the other,
on the stable toolchain with `RUSTC_BOOTSTRAP=1`, AddressSanitizer and debug assertions (`-a`):
`{"MAX_SECONDS=%d " % cap if cap else ""}bench/fuzz.sh {os.environ['RUNS']}`. Machine: {os.environ['HOST']}. Corpus = files in
fuzz/corpus/TARGET after the run (it persists between runs); crashes = new crash, leak,
timeout or oom files in fuzz/artifacts/TARGET.

| target | executions | exec/s | seconds | corpus | crashes |
|---|---:|---:|---:|---:|---:|
{rows.rstrip()}

`{final}`
<!-- END fuzz -->"""
path = os.path.join(os.environ["ROOT"], "bench/RESULTS.md")
text = open(path).read() if os.path.exists(path) else ""
m = re.search(r"<!-- BEGIN fuzz -->.*?<!-- END fuzz -->", text, re.S)
if m:
    text = text[:m.start()] + section + text[m.end():]
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
echo "(written to bench/RESULTS.md between the fuzz markers)"
echo "$final"
[[ $crashes_total -eq 0 ]]
