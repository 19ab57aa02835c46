#!/usr/bin/env bash
# Soak: fio verify through NBD and NVMe/TCP at once, policy migrations running, and a
# fault injector on the capacity tier, with the kiln process's RSS sampled each minute.
#
#   bench/soak.sh [--quick] [DURATION_S]      default 600 s; --quick: 60 s
#   env: KILN=target/release/kiln, FAULT_RATE=0.0002 (per capacity-leg I/O), SEED=1,
#        NICE=10, KEEP=1 (keep the work dir), SKIP_BUILD=1 (use the built kiln and
#        libkiln_fio.so as they are)
#
# `kiln serve` with two tiers:
#   fast      file, 256 MiB (64 MiB of it metadata)
#   capacity  mirror:error:RATE,SEED:file:capA|file:capB (640 MiB legs). An EIO on the
#             error leg faults that leg and the mirror serves from the other, so faults are
#             injected without losing acknowledged data; every FAULT_CHECK_S the script
#             replaces a faulted leg with a fresh error-wrapped file (new seed) through
#             `bdev_mirror_replace`, so faults keep coming for the whole run.
# and an aggressive policy (200 ms windows, 64 KiB chunks, no hysteresis), so data moves
# between the tiers all the time. Volume vol0 (384 MiB) is the NBD export; vol1 (384 MiB)
# is namespace 1 of subsystem nqn.2024-01.io.kiln.soak on NVMe/TCP. Both volumes together
# are larger than the fast tier.
#
# Each side runs fio in a loop until the time is up: 64 KiB random writes over 256 MiB with
# crc32c headers, then a verify pass of all of it (`--do_verify=1`), a new --randseed per
# pass. NBD: fio's nbd engine (libnbd). NVMe/TCP: kiln's fio engine (libkiln_fio.so,
# `--filename=nvmf://...`, built with ci/fio-headers.sh).
#
# Prints the RSS samples and ends with one line:
#   mismatches=N rss_growth_pct=X duration_s=T
# (mismatches: fio verify errors plus any fio job error; rss_growth_pct: the largest RSS
# sample after the first minute against the first-minute sample). Writes bench/RESULTS.md
# between <!-- BEGIN soak --> and <!-- END soak --> when the run is the full 600 s one or
# RESULTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=600
QUICK=0
for a in "$@"; do
    case $a in
    --quick) QUICK=1; DURATION=60 ;;
    [0-9]*) DURATION=$a ;;
    *) echo "usage: bench/soak.sh [--quick] [DURATION_S]" >&2; exit 2 ;;
    esac
done
KILN=${KILN:-target/release/kiln}
FAULT_RATE=${FAULT_RATE:-0.0002}
SEED=${SEED:-1}
NICE=${NICE:-10}
# RSS every minute (every quarter of the run when it is shorter than 4 minutes).
SAMPLE_S=$((DURATION >= 240 ? 60 : DURATION / 4))
FAULT_CHECK_S=5
for t in fio python3 nbdinfo; do
    command -v "$t" >/dev/null || { echo "soak.sh: needs $t" >&2; exit 2; }
done
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    nice -n "$NICE" cargo build --release -q --bin kiln
    ci/fio-headers.sh >&2
    nice -n "$NICE" cargo build --release -q -p kiln-fio
fi
SO=$ROOT/target/release/libkiln_fio.so
grep -q get_ioengine "$SO" || { echo "soak.sh: $SO was built without the fio engine" >&2; exit 2; }
KILN=$(realpath "$KILN")
WORK=$(mktemp -d /tmp/kiln-soak-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ ${KEEP:-0} != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NBD_PORT=$(free_port)
NVMF_PORT=$(free_port)
NQN=nqn.2024-01.io.kiln.soak
LEG=640MiB
cat >"$WORK/kiln.toml" <<EOF
[[tier]]
name = "fast"
device = "file:$WORK/fast.img?size=256MiB"
capacity = "256MiB"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "capacity"
device = "mirror:error:$FAULT_RATE,$SEED,enabled=0:file:$WORK/capA0.img?size=$LEG|file:$WORK/capB.img?size=$LEG"
capacity = "512MiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 200

[[volume]]
name = "vol0"
size = "384MiB"

[[volume]]
name = "vol1"
size = "384MiB"

[nbd]
listen = ["127.0.0.1:$NBD_PORT"]

[[subsystem]]
nqn = "$NQN"
namespaces = ["vol1"]
listeners = ["127.0.0.1:$NVMF_PORT"]
allow_any_host = true

[rpc]
socket = "$WORK/kiln.sock"

[reactor]
cores = [0]
poll_mode = "adaptive"

[policy]
policy = "kiln"
interval_ms = 200
chunk_min = "64KiB"
min_residence_windows = 1
hysteresis = 0.0
migration_bandwidth_pct = 100
EOF
rpc() { "$KILN" rpc -s "$WORK/kiln.sock" "$@"; }

nice -n "$NICE" "$KILN" serve --config "$WORK/kiln.toml" >"$WORK/kiln.log" 2>&1 &
KPID=$!
PIDS+=("$KPID")
for _ in $(seq 200); do
    rpc volume_list >/dev/null 2>&1 && break
    kill -0 "$KPID" 2>/dev/null || { cat "$WORK/kiln.log" >&2; exit 1; }
    sleep 0.1
done
rpc volume_list >/dev/null
# Faults start once the server is up (an EIO while opening the mirror would stop it).
rpc bdev_error_inject '{"name":"capA0.img","enable":true}' >/dev/null
START=$(date +%s)
END=$((START + DURATION))
# One fio side: write+verify passes until END. Each pass's JSON lands in $WORK/NAME.N.json.
fio_loop() {
    local name=$1; shift
    local n=0
    while (($(date +%s) < END)); do
        n=$((n + 1))
        (cd "$WORK" && nice -n "$NICE" fio --name="$name" "$@" --rw=randwrite --bs=64k \
            --size=256m --iodepth=16 --verify=crc32c --do_verify=1 --randseed=$((SEED * 1000 + n)) \
            --output-format=json --output="$WORK/$name.$n.json") >"$WORK/$name.$n.log" 2>&1 || true
    done
}
NVMF_FILE="nvmf://127.0.0.1:$NVMF_PORT/$NQN/1"
fio_loop nbd --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/vol0" &
PIDS+=("$!")
fio_loop nvmf --thread --ioengine="external:$SO" --filename="${NVMF_FILE//:/\\:}" &
PIDS+=("$!")

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$KPID/status"; }
: >"$WORK/rss.txt"
leg_no=0
armed=1
next_sample=$((START + SAMPLE_S))
next_fault_check=$((START + FAULT_CHECK_S))
while (($(date +%s) < END)); do
    sleep 1
    kill -0 "$KPID" 2>/dev/null || { echo "soak.sh: kiln died" >&2; tail -20 "$WORK/kiln.log" >&2; exit 1; }
    now=$(date +%s)
    if ((now >= next_sample)); then
        next_sample=$((next_sample + SAMPLE_S))
        echo "$((now - START)) $(rss_kib)" | tee -a "$WORK/rss.txt" >&2
    fi
    ((now >= next_fault_check)) || continue
    next_fault_check=$((now + FAULT_CHECK_S))
    # Keep faults coming: a faulted error leg is replaced by a fresh one (new seed, faults
    # off while it resyncs), and its faults are switched on once it is in sync.
    st=$(rpc bdev_mirror_get_status '{"tier":"capacity"}')
    state0=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["states"][0])' "$st")
    if [[ $state0 == faulted ]]; then
        leg_no=$((leg_no + 1))
        spec="error:$FAULT_RATE,$((SEED * 100 + leg_no)),enabled=0:file:$WORK/capA$leg_no.img?size=$LEG"
        rpc bdev_mirror_replace "{\"tier\":\"capacity\",\"leg\":0,\"resync_mib_s\":200,\"spec\":\"$spec\"}" >/dev/null
        echo "$((now - START))s: leg 0 faulted: replaced by capA$leg_no.img" >&2
        rm -f "$WORK/capA$((leg_no - 1)).img"
        armed=0
    elif [[ $state0 == in_sync && $armed == 0 ]]; then
        rpc bdev_error_inject "{\"name\":\"capA$leg_no.img\",\"enable\":true}" >/dev/null
        echo "$((now - START))s: capA$leg_no.img in sync: faults on" >&2
        armed=1
    fi
done
# Let the passes in progress finish (they verify what they wrote), then stop.
for p in "${PIDS[@]:1}"; do wait "$p" || true; done
rpc migration_get_status >"$WORK/migration.json"
rpc bdev_mirror_get_status '{"tier":"capacity"}' >"$WORK/mirror.json"
ELAPSED=$(($(date +%s) - START))

python3 - "$WORK" "$DURATION" "$ELAPSED" "$FAULT_RATE" "$SEED" "$leg_no" "$QUICK" "${RESULTS:-}" <<'PY'
import glob, json, os, re, sys
work, duration, elapsed, rate, seed, replaced, quick, results = sys.argv[1:]
def passes(name):
    out = []
    for f in sorted(glob.glob(f"{work}/{name}.*.json"), key=lambda p: int(p.split(".")[-2])):
        text = open(f).read()
        try:
            j = json.loads(text[text.index("{"):])
        except ValueError:
            log = open(f[:-5] + ".log").read()
            out.append({"error": 1, "verify": 1, "log": log[-400:], "w": 0, "r": 0})
            continue
        job = j["jobs"][0]
        log = open(f[:-5] + ".log").read()
        # The same filter as tests/common FioRun::verify_errors.
        verify = sum(1 for l in log.lower().splitlines()
                     if "verify" in l and ("bad" in l or "fail" in l)
                     or "crc32c" in l and ("wanted" in l or "mismatch" in l or "bad" in l))
        out.append({"error": job["error"], "verify": verify, "w": job["write"]["total_ios"],
                    "r": job["read"]["total_ios"], "log": log[-400:]})
    return out
sides = {"nbd": passes("nbd"), "nvmf": passes("nvmf")}
mismatches = 0
for name, ps in sides.items():
    for p in ps:
        mismatches += p["verify"] + (1 if p["error"] else 0)
        if p["error"] or p["verify"]:
            print(f"{name}: error {p['error']}, verify {p['verify']}: {p['log']}", file=sys.stderr)
rss = [tuple(map(int, l.split())) for l in open(f"{work}/rss.txt") if l.strip()]
first = rss[0][1]
growth = (max(r for _, r in rss[1:]) - first) * 100.0 / first if len(rss) > 1 else 0.0
mig = json.load(open(f"{work}/migration.json"))
mirror = json.load(open(f"{work}/mirror.json"))
def stat(d, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d:
            return d[k]
    return "?"
lines = [
    f"Generated by `bench/soak.sh{' --quick' if quick == '1' else ''}` ({elapsed} s, FAULT_RATE={rate}, SEED={seed}) on a shared 2-core machine, kiln and fio at nice 10, one adaptive reactor.",
    "",
    "| side | fio passes (write 256 MiB + verify) | writes | verify reads | errors | mismatches |",
    "|---|---|---|---|---|---|",
]
for name, ps in sides.items():
    lines.append(f"| {name} | {len(ps)} | {sum(p['w'] for p in ps)} | {sum(p['r'] for p in ps)} | "
                 f"{sum(1 for p in ps if p['error'])} | {sum(p['verify'] for p in ps)} |")
lines += ["",
          f"- RSS (KiB) by second: {', '.join(f'{t}s {r}' for t, r in rss)}; growth after the first sample: {growth:.1f}%.",
          f"- migrations: {mig['completed']} completed, {mig['failed']} failed, {mig['bytes_moved'] / 2**30:.1f} GiB moved (policy counters: promotions={mig['promotions']} demotions={mig['demotions']}).",
          f"- faults: {mirror['failovers']} capacity-leg faults (mirror failovers, each an injected EIO), {mirror['read_retries']} reads retried on the other leg; the faulted error leg was replaced {replaced} times.",
          f"- capacity mirror at the end: {json.dumps(mirror, sort_keys=True)[:400]}",
          ""]
text = "\n".join(lines)
print(text)
if results == "1" or (quick != "1" and int(duration) >= 600):
    path = "bench/RESULTS.md"
    cur = open(path).read()
    b, e = "<!-- BEGIN soak -->", "<!-- END soak -->"
    block = b + "\n## Soak (issue 10, acceptance 6)\n\n" + text + "\n" + e
    if b in cur:
        cur = re.sub(re.escape(b) + ".*?" + re.escape(e), lambda m: block, cur, flags=re.S)
    else:
        cur = cur.rstrip() + "\n\n" + block + "\n"
    open(path, "w").write(cur)
print(f"mismatches={mismatches} rss_growth_pct={growth:.1f} duration_s={elapsed}")
PY
