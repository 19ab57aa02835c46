#!/usr/bin/env bash
# Live whole-volume migration: a volume on a `delay`-wrapped source tier (2 ms, 100 MiB/s: an
# emulated HDD) moves to a new fast file device (`volume_migrate`) while fio reads it through
# NBD (4 KiB zipf:1.2 random reads, QD8). The same harness runs three chunking modes on copies
# of one prefilled image:
#
#   naive     fixed 1 MiB chunks in LBA order (what dd or a simple mirror does)
#   fixed     fixed 8 MiB chunks in LBA order, no prefetch
#   adaptive  kiln: heat-adaptive chunks (64 KiB hot .. 64 MiB cold) + prefetch queue
#
# and reports, per mode: the time until 90% of the foreground reads (per 250 ms sample, from
# kiln_tier_io_total) are served by the destination, foreground read p99 during the move
# (fio latency log restricted to the move), and the total move time. Then:
#
#   copy rate  adaptive move with no load between two plain files vs a raw fio copy of the
#              same size between the same kind of files (128 KiB io_uring direct, read then
#              write): rate = bytes / (t_read + t_write)
#   integrity  fio randwrite verify=crc32c (VOL written) through the whole move, then a read
#              verify pass; and TRIALS kill -9 trials: SIGKILL at a random point of the move
#              (zipf reads running), restart, the move resumes from the journal, then the
#              prefill is verified (--verify_only) over the whole volume
#
# Last line: hot_first_speedup=X p99_ratio_vs_naive=Y time_ratio_vs_naive=Z mismatches=N
#   (speedup and ratios: adaptive against naive).
#
#   bench/volume-migrate.sh [--quick]    4 GiB volume, 10 kill trials (--quick: 1 GiB, 3)
#   env: KEEP=1 keeps the work dir, OUT=DIR chooses it, CORE=N the reactor core (default 1),
#        ONLY=modes,copy,integrity runs only those sections (default: all three)
#
# Needs: fio (nbd, io_uring engines), curl, python3; builds target/release/kiln if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
VOL_GIB=$((QUICK ? 1 : 4))
TRIALS=${TRIALS:-$((QUICK ? 3 : 10))}
SEED=${SEED:-$(( $(date +%s%N) % 1000000007 ))}
RANDOM=$SEED
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
for t in fio curl python3; do command -v "$t" >/dev/null || { echo "volume-migrate.sh: needs $t" >&2; exit 2; }; done
KILN=$(realpath "$KILN")
OUT=${OUT:-$(mktemp -d /tmp/kiln-volmig-XXXXXX)}
mkdir -p "$OUT"
CORE=${CORE:-1}
ONLY=${ONLY:-modes,copy,integrity}
want() { [[ ,$ONLY, == *,$1,* ]]; }
echo "volume-migrate.sh: work dir $OUT, ${VOL_GIB} GiB volume, $TRIALS kill trials, seed $SEED"

SERVER_PID=
FIO_PID=
POLL_PID=
cleanup() {
    [[ -n $POLL_PID ]] && kill "$POLL_PID" 2>/dev/null
    [[ -n $FIO_PID ]] && kill -9 "$FIO_PID" 2>/dev/null
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null
    [[ -z ${KEEP:-} ]] && rm -rf "$OUT"
    true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

write_config() { # dir source-device-spec
    local d=$1
    MPORT=$(free_port)
    cat >"$d/kiln.toml" <<EOF
# The metadata tier holds the journal only (64 MiB + one 1 MiB chunk); the volume lives on "src".
[[tier]]
name = "meta"
device = "file:$d/meta.img?size=65MiB"
capacity = "65MiB"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "src"
device = "$2"
capacity = "$((VOL_GIB + 1))GiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 100

[[volume]]
name = "vol0"
size = "${VOL_GIB}GiB"

[policy]
policy = "static"

[nbd]
listen = ["unix:$d/nbd.sock"]

[rpc]
socket = "$d/kiln.sock"

[metrics]
listen = "127.0.0.1:$MPORT"

[reactor]
cores = [$CORE]
poll_mode = "adaptive"
EOF
}

start_server() { # dir
    "$KILN" serve --config "$1/kiln.toml" >>"$1/kiln.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1200); do
        if "$KILN" rpc kiln_get_version -s "$1/kiln.sock" --timeout 2 >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died:"; cat "$1/kiln.log"; exit 1; }
        sleep 0.05
    done
    echo "server not ready"; exit 1
}

stop_server() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }

rpc() { "$KILN" rpc "$@" -s "$dir/kiln.sock" --timeout 30; }
URI() { echo "nbd+unix:///vol0?socket=$dir/nbd.sock"; }
fio_json() { sed -n '/^{/,$p' "$1"; }
# Prefill layout: sequential 1 MiB writes with crc32c headers over the whole volume.
PREFILL=(--name=prefill --ioengine=nbd --rw=write --bs=1m --iodepth=8 --size=${VOL_GIB}g
         --verify=crc32c)

wait_done() { # -> prints the final status JSON
    for _ in $(seq 12000); do
        local st
        st=$(rpc volume_migrate_status '{"volume":"vol0"}')
        case $(python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' <<<"$st") in
            done) echo "$st"; return 0 ;;
            failed|interrupted) echo "move failed: $st" >&2; tail -20 "$dir/kiln.log" >&2; exit 1 ;;
        esac
        sleep 0.1
    done
    echo "move did not finish" >&2; exit 1
}

# Reads per tier every 250 ms: unix_ms total_reads destination_reads
poll_tiers() {
    while sleep 0.25; do
        curl -s "http://127.0.0.1:$MPORT/metrics" | python3 -c '
import sys, time, re
tot = dst = 0.0
for l in sys.stdin:
    m = re.match(r"kiln_tier_io_total\{tier=\"([^\"]+)\",op=\"read\"\} (\S+)", l)
    if m:
        tot += float(m.group(2))
        if m.group(1) == "dst":
            dst += float(m.group(2))
print(int(time.time() * 1000), int(tot), int(dst))' >>"$dir/tiers.log" 2>/dev/null || true
    done
}

# --- the prefilled template -------------------------------------------------------------
tmpl=$OUT/template
mkdir -p "$tmpl"
dir=$tmpl
write_config "$tmpl" "delay:2000,2000,100:file:$tmpl/src.img?size=$((VOL_GIB + 1))GiB"
start_server "$tmpl"
t0=$(date +%s)
(cd "$tmpl" && fio --output-format=json "${PREFILL[@]}" "--uri=$(URI)" --do_verify=0 >prefill.out 2>prefill.err)
stop_server
echo "prefill: ${VOL_GIB} GiB in $(( $(date +%s) - t0 )) s"

# A fresh server directory from the template; $2 = source spec (delayed unless "plain").
fresh() { # name [plain]
    dir=$OUT/$1
    rm -rf "$dir"; mkdir -p "$dir"
    cp --sparse=always "$tmpl/meta.img" "$tmpl/src.img" "$dir/"
    if [[ ${2:-} == plain ]]; then
        write_config "$dir" "file:$dir/src.img?size=$((VOL_GIB + 1))GiB"
    else
        write_config "$dir" "delay:2000,2000,100:file:$dir/src.img?size=$((VOL_GIB + 1))GiB"
    fi
    start_server "$dir"
}

migrate() { # mode
    rpc volume_migrate "{\"volume\":\"vol0\",\"destination\":\"file:$dir/dst.img?size=$((VOL_GIB + 1))GiB\",\"name\":\"dst\",\"mode\":\"$1\"}" >/dev/null
}

verify_prefill() { # -> prints mismatches
    (cd "$dir" && fio --output-format=json "${PREFILL[@]}" "--uri=$(URI)" --verify_only \
        >verify.out 2>verify.err) || true
    local bad
    bad=$(grep -c "verify: bad\|crc32c: verify failed\|bad magic" "$dir/verify.err" || true)
    if ! fio_json "$dir/verify.out" | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; sys.exit(0 if j["error"]==0 and j["read"]["total_ios"]>0 else 1)' 2>/dev/null; then
        bad=$((bad + 1))
    fi
    echo "$bad"
}

# --- 1. the three modes under zipf reads ------------------------------------------------
if want modes; then
declare -A HOT P99 TOTAL
for mode in naive fixed adaptive; do
    fresh "$mode"
    : >"$dir/tiers.log"
    poll_tiers & POLL_PID=$!
    (cd "$dir" && exec fio --thread --output-format=json --name=zipf --ioengine=nbd "--uri=$(URI)" \
        --rw=randread --bs=4k --iodepth=8 --size=${VOL_GIB}g --random_distribution=zipf:1.2 \
        --norandommap --randrepeat=0 --time_based --runtime=3600 \
        --write_lat_log=lat --log_avg_msec=0 --log_unix_epoch=1 >fio.out 2>fio.err) & FIO_PID=$!
    sleep 3
    start_ms=$(date +%s%3N)
    migrate "$mode"
    st=$(wait_done)
    end_ms=$(date +%s%3N)
    sleep 0.5
    kill "$POLL_PID" 2>/dev/null; wait "$POLL_PID" 2>/dev/null || true; POLL_PID=
    kill -INT "$FIO_PID" 2>/dev/null; wait "$FIO_PID" 2>/dev/null || true; FIO_PID=
    read -r hot p99 total < <(ST=$st python3 - "$dir" "$start_ms" "$end_ms" <<'EOF'
import json, sys, glob, os
d, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
st = json.loads(os.environ["ST"])
# First 250 ms sample after the start in which >= 90% of the reads went to the destination.
rows = [tuple(map(int, l.split())) for l in open(f"{d}/tiers.log") if len(l.split()) == 3]
hot = None
for (t0, a0, b0), (t1, a1, b1) in zip(rows, rows[1:]):
    if t1 <= start or a1 - a0 <= 0:
        continue
    if (b1 - b0) / (a1 - a0) >= 0.9:
        hot = (t1 - start) / 1000
        break
if hot is None:
    hot = (end - start) / 1000
# Foreground read p99 while the move ran (fio latency log: unix ms, ns).
lats = []
for f in glob.glob(f"{d}/lat_clat.*.log"):
    for l in open(f):
        p = l.split(",")
        t = int(p[0])
        if start <= t <= end:
            lats.append(int(p[1]))
lats.sort()
p99 = lats[int(len(lats) * 0.99)] / 1000 if lats else 0
print(f"{hot:.2f} {p99:.0f} {st['elapsed_s']:.2f}")
EOF
    )
    HOT[$mode]=$hot; P99[$mode]=$p99; TOTAL[$mode]=$total
    echo "$mode: 90% of reads from the destination after ${hot} s, read p99 ${p99} us during the move, move ${total} s ($(python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["chunks"], "chunks,", j["hot_chunks"], "hot")' <<<"$st"))"
    stop_server
    rm -f "$dir"/*.img "$dir"/lat_*.log
done

fi
# --- 2. copy rate with no load, plain files -------------------------------------------
if want copy; then
# The raw copy runs first, on its own copy of the same source image (synced, so O_DIRECT
# reads real blocks: after kiln's move the source is trimmed or deleted, and a read of holes
# costs no device time), then kiln moves the volume of a fresh server. The pair runs
# COPY_ROUNDS times (default 3) interleaved; the ratio is the median of the rounds' ratios
# (this virtual disk's throughput drifts by up to 1.5x between runs a minute apart).
# --fallocate=none: fio writes into a sparse file, as kiln's destination (`?size=` creates it
# with ftruncate); fio's default preallocation made its writes about 25% faster here.
raw() { # rw file
    fio --output-format=json --name=raw --ioengine=io_uring --direct=1 --bs=128k --iodepth=8 \
        --fallocate=none --rw="$1" --size=${VOL_GIB}g "--filename=$2" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
print(j["job_runtime"] / 1000)'
}
ratios=()
copy_rows=""
for round in $(seq "${COPY_ROUNDS:-3}"); do
    mkdir -p "$OUT/raw"
    cp --sparse=always "$tmpl/src.img" "$OUT/raw/src.img"
    sync
    t_read=$(raw read "$OUT/raw/src.img")
    t_write=$(raw write "$OUT/raw/dst.img")
    rm -rf "$OUT/raw"
    raw_rate=$(python3 -c "print(f'{$VOL_GIB * 1024 / ($t_read + $t_write):.0f}')")
    fresh rate plain
    sync
    migrate adaptive
    st=$(wait_done)
    kiln_rate=$(python3 -c "import json,sys; j=json.load(sys.stdin); print(f'{j[\"moved_bytes\"] / j[\"elapsed_s\"] / 2**20:.0f}')" <<<"$st")
    stop_server
    r=$(python3 -c "print(f'{$kiln_rate / $raw_rate:.2f}')")
    ratios+=("$r")
    copy_rows+="kiln ${kiln_rate} / raw ${raw_rate} MiB/s (read ${t_read} s + write ${t_write} s) = ${r}; "
    echo "copy rate, round $round: kiln ${kiln_rate} MiB/s, raw fio read ${t_read} s + write ${t_write} s = ${raw_rate} MiB/s, ratio $r"
    rm -f "$dir"/*.img
done
copy_ratio=$(printf '%s\n' "${ratios[@]}" | sort -n | python3 -c 'import sys; v=[float(x) for x in sys.stdin]; print(f"{v[len(v)//2]:.2f}")')
echo "copy rate: median ratio ${copy_ratio} over ${#ratios[@]} rounds"

fi
# --- 3. integrity: writes with verify through the whole move, then kill -9 trials ---------
mismatches=0
if want integrity; then
fresh integrity
(cd "$dir" && exec fio --output-format=json --name=verify --ioengine=nbd "--uri=$(URI)" \
    --rw=randwrite --bs=64k --iodepth=8 --size=${VOL_GIB}g --io_size=${VOL_GIB}g \
    --verify=crc32c --do_verify=1 --serialize_overlap=1 >vw.out 2>vw.err) & FIO_PID=$!
sleep 1
migrate adaptive
st=$(wait_done)
wait "$FIO_PID" || true; FIO_PID=
vw_bad=$(fio_json "$dir/vw.out" | python3 -c '
import json, sys
try:
    j = json.load(sys.stdin)["jobs"][0]
    print(0 if j["error"] == 0 and j["write"]["io_bytes"] > 0 else 1)
except Exception:
    print(1)')
vw_bad=$((vw_bad + $(grep -c "verify: bad\|verify failed\|bad magic" "$dir/vw.err" || true)))
echo "integrity: ${VOL_GIB} GiB written with crc32c verify during the move: $vw_bad mismatches (move $(python3 -c 'import json,sys; print(json.load(sys.stdin)["elapsed_s"])' <<<"$st") s)"
mismatches=$((mismatches + vw_bad))
stop_server
rm -f "$dir"/*.img

for trial in $(seq "$TRIALS"); do
    fresh "kill$trial"
    (cd "$dir" && exec fio --thread --output-format=json --name=zipf --ioengine=nbd "--uri=$(URI)" \
        --rw=randread --bs=4k --iodepth=8 --size=${VOL_GIB}g --random_distribution=zipf:1.2 \
        --norandommap --time_based --runtime=3600 >fio.out 2>fio.err) & FIO_PID=$!
    migrate adaptive
    frac=$(( RANDOM % 70 + 10 ))
    for _ in $(seq 6000); do
        pct=$(rpc volume_migrate_status '{"volume":"vol0"}' | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["done_bytes"] * 100 // max(j["total_bytes"], 1) if j["total_bytes"] else 0)')
        (( pct >= frac )) && break
        sleep 0.05
    done
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
    kill -9 "$FIO_PID" 2>/dev/null; wait "$FIO_PID" 2>/dev/null || true; FIO_PID=
    start_server "$dir"
    st=$(wait_done)
    resumed_at=$(python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["on_destination_at_start_bytes"] * 100 // j["total_bytes"], j["resumed"])' <<<"$st")
    bad=$(verify_prefill)
    echo "kill trial $trial: killed at >= ${frac}%, resumed at ${resumed_at% *}% (resumed=${resumed_at#* }), verify mismatches $bad"
    mismatches=$((mismatches + bad))
    stop_server
    rm -rf "$dir"
done

fi
# --- results ------------------------------------------------------------------------------
if [[ $ONLY != modes,copy,integrity ]]; then
    # A partial run: print what ran, leave RESULTS.md alone.
    want modes && echo "hot-first: naive ${HOT[naive]} s, fixed ${HOT[fixed]} s, adaptive ${HOT[adaptive]} s; p99 naive ${P99[naive]} us, adaptive ${P99[adaptive]} us; time naive ${TOTAL[naive]} s, adaptive ${TOTAL[adaptive]} s; hot_first_speedup=$(python3 -c "print(f'{${HOT[naive]} / max(${HOT[adaptive]}, 0.25):.2f}')")"
    want copy && echo "copy_ratio=${copy_ratio}"
    want integrity && echo "mismatches=${mismatches}"
    exit 0
fi
speedup=$(python3 -c "print(f'{${HOT[naive]} / max(${HOT[adaptive]}, 0.25):.2f}')")
p99_ratio=$(python3 -c "print(f'{${P99[adaptive]} / max(${P99[naive]}, 1):.2f}')")
time_ratio=$(python3 -c "print(f'{${TOTAL[adaptive]} / ${TOTAL[naive]}:.2f}')")
table=$(cat <<EOF
<!-- BEGIN volume-migrate -->
### Live whole-volume migration (\`bench/volume-migrate.sh$( ((QUICK)) && echo ' --quick')\`)

${VOL_GIB} GiB volume on \`delay:2000,2000,100\` (2 ms, 100 MiB/s) → new file device, fio 4 KiB
zipf:1.2 random reads QD8 through NBD, 1 reactor; $(date -u +%Y-%m-%d).

| mode | 90% of reads from destination (s) | read p99 during move (us) | move time (s) |
|---|---|---|---|
| naive (1 MiB sequential) | ${HOT[naive]} | ${P99[naive]} | ${TOTAL[naive]} |
| fixed (8 MiB sequential) | ${HOT[fixed]} | ${P99[fixed]} | ${TOTAL[fixed]} |
| adaptive (kiln) | ${HOT[adaptive]} | ${P99[adaptive]} | ${TOTAL[adaptive]} |

- hot-first speedup vs naive: **${speedup}x** (goal >= 3); p99 ratio vs naive **${p99_ratio}** (goal <= 1.0);
  time ratio vs naive **${time_ratio}** (goal <= 1.1)
- copy rate, no load, plain files, median of ${#ratios[@]} interleaved rounds: **${copy_ratio}x**
  a raw fio read+write (goal >= 0.9); rounds: ${copy_rows}
- integrity: ${VOL_GIB} GiB written with crc32c verify during the move, plus ${TRIALS} kill -9 trials
  (resume, then verify of the whole volume): **${mismatches} mismatches**

\`hot_first_speedup=${speedup} p99_ratio_vs_naive=${p99_ratio} time_ratio_vs_naive=${time_ratio} mismatches=${mismatches}\`
<!-- END volume-migrate -->
EOF
)
python3 - bench/RESULTS.md "$table" <<'EOF'
import sys, re
path, table = sys.argv[1], sys.argv[2]
text = open(path).read()
pat = re.compile(r"<!-- BEGIN volume-migrate -->.*?<!-- END volume-migrate -->", re.S)
text = pat.sub(lambda m: table, text) if pat.search(text) else text.rstrip() + "\n\n" + table + "\n"
open(path, "w").write(text)
EOF
echo "hot_first_speedup=${speedup} p99_ratio_vs_naive=${p99_ratio} time_ratio_vs_naive=${time_ratio} mismatches=${mismatches}"
