#!/usr/bin/env bash
# Crash during migration (the same test as tests/migrate_live.rs, with a configurable trial
# count). An aggressive policy (200 ms windows, 64 KiB partitions, 1 window of residence, no
# hysteresis, 100% migration bandwidth) on a 128 MiB fast tier; 256 MiB prefilled with crc32c
# verify headers (the first ~64 MiB land on the fast tier); then fio writes 4 KiB random blocks
# over a 64 MiB region on the capacity tier (it heats up and gets promoted, the prefill gets
# demoted) with --verify_state_save=1. The server is SIGKILLed while migration_get_status
# shows a migration in flight (or one just completed), a random 0-200 ms later. After a
# restart, the prefill and the hot job are verified (`--verify_only`); a hot-job block that
# fails counts only if fio saw its write acknowledged (fio also checks a few writes that were
# in flight at the kill; see tests/crash.rs).
#
#   bench/migrate-crash.sh [TRIALS]     default 30; env SEED replays a run, KEEP=1 keeps the dirs
#
# Needs: fio (nbd engine), curl, python3; builds target/release/kiln if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-${TRIALS:-30}}
SEED=${SEED:-$(( $(date +%s%N) % 1000000007 ))}
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
for t in fio curl python3; do command -v "$t" >/dev/null || { echo "migrate-crash.sh: needs $t" >&2; exit 2; }; done
KILN=$(realpath "$KILN")
echo "migrate-crash.sh: $TRIALS trials, seed $SEED (replay with SEED=$SEED)"
RANDOM=$SEED

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=
cleanup() { [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null; true; }
trap cleanup EXIT

start_server() { # dir
    "$KILN" serve --config "$1/kiln.toml" >>"$1/kiln.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        if "$KILN" rpc kiln_get_version -s "$1/kiln.sock" --timeout 2 >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died:"; cat "$1/kiln.log"; exit 1; }
        sleep 0.05
    done
    echo "server not ready"; exit 1
}

writes_acked() { # metrics port
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk '/^kiln_io_total\{/ && /op="write"/ && /volume="vol0"/ {print int($2); f=1} END {if (!f) print 0}'
}

# "in_flight completed promotions demotions"
mstatus() {
    "$KILN" rpc migration_get_status -s "$1/kiln.sock" --timeout 2 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["in_flight"], j["completed"], j["promotions"], j["demotions"])' 2>/dev/null ||
        echo "0 0 0 0"
}

fio_json() { sed -n '/^{/,$p' "$1"; }

fail=0
for n in $(seq 0 $((TRIALS - 1))); do
    dir=$(mktemp -d /tmp/kiln-mcrash-XXXXXX)
    mport=$(free_port)
    cat >"$dir/kiln.toml" <<EOF
[[tier]]
name = "fast"
device = "file:$dir/fast.img?size=128MiB"
capacity = "128MiB"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "capacity"
device = "file:$dir/capacity.img?size=1GiB"
capacity = "1GiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 200

[[volume]]
name = "vol0"
size = "512MiB"

[nbd]
listen = ["unix:$dir/nbd.sock"]

[rpc]
socket = "$dir/kiln.sock"

[metrics]
listen = "127.0.0.1:$mport"

[policy]
policy = "kiln"
interval_ms = 200
chunk_min = "64KiB"
min_residence_windows = 1
hysteresis = 0.0
migration_bandwidth_pct = 100
EOF
    delay_ms=$(( RANDOM % 200 ))
    fio_seed=$(( RANDOM * 32768 + RANDOM + 1 ))
    uri="--uri=nbd+unix:///vol0?socket=$dir/nbd.sock"
    pre=(--name=prefill --ioengine=nbd "$uri" --rw=write --bs=1m --iodepth=8 --offset=0 --size=256m
         --verify=crc32c)
    hot=(--name=hot --ioengine=nbd "$uri" --rw=randwrite --bs=4k --iodepth=16 --offset=256m
         --size=64m --verify=crc32c "--randseed=$fio_seed")
    start_server "$dir"
    t0=$(date +%s.%N)
    (cd "$dir" && fio --output-format=json "${pre[@]}" --do_verify=0 >prefill.out 2>prefill.err)
    (cd "$dir" && exec fio --output-format=json "${hot[@]}" --do_verify=0 --verify_state_save=1 \
        --write_lat_log=acked --log_offset=1 --rate_iops=4000 >write.out 2>write.err) &
    fio_pid=$!
    # Wait for the hot job's writes, then for a migration in flight or completing.
    base=
    seen=
    for _ in $(seq 4000); do
        kill -0 $fio_pid 2>/dev/null || break
        if [[ -z $base ]]; then
            (( $(writes_acked "$mport") > 456 )) && base=$(mstatus "$dir" | cut -d' ' -f2)
            sleep 0.005; continue
        fi
        read -r inflight completed prom dem < <(mstatus "$dir")
        if (( inflight > 0 || completed > base )); then
            seen="in_flight=$inflight completed=$completed promotions=$prom demotions=$dem"
            break
        fi
        sleep 0.005
    done
    sleep "$(printf '0.%03d' "$delay_ms")"
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    wait $fio_pid || true   # the write phase fails when the server dies; expected
    start_server "$dir"
    rc=0
    (cd "$dir" && fio --output-format=json "${pre[@]}" --verify_only >verify-prefill.out \
        2>verify-prefill.err) || rc=$?
    (cd "$dir" && fio --output-format=json "${hot[@]}" --verify_only --verify_state_load=1 \
        --verify_state_save=0 >verify.out 2>verify.err) || true
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
    # lost = blocks that failed verify although fio saw their write acknowledged.
    read -r verified bad lost acked < <(python3 - "$dir" <<'EOF'
import json, re, sys
d = sys.argv[1]
acked = set()
try:
    for l in open(f"{d}/acked_clat.1.log"):
        f = [x.strip() for x in l.split(",")]
        if len(f) >= 5 and f[2] == "1":
            acked.add(int(f[4]))
except OSError:
    pass
err = open(f"{d}/verify.err").read()
bad = [int(m) for m in re.findall(r"requested block: offset=(\d+)", err)]
try:
    t = open(f"{d}/verify.out").read()
    verified = json.loads(t[t.index("{"):])["jobs"][0]["read"]["total_ios"]
except Exception:
    verified = "?"
print(verified, len(bad), sum(1 for b in bad if b in acked), len(acked))
EOF
)
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    status=ok
    if [[ -z $seen ]]; then status="FAILED (no migration seen)"; fi
    if (( rc != 0 )) || (( lost > 0 )) || (( bad > 16 )) || [[ $verified == "?" ]]; then
        status=FAILED
    fi
    [[ $status != ok ]] && fail=$((fail + 1))
    printf 'trial %d: killed %d ms after %s; %s acked, %s verified, %s failed verify (%s of them acked), prefill verify rc %d, %.1fs: %s\n' \
        "$n" "$delay_ms" "${seen:-nothing}" "$acked" "$verified" "$bad" "$lost" "$rc" "$secs" "$status"
    if [[ $status != ok ]]; then
        head -5 "$dir/verify.err" "$dir/verify-prefill.err"; echo "kept $dir"
    elif [[ -z ${KEEP:-} ]]; then
        rm -rf "$dir"
    fi
done
echo "migrate-crash.sh: $((TRIALS - fail))/$TRIALS trials passed (seed $SEED)"
(( fail == 0 ))
