#!/usr/bin/env bash
# Seeded simulation at scale: `kiln sim` over COUNT consecutive seeds (default 100,000), spread
# over THREADS threads, each seed a fresh simulated machine (faulty devices, random workload,
# 1-2 crashes, reference-model check after every recovery). Failing seeds print their replay
# command (`kiln sim --seed N --steps M ...`); the last line is `seeds=N failures=F`.
#
#   bench/sim.sh [COUNT]    env: START (first seed, default 1), STEPS (default 30),
#                           THREADS (default: all cores), SIM_ARGS (more `kiln sim` flags,
#                           e.g. --no-misdirect), KILN (binary, default target/release/kiln)
#
# Runs under nice(1) so it can share a machine. A seed takes about 10 ms of CPU (100,000: about 16 min).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-${COUNT:-100000}}
START=${START:-1}
STEPS=${STEPS:-30}
THREADS=${THREADS:-$(nproc)}
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
echo "sim.sh: seeds $START..$((START + COUNT - 1)), $STEPS steps, $THREADS threads ${SIM_ARGS:-}"
# shellcheck disable=SC2086 # SIM_ARGS is a list of flags
nice -n 10 "$KILN" sim --seed "$START" --seeds "$COUNT" --steps "$STEPS" --threads "$THREADS" \
    ${SIM_ARGS:-}
