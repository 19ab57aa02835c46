#!/usr/bin/env bash
# Live tiering benchmark: `kiln serve` with a 256 MiB `fast` tier (file) and a `capacity` tier
# (file behind `delay:2000,2000,200:`, i.e. 2 ms and 200 MiB/s, an emulated HDD), one 2 GiB
# volume, fio through NBD. Runs the same harness three times (fresh data directories): policy
# "kiln", policy "demand-lru" (the issue's baseline: `demand_promotion = "sync"`, the default,
# a read of data on the capacity tier waits while its granules are promoted, LRU eviction),
# and "demand-lru" with `demand_promotion = "window"` (promotes what was read at the next
# 1 s window, through the plan, like kiln), and reports:
#
#   speedup_vs_start       mean read latency in the first 20 s / in the last third (kiln)
#   speedup_vs_demand_lru  demand-lru (sync) last-third mean read latency / kiln last-third mean
#                          (the window variant's ratio is printed on the line before)
#   shift                  halfway through, the zipf hot set moves by half the volume
#                          (zipf:1.2:0.0 -> zipf:1.2:0.5); windows until kiln promotes again
#                          and until read latency recovers
#   foreground p99         (kiln) a foreground job's read p99 with the policy paused vs
#                          running while a second job's hot set is being promoted
#   mismatches             a separate fio crc32c verify phase on the kiln server
#
# Writes the table between the tiering markers of bench/RESULTS.md, bench/heat.svg, and prints
# `speedup_vs_start=X speedup_vs_demand_lru=Y mismatches=N` last.
#
#   bench/tiering-live.sh [--quick]     3 min of load per policy (60 s with --quick)
#   env: KEEP=1 keeps the work dir, OUT=DIR chooses it, CORE=N the reactor core (default 1)
#
# Needs: fio (nbd engine), python3; builds target/release/kiln if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
DUR=$((QUICK ? 60 : 180))
HALF=$((DUR / 2))
FG=$((QUICK ? 15 : 30))
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
for t in fio python3; do command -v "$t" >/dev/null || { echo "tiering-live.sh: needs $t" >&2; exit 2; }; done
KILN=$(realpath "$KILN")
OUT=${OUT:-$(mktemp -d /tmp/kiln-tiering-XXXXXX)}
mkdir -p "$OUT"
CORE=${CORE:-1}
echo "tiering-live.sh: work dir $OUT, ${DUR}s of load per policy$( ((QUICK)) && echo ' (--quick)')"

SERVER_PID=
POLLER_PID=
cleanup() {
    [[ -n $POLLER_PID ]] && kill "$POLLER_PID" 2>/dev/null
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null
    [[ -z ${KEEP:-} ]] && rm -f "$OUT"/*/fast.img "$OUT"/*/capacity.img
    true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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

stop_server() {
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
}

rpc() { "$KILN" rpc "$@" -s "$dir/kiln.sock" --timeout 10; }

# One status line per second: unix_ms completed promotions demotions in_flight windows paused
poll_status() {
    while sleep 1; do
        "$KILN" rpc migration_get_status -s "$dir/kiln.sock" --timeout 2 2>/dev/null |
            python3 -c 'import json,sys,time; j=json.load(sys.stdin); print(int(time.time()*1000), j["completed"], j["promotions"], j["demotions"], j["in_flight"], j["windows"], int(j["paused"]), j["bytes_moved"], j["failed"])' \
            >>"$dir/status.log" 2>/dev/null || true
    done
}

mark() { echo "$1 $(date +%s%3N)" >>"$dir/marks.log"; }

URI() { echo "nbd+unix:///vol0?socket=$dir/nbd.sock"; }
LOAD=(--ioengine=nbd --rw=randrw --rwmixread=90 --bs=4k --iodepth=8 --size=2g --time_based
      --norandommap --randrepeat=0 --log_avg_msec=1000 --output-format=json)

run_policy() { # label policy [extra [policy] line]
    local label=$1 policy=$2 extra=${3:-}
    dir=$OUT/$label
    rm -rf "$dir"; mkdir -p "$dir"
    cat >"$dir/kiln.toml" <<EOF
[[tier]]
name = "fast"
device = "file:$dir/fast.img?size=256MiB"
capacity = "256MiB"
cost_per_gib_month = 0.10
read_latency_us = 100
write_latency_us = 100
bandwidth_mib_s = 2000

[[tier]]
name = "capacity"
device = "delay:2000,2000,200:file:$dir/capacity.img?size=3GiB"
capacity = "3GiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 200

[[volume]]
name = "vol0"
size = "2GiB"

[nbd]
listen = ["unix:$dir/nbd.sock"]

[rpc]
socket = "$dir/kiln.sock"

[metrics]
listen = "127.0.0.1:$(free_port)"

[reactor]
cores = [$CORE]
poll_mode = "adaptive"

[policy]
policy = "$policy"
$extra
EOF
    start_server "$dir"
    echo "[$label] prefill 2 GiB (sequential 1 MiB writes)"
    fio --name=prefill --ioengine=nbd "--uri=$(URI)" --rw=write --bs=1m --iodepth=8 --size=2g \
        --output-format=json >"$dir/prefill.json"
    # Start cold: the prefill filled the fast tier first; move the whole volume to the
    # capacity tier (policy paused, so nothing is promoted back before the load starts).
    rpc policy_pause >/dev/null
    echo "[$label] cold start: policy_force_tier capacity"
    "$KILN" rpc policy_force_tier '{"tier":"capacity","wait":true}' -s "$dir/kiln.sock" --timeout 600 >/dev/null
    rpc volume_get_map '{"volume":"vol0"}' >"$dir/map-start.json"
    rpc policy_resume >/dev/null
    poll_status &
    POLLER_PID=$!
    echo "[$label] phase 1: ${HALF}s zipf:1.2:0.0 randrw 90/10 4k QD8"
    mark phase1
    fio --name=p1 --ioengine=nbd "--uri=$(URI)" "${LOAD[@]}" --random_distribution=zipf:1.2:0.0 \
        --runtime=$HALF "--write_lat_log=$dir/p1" >"$dir/p1.json"
    echo "[$label] phase 2: ${HALF}s zipf:1.2:0.5 (the hot set moves by 1 GiB)"
    mark phase2
    fio --name=p2 --ioengine=nbd "--uri=$(URI)" "${LOAD[@]}" --random_distribution=zipf:1.2:0.5 \
        --runtime=$HALF "--write_lat_log=$dir/p2" >"$dir/p2.json"
    mark end
    rpc migration_get_status >"$dir/status-end.json"
    rpc volume_get_heatmap '{"volume":"vol0","windows":900}' >"$dir/heatmap.json"
    rpc tier_list >"$dir/tiers.json"
    if [[ $policy == kiln ]]; then
        "$KILN" heatmap --volume vol0 --out bench/heat.svg -s "$dir/kiln.sock" --windows 900
        # Foreground protection: the same foreground job (the phase 2 hot set), with a second
        # job reading a new hot set (zipf centre 0.25), first with the policy paused (no
        # migration), then running (the second job's hot set is promoted under the foreground).
        local fg=(--name=fg --ioengine=nbd "--uri=$(URI)" "${LOAD[@]}" --random_distribution=zipf:1.2:0.5
                  --runtime=$FG --name=mover --ioengine=nbd "--uri=$(URI)" --rw=randread --bs=4k
                  --iodepth=4 --size=2g --time_based --norandommap --randrepeat=0 --runtime=$FG
                  --random_distribution=zipf:1.2:0.25 --rate_iops=500)
        rpc policy_pause >/dev/null
        sleep 2
        rpc migration_get_status >"$dir/fg-paused-before.json"
        echo "[$label] foreground p99, policy paused (${FG}s)"
        fio "${fg[@]}" >"$dir/fg-paused.json"
        rpc migration_get_status >"$dir/fg-paused-after.json"
        rpc policy_resume >/dev/null
        echo "[$label] foreground p99, policy running (${FG}s)"
        fio "${fg[@]}" >"$dir/fg-running.json"
        rpc migration_get_status >"$dir/fg-running-after.json"
        # Integrity: crc32c verify of zipf random writes while the policy keeps migrating.
        echo "[$label] verify phase (crc32c)"
        (cd "$dir" && exec fio --name=verify --ioengine=nbd "--uri=$(URI)" --rw=randwrite --bs=4k --iodepth=8 \
            --size=2g --io_size=$((QUICK ? 128 : 384))m --random_distribution=zipf:1.2:0.75 \
            --norandommap --serialize_overlap=1 --verify=crc32c --do_verify=1 \
            --verify_backlog=1024 --verify_fatal=0 --output-format=json \
            >"$dir/verify.json" 2>"$dir/verify.err") || true
        rpc migration_get_status >"$dir/status-verify.json"
    fi
    kill "$POLLER_PID" 2>/dev/null; wait "$POLLER_PID" 2>/dev/null || true; POLLER_PID=
    stop_server
    grep -ci "warn" "$dir/kiln.log" >"$dir/warnings.count" || true
}

run_policy kiln kiln
run_policy demand-lru demand-lru 'demand_promotion = "sync"'
run_policy demand-lru-window demand-lru 'demand_promotion = "window"'

python3 - "$OUT" "$DUR" "$QUICK" <<'EOF'
import json, os, re, sys, datetime
out, dur, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
half = dur // 2

def fio_json(path):
    t = open(path).read()
    i = t.find("{")
    return json.loads(t[i:])

def lat_series(d):
    """Mean read latency (ms) per second over both phases, from the lat logs."""
    series = []
    for ph, base in (("p1", 0), ("p2", half)):
        per = {}
        for f in os.listdir(d):
            if f.startswith(ph + "_lat.") and f.endswith(".log"):
                for line in open(os.path.join(d, f)):
                    p = [x.strip() for x in line.split(",")]
                    if len(p) < 3 or p[2] != "0":
                        continue
                    sec = int(p[0]) // 1000
                    per.setdefault(sec, []).append(int(p[1]) / 1e6)
        for sec in sorted(per):
            if sec < half + 1:
                series.append((base + sec, sum(per[sec]) / len(per[sec])))
    return series

def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")

res = {}
for pol in ("kiln", "demand-lru", "demand-lru-window"):
    d = os.path.join(out, pol)
    s = lat_series(d)
    first = mean(v for t, v in s if t < 20)
    last = mean(v for t, v in s if t >= dur - dur // 3)
    pre = mean(v for t, v in s if half - 10 <= t < half)
    st = json.load(open(os.path.join(d, "status-end.json")))
    p = {ph: fio_json(os.path.join(d, ph + ".json"))["jobs"][0] for ph in ("p1", "p2")}
    r = {
        "series": s, "first20": first, "last3": last, "pre_shift": pre, "status": st,
        "read_iops": [p[ph]["read"]["iops"] for ph in ("p1", "p2")],
        "read_p99_ms": [p[ph]["read"]["clat_ns"]["percentile"]["99.000000"] / 1e6 for ph in ("p1", "p2")],
        "read_mean_ms": [p[ph]["read"]["lat_ns"]["mean"] / 1e6 for ph in ("p1", "p2")],
        "warnings": open(os.path.join(d, "warnings.count")).read().strip() or "0",
    }
    # Re-planning after the shift: status lines are "unix_ms completed promotions demotions
    # in_flight windows paused bytes_moved failed".
    marks = dict(l.split() for l in open(os.path.join(d, "marks.log")))
    t_shift = int(marks["phase2"])
    rows = [list(map(int, l.split())) for l in open(os.path.join(d, "status.log")) if len(l.split()) == 9]
    before = [x for x in rows if x[0] <= t_shift]
    after = [x for x in rows if x[0] > t_shift]
    w_shift = before[-1][5] if before else 0
    prom0 = before[-1][2] if before else 0
    replan = next((x[5] - w_shift for x in after if x[2] > prom0), None)
    # Recovery: first second after the shift whose 5 s moving mean is within 1.2x of the 10 s
    # before the shift.
    post = [(t, v) for t, v in s if t >= half]
    rec = None
    for i in range(len(post) - 4):
        if mean(v for _, v in post[i:i + 5]) <= 1.2 * pre:
            rec = post[i][0] - half
            break
    r["replan_windows"], r["recover_s"] = replan, rec
    r["promotions_after_shift"] = (after[-1][2] - prom0) if after else 0
    res[pol] = r

k, lru, win = res["kiln"], res["demand-lru"], res["demand-lru-window"]
d = os.path.join(out, "kiln")
def fg(name):
    j = fio_json(os.path.join(d, name))["jobs"]
    job = next(x for x in j if x["jobname"] == "fg")
    return job["read"]["clat_ns"]["percentile"]["99.000000"] / 1e6, job["read"]["lat_ns"]["mean"] / 1e6
fg_paused, fg_running = fg("fg-paused.json"), fg("fg-running.json")
mig = lambda a, b: json.load(open(os.path.join(d, b)))["completed"] - json.load(open(os.path.join(d, a)))["completed"]
moved_paused = mig("fg-paused-before.json", "fg-paused-after.json")
moved_running = mig("fg-paused-after.json", "fg-running-after.json")
vj = fio_json(os.path.join(d, "verify.json"))["jobs"][0]
verr = open(os.path.join(d, "verify.err")).read()
mism = len(re.findall(r"(?i)verify.*(bad|fail)|crc32c.*(wanted|mismatch)", verr))
if vj["error"] != 0 and mism == 0:
    mism = 1  # fio stopped on an error: count it, never hide it
verified_ios = vj["read"]["total_ios"]
sv_start = k["first20"] / k["last3"]
sv_lru = lru["last3"] / k["last3"]
sv_win = win["last3"] / k["last3"]

def f(x, n=2):
    return "n/a" if x is None or x != x else f"{x:.{n}f}"

cmd = "bench/tiering-live.sh" + (" --quick" if quick else "")
lines = []
A = lines.append
A("## Live tiering: kiln vs demand-lru over NBD")
A("")
A(f"Generated by `{cmd}` on {datetime.date.today()} ({os.cpu_count()} cores). `kiln serve`: "
  "`fast` = 256 MiB file (the first 64 MiB is metadata), `capacity` = "
  "`delay:2000,2000,200:file:...` (2 ms, 200 MiB/s: an emulated HDD), one 2 GiB volume "
  "prefilled with sequential 1 MiB writes and then moved whole to the capacity tier "
  "(`policy_force_tier`, policy paused), so the run starts cold; default `[policy]` except `policy`. Load: fio nbd "
  f"engine, 4 KiB randrw 90% reads, QD8, `zipf:1.2:0.0` for {half} s, then the hot set moves "
  f"by half the volume (`zipf:1.2:0.5`) for {half} s. Read latency = fio `lat` log, 1 s "
  "averages.")
A("")
A("| policy | read mean first 20 s (ms) | read mean last third (ms) | read mean before shift (ms) | "
  "read p99 phase 1 / 2 (ms) | read IOPS phase 1 / 2 | promotions / demotions | MiB moved | "
  "windows to re-plan after shift | s to recover after shift |")
A("|---|---|---|---|---|---|---|---|---|---|")
for pol, r in res.items():
    st = r["status"]
    A(f"| {pol} | {f(r['first20'])} | {f(r['last3'])} | {f(r['pre_shift'])} | "
      f"{f(r['read_p99_ms'][0])} / {f(r['read_p99_ms'][1])} | {r['read_iops'][0]:.0f} / "
      f"{r['read_iops'][1]:.0f} | {st['promotions']} / {st['demotions']} | "
      f"{st['bytes_moved'] / 2**20:.0f} | {r['replan_windows'] if r['replan_windows'] is not None else 'never'} | "
      f"{r['recover_s'] if r['recover_s'] is not None else 'not within the run'} |")
A("")
A(f"- speedup_vs_start (kiln, first 20 s / last third): **{f(sv_start)}**")
A(f"- speedup_vs_demand_lru (last third, demand-lru with synchronous promotion / kiln): **{f(sv_lru)}**")
A(f"- the same against demand-lru with `demand_promotion = \"window\"` (promotion at the next window, "
  f"through the plan): **{f(sv_win)}**")
A(f"- foreground read p99 (kiln, {'15' if quick else '30'} s each, fg job = phase 2 load, "
  f"second job reads a new hot set at 500 IOPS): policy paused {f(fg_paused[0])} ms "
  f"({moved_paused} migrations), policy running {f(fg_running[0])} ms ({moved_running} "
  f"migrations) -> ratio **{f(fg_running[0] / fg_paused[0])}x** (goal <= 2x at default priority); "
  f"fg read mean {f(fg_paused[1])} / {f(fg_running[1])} ms")
A(f"- verify phase (crc32c, zipf random writes with backlog verify while migrating): "
  f"{verified_ios} blocks verified, **{mism} mismatches**, fio error {vj['error']}")
A(f"- serve log lines with warnings: kiln {k['warnings']}, demand-lru {lru['warnings']}, "
  f"demand-lru-window {win['warnings']}")
A("")
A("Per-second mean read latency (ms), kiln | demand-lru (sync) | demand-lru (window):")
A("")
A("```")
ks, ls, ws = dict(k["series"]), dict(lru["series"]), dict(win["series"])
for t in range(0, dur, 5):
    A(f"t={t:3d}s  kiln {f(ks.get(t), 2):>6}  demand-lru {f(ls.get(t), 2):>6}  window {f(ws.get(t), 2):>6}"
      + ("   <- hot set moves" if t == half else ""))
A("```")
A("")
A("Heat map of the kiln run (`kiln heatmap --volume vol0 --out bench/heat.svg`): "
  "![heat map](heat.svg)")
A("")
A("Commands (per policy; `$D` is the run's directory):")
A("")
A("```sh")
A("kiln serve --config $D/kiln.toml &        # [policy] policy = \"kiln\" | \"demand-lru\" (demand_promotion = \"sync\" | \"window\")")
A("fio --name=prefill --ioengine=nbd --uri='nbd+unix:///vol0?socket=$D/nbd.sock' --rw=write --bs=1m --iodepth=8 --size=2g")
A('kiln rpc policy_pause; kiln rpc policy_force_tier \'{"tier":"capacity","wait":true}\'; kiln rpc policy_resume')
for ph, c in (("p1", "0.0"), ("p2", "0.5")):
    A(f"fio --name={ph} --uri=... --ioengine=nbd --rw=randrw --rwmixread=90 --bs=4k --iodepth=8 --size=2g "
      f"--time_based --norandommap --randrepeat=0 --log_avg_msec=1000 --random_distribution=zipf:1.2:{c} "
      f"--runtime={half} --write_lat_log=$D/{ph}")
A("kiln heatmap --volume vol0 --out bench/heat.svg -s $D/kiln.sock --windows 900")
A(f"kiln rpc policy_pause; fio --name=fg ...phase 2 load... --runtime={'15' if quick else '30'} "
  "--name=mover --rw=randread --bs=4k --iodepth=4 --random_distribution=zipf:1.2:0.25 --rate_iops=500")
A("kiln rpc policy_resume; (the same fio again)")
A(f"fio --name=verify --uri=... --rw=randwrite --bs=4k --iodepth=8 --size=2g --io_size={'128' if quick else '384'}m "
  "--random_distribution=zipf:1.2:0.75 --norandommap --serialize_overlap=1 --verify=crc32c --do_verify=1 --verify_backlog=1024")
A("```")
section = "\n".join(lines) + "\n"
open(os.path.join(out, "section.md"), "w").write(section)
path = "bench/RESULTS.md"
text = open(path).read()
b, e = "<!-- tiering:begin -->", "<!-- tiering:end -->"
if b not in text or e not in text:
    text = text.rstrip("\n") + f"\n\n{b}\n{e}\n"
i, j = text.index(b) + len(b), text.index(e)
text = text[:i] + "\n" + section + text[j:]
open(path, "w").write(text)
print(section)
print(f"speedup_vs_demand_lru_window={f(sv_win)}")
print(f"speedup_vs_start={f(sv_start)} speedup_vs_demand_lru={f(sv_lru)} mismatches={mism}")
EOF
