#!/usr/bin/env bash
# Crash-consistency trials (the same test as tests/crash.rs, with a configurable trial count):
# fio writes 4 KiB random blocks with crc32c verify headers over NBD (unix socket) and saves its
# verify state; the server is killed with SIGKILL once it has acknowledged a random number of
# writes; after a restart `fio --verify_only --verify_state_load=1` must find every write fio
# saw acknowledged intact.
#
# fio 3.33's verify state assumes the writes in flight at the crash were among the last
# iodepth issued; kiln may answer out of order, so fio can also verify a few writes that were
# never acknowledged (they were in flight when the server died). The write phase keeps a
# completion log (--write_lat_log --log_offset=1: one line per acknowledged write) and a verify
# failure counts only if its block is in that log; at most iodepth unacknowledged failures are
# tolerated and reported.
#
#   bench/crash.sh [TRIALS]          default 10; env SEED replays a run, KEEP=1 keeps the dirs
#
# Needs: fio (nbd engine), curl, python3; builds target/release/kiln if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-${TRIALS:-10}}
SEED=${SEED:-$(( $(date +%s%N) % 1000000007 ))}
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
for t in fio curl; do command -v "$t" >/dev/null || { echo "crash.sh: needs $t" >&2; exit 2; }; done
KILN=$(realpath "$KILN")
echo "crash.sh: $TRIALS trials, seed $SEED (replay with SEED=$SEED)"
RANDOM=$SEED

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=
cleanup() { [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null; true; }
trap cleanup EXIT

start_server() { # dir
    NO_COLOR=1 "$KILN" serve --config "$1/kiln.toml" >>"$1/kiln.log" 2>&1 &
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

fio_json() { sed -n '/^{/,$p' "$1"; }

fail=0
for n in $(seq 0 $((TRIALS - 1))); do
    dir=$(mktemp -d /tmp/kiln-crashsh-XXXXXX)
    mport=$(free_port)
    cat >"$dir/kiln.toml" <<EOF
[[tier]]
name = "fast"
device = "file:$dir/fast.img?size=192MiB"
capacity = "192MiB"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "capacity"
device = "file:$dir/capacity.img?size=512MiB"
capacity = "512MiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 200

[[volume]]
name = "vol0"
size = "256MiB"

[nbd]
listen = ["unix:$dir/nbd.sock"]

[rpc]
socket = "$dir/kiln.sock"

[metrics]
listen = "127.0.0.1:$mport"
EOF
    kill_after=$(( (RANDOM * 32768 + RANDOM) % (16384 - 1064) + 64 ))
    fio_seed=$(( RANDOM * 32768 + RANDOM + 1 ))
    job=(--name=crash --ioengine=nbd "--uri=nbd+unix:///vol0?socket=$dir/nbd.sock"
         --rw=randwrite --bs=4k --iodepth=16 --size=64m --verify=crc32c "--randseed=$fio_seed")
    start_server "$dir"
    t0=$(date +%s.%N)
    (cd "$dir" && exec fio --output-format=json "${job[@]}" --do_verify=0 --verify_state_save=1 \
        --write_lat_log=acked --log_offset=1 >write.out 2>write.err) &
    fio_pid=$!
    acked=0
    for _ in $(seq 6000); do
        acked=$(writes_acked "$mport")
        (( acked >= kill_after )) && break
        kill -0 $fio_pid 2>/dev/null || break
        sleep 0.005
    done
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    wait $fio_pid || true   # the write phase fails when the server dies; expected
    cp "$dir/local-crash-0-verify.state" "$dir/write-phase.state" 2>/dev/null || true
    written=$(fio_json "$dir/write.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["total_ios"])' 2>/dev/null || echo "?")
    start_server "$dir"
    rc=0
    (cd "$dir" && fio --output-format=json "${job[@]}" --verify_only --verify_state_load=1 \
        --verify_state_save=0 >verify.out 2>verify.err) || rc=$?
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
    # verdict: failures on acknowledged blocks, tolerated failures on unacknowledged ones
    read -r err verified lost tolerated < <(python3 - "$dir" <<'PY' || echo "? ? ? ?"
import json, re, sys
d = sys.argv[1]
acked = {int(f[4]) for f in (l.split(",") for l in open(f"{d}/acked_clat.1.log")) if len(f) >= 5 and f[2].strip() == "1"}
bad = [int(x) for x in re.findall(r"requested block: offset=(\d+)", open(f"{d}/verify.err").read())]
out = open(f"{d}/verify.out").read()
j = json.loads(out[out.index("\n{") + 1:])["jobs"][0]
lost = [b for b in bad if b in acked]
print(j["error"], j["read"]["total_ios"], len(lost), len(bad) - len(lost))
PY
)
    replayed=$(grep -o "journal open.*replayed=[0-9]*" "$dir/kiln.log" | tail -1 | grep -o "replayed=[0-9]*" || true)
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    status=ok
    if [[ $lost != 0 ]] || [[ $tolerated == "?" ]] || (( tolerated > 16 )) ||
        { [[ $tolerated == 0 ]] && { (( rc != 0 )) || [[ $err != 0 ]]; }; }; then
        status=FAILED; fail=$((fail + 1))
    fi
    printf 'trial %d: kill after %d writes (%d acked): fio issued %s, verified %s, lost acked writes %s, unacked in-flight blocks failing verify %s (tolerated), %s, %.1fs: %s\n' \
        "$n" "$kill_after" "$acked" "$written" "$verified" "$lost" "$tolerated" "$replayed" "$secs" "$status"
    if [[ $status == FAILED ]]; then
        head -5 "$dir/verify.err"; echo "kept $dir"
    elif [[ -z ${KEEP:-} ]]; then
        rm -rf "$dir"
    fi
done
echo "crash.sh: $((TRIALS - fail))/$TRIALS trials passed (seed $SEED)"
(( fail == 0 ))
