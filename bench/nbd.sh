#!/usr/bin/env bash
# kiln vs nbdkit over NBD, side by side, same machine, same fio.
#
#   bench/nbd.sh        env: DURATION=10 (s per point), REPEAT=1 (rounds; medians are
#                       reported), RATE=30000, SIZE=1g, SERVER_CORE=0, FIO_CORE=1
#
# Both servers serve a RAM-backed export of the same size: kiln with one malloc tier (the
# malloc tier also holds kiln's 64 MiB metadata region) and a 1 GiB volume, `nbdkit memory
# size=1G` (one instance per transport: nbdkit listens on a unix socket or on TCP, not both).
# All servers are pinned to SERVER_CORE (taskset; kiln's reactor is also configured there) and
# run at the same time, idle unless measured; fio's nbd engine is pinned to FIO_CORE. Every
# export is prefilled first, so reads hit data. Each point runs kiln and nbdkit back to back
# (the order alternates between rounds), so both see the same background load.
#
# Points (each DURATION seconds):
#   randread  4 KiB, QD32, over a unix socket and over TCP: IOPS and p99 completion latency
#   rate      4 KiB randread QD32 at --rate_iops=RATE over the unix socket: server CPU time
#             (utime+stime of all its threads, /proc/PID/stat) per second of wall time
#   seqread   128 KiB sequential reads, QD8, unix socket: GiB/s
# Diagnostics afterwards: kiln at the fixed rate with [reactor] idle_spin_us=0 and with
# poll_mode="busy", and reactor parks per second (RPC reactor_get_stats).
#
# Prints a table, writes it with the exact commands into bench/RESULTS.md between
# <!-- nbd:begin --> and <!-- nbd:end -->, and ends with one line:
#   iops_ratio=X p99_ratio=Y cpu_ratio_at_30k=Z      (kiln / nbdkit; unix-socket randread)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-1}
RATE=${RATE:-30000}
SIZE=${SIZE:-1g}
KILN=${KILN:-target/release/kiln}
SERVER_CORE=${SERVER_CORE:-0}
FIO_CORE=${FIO_CORE:-1}
for t in fio nbdkit nbdinfo taskset python3; do
    command -v "$t" >/dev/null || { echo "nbd.sh: needs $t" >&2; exit 2; }
done
[[ -x $KILN ]] || cargo build --release
KILN=$(realpath "$KILN")
TCK=$(getconf CLK_TCK)
WORK=$(mktemp -d /tmp/kiln-nbdbench-XXXXXX)
COMMANDS=()
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
note() { COMMANDS+=("$*"); }

start_kiln() { # extra-reactor-lines -> KILN_PID, KILN_UNIX, KILN_TCP
    local port; port=$(free_port)
    cat >"$WORK/kiln.toml" <<EOF
[[tier]]
name = "fast"
device = "malloc:1280MiB"
capacity = "1280MiB"
cost_per_gib_month = 1.0
read_latency_us = 1
write_latency_us = 1
bandwidth_mib_s = 10000

[[volume]]
name = "vol0"
size = "1GiB"

[nbd]
listen = ["127.0.0.1:$port", "unix:$WORK/kiln-nbd.sock"]

[rpc]
socket = "$WORK/kiln.sock"

[reactor]
cores = [$SERVER_CORE]
$1
EOF
    note "taskset -c $SERVER_CORE $KILN serve --config kiln.toml   # malloc:1280MiB tier, 1GiB volume, [reactor] cores=[$SERVER_CORE] $1"
    taskset -c "$SERVER_CORE" "$KILN" serve --config "$WORK/kiln.toml" >>"$WORK/kiln.log" 2>&1 &
    KILN_PID=$!
    PIDS+=("$KILN_PID")
    for _ in $(seq 400); do
        "$KILN" rpc kiln_get_version -s "$WORK/kiln.sock" --timeout 2 >/dev/null 2>&1 && break
        kill -0 "$KILN_PID" 2>/dev/null || { cat "$WORK/kiln.log"; exit 1; }
        sleep 0.05
    done
    KILN_UNIX="nbd+unix:///vol0?socket=$WORK/kiln-nbd.sock"
    KILN_TCP="nbd://127.0.0.1:$port/vol0"
}

stop_kiln() {
    kill "$KILN_PID"; wait "$KILN_PID" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$KILN_PID" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

start_nbdkit() { # unix|tcp -> NBDKIT_PID, NBDKIT_URI
    local listen
    if [[ $1 == unix ]]; then
        listen=(-U "$WORK/nbdkit.sock")
        NBDKIT_URI="nbd+unix:///?socket=$WORK/nbdkit.sock"
    else
        local port; port=$(free_port)
        listen=(-i 127.0.0.1 -p "$port")
        NBDKIT_URI="nbd://127.0.0.1:$port/"
    fi
    note "taskset -c $SERVER_CORE nbdkit -f ${listen[*]} memory size=1G"
    taskset -c "$SERVER_CORE" nbdkit -f "${listen[@]}" memory size=1G >>"$WORK/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    PIDS+=("$NBDKIT_PID")
    for _ in $(seq 400); do
        nbdinfo --size "$NBDKIT_URI" >/dev/null 2>&1 && return 0
        kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$WORK/nbdkit.log"; exit 1; }
        sleep 0.05
    done
    echo "nbdkit did not start"; exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

parks() { # kiln rpc socket -> reactor parks so far
    "$KILN" rpc reactor_get_stats -s "$1" |
        python3 -c 'import json,sys; print(sum(r["parks"] for r in json.load(sys.stdin)))'
}

# run_fio NAME URI ARGS... -> $WORK/NAME.json
run_fio() {
    local name=$1 uri=$2; shift 2
    local cmd=(taskset -c "$FIO_CORE" fio --name="$name" --ioengine=nbd "--uri=$uri" --size="$SIZE"
        --output-format=json "$@")
    note "${cmd[*]/--uri=$uri/\'--uri=$uri\'}"
    "${cmd[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "fio $name failed:"; cat "$WORK/$name.err" "$WORK/$name.out"; exit 1; }
    sed -n '/^{/,$p' "$WORK/$name.out" >"$WORK/$name.json"
}

prefill() { run_fio "prefill-$1" "$2" --rw=write --bs=1m --iodepth=4; }

# point KIND NAME URI PID [KILN_RPC_SOCKET]
point() {
    local kind=$1 name=$2 uri=$3 pid=$4 sock=${5:-}
    case $kind in
    rr)
        run_fio "$name" "$uri" --rw=randread --bs=4k --iodepth=32 --time_based \
            "--runtime=$DURATION" --ramp_time=1 --percentile_list=50:99:99.9
        ;;
    seq)
        run_fio "$name" "$uri" --rw=read --bs=128k --iodepth=8 --time_based "--runtime=$DURATION"
        ;;
    rate)
        local t0 w0 t1 w1 p0=0 p1=0
        if [[ -n $sock ]]; then p0=$(parks "$sock"); fi
        t0=$(cpu_ticks "$pid"); w0=$(date +%s%N)
        run_fio "$name" "$uri" --rw=randread --bs=4k --iodepth=32 --time_based \
            "--runtime=$DURATION" "--rate_iops=$RATE" --percentile_list=50:99:99.9
        t1=$(cpu_ticks "$pid"); w1=$(date +%s%N)
        if [[ -n $sock ]]; then p1=$(parks "$sock"); fi
        python3 -c "print(100.0 * ($t1 - $t0) / $TCK / (($w1 - $w0) / 1e9))" >"$WORK/$name.cpu"
        python3 -c "print(($p1 - $p0) / (($w1 - $w0) / 1e9))" >"$WORK/$name.parks"
        ;;
    esac
}

echo "nbd.sh: DURATION=${DURATION}s per point, REPEAT=$REPEAT, RATE=$RATE, SIZE=$SIZE; servers on core $SERVER_CORE, fio on core $FIO_CORE"
echo "nbd.sh: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

start_kiln ""
start_nbdkit unix; NK_UNIX_PID=$NBDKIT_PID; NK_UNIX=$NBDKIT_URI
start_nbdkit tcp; NK_TCP_PID=$NBDKIT_PID; NK_TCP=$NBDKIT_URI
prefill kiln "$KILN_UNIX"
prefill nbdkit-unix "$NK_UNIX"
prefill nbdkit-tcp "$NK_TCP"
for r in $(seq "$REPEAT"); do
    for p in rr-unix rr-tcp rate-unix seq-unix; do
        kind=${p%-*}
        transport=${p#*-}
        if [[ $transport == unix ]]; then
            k=("$KILN_UNIX" "$KILN_PID" "$WORK/kiln.sock"); n=("$NK_UNIX" "$NK_UNIX_PID")
        else
            k=("$KILN_TCP" "$KILN_PID" "$WORK/kiln.sock"); n=("$NK_TCP" "$NK_TCP_PID")
        fi
        if (( r % 2 )); then
            point "$kind" "kiln-$p-$r" "${k[@]}"; point "$kind" "nbdkit-$p-$r" "${n[@]}"
        else
            point "$kind" "nbdkit-$p-$r" "${n[@]}"; point "$kind" "kiln-$p-$r" "${k[@]}"
        fi
        echo "nbd.sh: round $r/$REPEAT: $p done"
    done
done
stop_kiln
# Diagnostics: kiln at the fixed rate without idle spinning, and busy polling (alone on the core
# apart from the idle nbdkit instances).
start_kiln "idle_spin_us = 0"
prefill kiln-nospin "$KILN_UNIX"
point rate kiln-nospin "$KILN_UNIX" "$KILN_PID" "$WORK/kiln.sock"
stop_kiln
start_kiln 'poll_mode = "busy"'
prefill kiln-busy "$KILN_UNIX"
point rate kiln-busy "$KILN_UNIX" "$KILN_PID" "$WORK/kiln.sock"
stop_kiln

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
printf '%s\n' "${COMMANDS[@]}" >"$WORK/commands.txt"
export WORK DURATION REPEAT RATE SIZE LOADAVG ROOT SERVER_CORE FIO_CORE
python3 - <<'EOF'
import json, os, re, platform, statistics
W = os.environ["WORK"]
R = int(os.environ["REPEAT"])
rate = int(os.environ["RATE"])

def job(name):
    return json.load(open(f"{W}/{name}.json"))["jobs"][0]["read"]

def med(f, server, p):
    return statistics.median(f(f"{server}-{p}-{r}") for r in range(1, R + 1))

iops = lambda n: job(n)["iops"]
p99 = lambda n: job(n)["clat_ns"]["percentile"]["99.000000"] / 1000.0
gibs = lambda n: job(n)["bw_bytes"] / 2**30
cpu = lambda n: float(open(f"{W}/{n}.cpu").read())
parks = lambda n: float(open(f"{W}/{n}.parks").read())

m = {}
for s in ("kiln", "nbdkit"):
    m[s] = dict(
        iops_u=med(iops, s, "rr-unix"), p99_u=med(p99, s, "rr-unix"),
        iops_t=med(iops, s, "rr-tcp"), p99_t=med(p99, s, "rr-tcp"),
        cpu=med(cpu, s, "rate-unix"), rate_iops=med(iops, s, "rate-unix"),
        seq=med(gibs, s, "seq-unix"),
    )
k, n = m["kiln"], m["nbdkit"]
ratio = lambda a, b: a / b if b else float("inf")
K = rate // 1000
rows = [
    ("4K randread QD32, unix: IOPS", f"{k['iops_u']:,.0f}", f"{n['iops_u']:,.0f}", ratio(k["iops_u"], n["iops_u"])),
    ("4K randread QD32, unix: p99 clat (us)", f"{k['p99_u']:,.0f}", f"{n['p99_u']:,.0f}", ratio(k["p99_u"], n["p99_u"])),
    ("4K randread QD32, TCP: IOPS", f"{k['iops_t']:,.0f}", f"{n['iops_t']:,.0f}", ratio(k["iops_t"], n["iops_t"])),
    ("4K randread QD32, TCP: p99 clat (us)", f"{k['p99_t']:,.0f}", f"{n['p99_t']:,.0f}", ratio(k["p99_t"], n["p99_t"])),
    (f"4K randread at {K}k IOPS, unix: server CPU %", f"{k['cpu']:.1f}", f"{n['cpu']:.1f}", ratio(k["cpu"], n["cpu"])),
    (f"  (IOPS achieved at the {K}k rate)", f"{k['rate_iops']:,.0f}", f"{n['rate_iops']:,.0f}", None),
    ("128K seqread QD8, unix: GiB/s", f"{k['seq']:.2f}", f"{n['seq']:.2f}", ratio(k["seq"], n["seq"])),
]
diag = [
    (f"kiln at {K}k, adaptive, idle_spin_us=20 (default): reactor parks/s", f"{med(parks, 'kiln', 'rate-unix'):,.0f}"),
    (f"kiln at {K}k, idle_spin_us=0: CPU %", f"{cpu('kiln-nospin'):.1f}"),
    (f"kiln at {K}k, idle_spin_us=0: reactor parks/s", f"{parks('kiln-nospin'):,.0f}"),
    (f"kiln at {K}k, poll_mode=busy: CPU %", f"{cpu('kiln-busy'):.1f}"),
]
w = max(len(r[0]) for r in rows + diag)
lines = [f"| {'point'.ljust(w)} | kiln | nbdkit | kiln/nbdkit |",
         f"|{'-' * (w + 2)}|-----:|-------:|------------:|"]
for name, kv, nv, rt in rows:
    lines.append(f"| {name.ljust(w)} | {kv} | {nv} | {'' if rt is None else f'{rt:.2f}'} |")
for name, kv in diag:
    lines.append(f"| {name.ljust(w)} | {kv} | | |")
table = "\n".join(lines)
final = (f"iops_ratio={ratio(k['iops_u'], n['iops_u']):.2f} p99_ratio={ratio(k['p99_u'], n['p99_u']):.2f} "
         f"cpu_ratio_at_30k={ratio(k['cpu'], n['cpu']):.2f}")
cmds = open(f"{W}/commands.txt").read().replace(W, "$WORK").replace(os.environ["ROOT"] + "/", "")
cpuinfo = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
section = f"""<!-- nbd:begin -->
## NBD: kiln vs nbdkit (bench/nbd.sh)

`DURATION={os.environ['DURATION']} REPEAT={R} bench/nbd.sh` (RATE={rate}, SIZE={os.environ['SIZE']}; medians of {R} round(s)).
Machine: {os.cpu_count()} CPUs ({cpuinfo}), kernel {platform.release()}; load average at the end
{os.environ['LOADAVG']} (other work was running on this machine: treat the numbers as rough).
Servers pinned to core {os.environ['SERVER_CORE']}, fio (nbd engine) to core {os.environ['FIO_CORE']}.
Both exports are RAM-backed and prefilled: kiln with a `malloc:1280MiB` tier and a 1 GiB
volume, `nbdkit memory size=1G`. CPU = utime+stime of the server process (all threads) from
/proc/PID/stat over the run, per second of wall time.

{table}

`{final}`

Commands ($WORK is a temp dir; kiln.toml as written by the script):

```
{cmds.rstrip()}
```
<!-- nbd:end -->"""
path = os.path.join(os.environ["ROOT"], "bench/RESULTS.md")
text = open(path).read() if os.path.exists(path) else ""
mm = re.search(r"<!-- nbd:begin -->.*?<!-- nbd:end -->", text, re.S)
if mm:
    text = text[:mm.start()] + section + text[mm.end():]
else:
    text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
open(path, "w").write(text)
print(table)
print("(written to bench/RESULTS.md between the nbd markers)")
print(final)
EOF
