#!/usr/bin/env bash
# kiln vs nbdkit over NBD, side by side, same machine, same fio.
#
#   bench/nbd.sh                 DURATION=10 (seconds per point), RATE=30000, SIZE=1g
#
# Both servers serve a RAM-backed export of the same size: kiln with one malloc tier (the
# malloc tier also holds kiln's 64 MiB metadata region), `nbdkit memory`. Each server is pinned
# to core 0 (taskset -c 0; kiln's reactor also runs on core 0), fio's nbd engine to core 1.
# Every export is prefilled before it is read, so reads hit data.
#
# Points (each DURATION seconds):
#   randread  4 KiB, QD32, over a unix socket and over TCP: IOPS and p99 completion latency
#   rate      4 KiB randread at --rate_iops=RATE over the unix socket: server CPU time
#             (utime+stime of all its threads from /proc/PID/stat) per second of wall time
#   seqread   128 KiB sequential reads, QD8, unix socket: GiB/s
# Extra diagnostic rows: kiln at the fixed rate with [reactor] idle_spin_us=0 and busy polling.
#
# Prints a table, writes it with the exact commands into bench/RESULTS.md between
# <!-- nbd:begin --> and <!-- nbd:end -->, and ends with one line:
#   iops_ratio=X p99_ratio=Y cpu_ratio_at_30k=Z      (kiln / nbdkit; unix-socket randread)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
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
PID=
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
note() { COMMANDS+=("$*"); }

kiln_config() { # file tcp_port extra-reactor-lines
    cat >"$1" <<EOF
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
listen = ["127.0.0.1:$2", "unix:$WORK/kiln-nbd.sock"]

[rpc]
socket = "$WORK/kiln.sock"

[reactor]
cores = [$SERVER_CORE]
$3
EOF
}

start_kiln() { # extra-reactor-lines
    local port; port=$(free_port)
    kiln_config "$WORK/kiln.toml" "$port" "$1"
    note "taskset -c $SERVER_CORE $KILN serve --config kiln.toml   # kiln.toml: malloc:1280MiB tier, 1GiB volume, [reactor] cores=[$SERVER_CORE] ${1//$'\n'/ }"
    taskset -c "$SERVER_CORE" "$KILN" serve --config "$WORK/kiln.toml" >"$WORK/kiln.log" 2>&1 &
    PID=$!
    for _ in $(seq 400); do
        "$KILN" rpc kiln_get_version -s "$WORK/kiln.sock" --timeout 2 >/dev/null 2>&1 && break
        kill -0 $PID 2>/dev/null || { cat "$WORK/kiln.log"; exit 1; }
        sleep 0.05
    done
    UNIX_URI="nbd+unix:///vol0?socket=$WORK/kiln-nbd.sock"
    TCP_URI="nbd://127.0.0.1:$port/vol0"
}

start_nbdkit() { # unix|tcp
    local listen
    if [[ $1 == unix ]]; then
        rm -f "$WORK/nbdkit.sock"
        listen=(-U "$WORK/nbdkit.sock")
        URI="nbd+unix:///?socket=$WORK/nbdkit.sock"
    else
        local port; port=$(free_port)
        listen=(-i 127.0.0.1 -p "$port")
        URI="nbd://127.0.0.1:$port/"
    fi
    note "taskset -c $SERVER_CORE nbdkit -f ${listen[*]} memory size=1G"
    taskset -c "$SERVER_CORE" nbdkit -f "${listen[@]}" memory size=1G >"$WORK/nbdkit.log" 2>&1 &
    PID=$!
    for _ in $(seq 400); do
        nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        kill -0 $PID 2>/dev/null || { cat "$WORK/nbdkit.log"; exit 1; }
        sleep 0.05
    done
    echo "nbdkit did not start"; exit 1
}

stop_server() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

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

randread() { # name uri
    run_fio "$1" "$2" --rw=randread --bs=4k --iodepth=32 --time_based "--runtime=$DURATION" \
        --ramp_time=1 --percentile_list=50:99:99.9
}

parks() { # kiln rpc socket -> reactor parks so far
    "$KILN" rpc reactor_get_stats -s "$1" |
        python3 -c 'import json,sys; print(sum(r["parks"] for r in json.load(sys.stdin)))'
}

rated() { # name uri pid [kiln rpc socket] -> $WORK/name.cpu (CPU %), $WORK/name.parks (per s)
    local t0 w0 t1 w1 p0=0 p1=0
    [[ -n ${4:-} ]] && p0=$(parks "$4")
    t0=$(cpu_ticks "$3"); w0=$(date +%s%N)
    run_fio "$1" "$2" --rw=randread --bs=4k --iodepth=32 --time_based "--runtime=$DURATION" \
        "--rate_iops=$RATE" --percentile_list=50:99:99.9
    t1=$(cpu_ticks "$3"); w1=$(date +%s%N)
    [[ -n ${4:-} ]] && p1=$(parks "$4")
    python3 -c "print(round(100.0 * ($t1 - $t0) / $TCK / (($w1 - $w0) / 1e9), 1))" >"$WORK/$1.cpu"
    python3 -c "print(round(($p1 - $p0) / (($w1 - $w0) / 1e9)))" >"$WORK/$1.parks"
}

seqread() { run_fio "$1" "$2" --rw=read --bs=128k --iodepth=8 --time_based "--runtime=$DURATION"; }

echo "nbd.sh: DURATION=${DURATION}s per point, RATE=$RATE, SIZE=$SIZE; servers on core $SERVER_CORE, fio on core $FIO_CORE"
echo "nbd.sh: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

# kiln
start_kiln ""
prefill kiln "$UNIX_URI"
randread kiln-rr-unix "$UNIX_URI"
randread kiln-rr-tcp "$TCP_URI"
rated kiln-rate "$UNIX_URI" "$PID" "$WORK/kiln.sock"
seqread kiln-seq "$UNIX_URI"
stop_server
# kiln diagnostics at the fixed rate: no idle spinning, and busy polling
start_kiln "idle_spin_us = 0"
prefill kiln-nospin "$UNIX_URI"
rated kiln-rate-nospin "$UNIX_URI" "$PID" "$WORK/kiln.sock"
stop_server
start_kiln 'poll_mode = "busy"'
prefill kiln-busy "$UNIX_URI"
rated kiln-rate-busy "$UNIX_URI" "$PID" "$WORK/kiln.sock"
stop_server

# nbdkit: one instance per transport (nbdkit listens on a unix socket or TCP, not both)
start_nbdkit unix
prefill nbdkit "$URI"
randread nbdkit-rr-unix "$URI"
rated nbdkit-rate "$URI" "$PID"
seqread nbdkit-seq "$URI"
stop_server
start_nbdkit tcp
prefill nbdkit-tcp "$URI"
randread nbdkit-rr-tcp "$URI"
stop_server

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
printf '%s\n' "${COMMANDS[@]}" >"$WORK/commands.txt"
export WORK DURATION RATE SIZE LOADAVG ROOT SERVER_CORE FIO_CORE
python3 - <<'EOF'
import json, os, re, platform
W = os.environ["WORK"]
def job(name):
    return json.load(open(f"{W}/{name}.json"))["jobs"][0]
def rr(name):
    r = job(name)["read"]
    return r["iops"], r["clat_ns"]["percentile"]["99.000000"] / 1000.0
def cpu(name):
    return float(open(f"{W}/{name}.cpu").read())
def gibs(name):
    return job(name)["read"]["bw_bytes"] / 2**30
def rate_iops(name):
    return job(name)["read"]["iops"]

ku, kp = rr("kiln-rr-unix"); nu, np_ = rr("nbdkit-rr-unix")
kt, ktp = rr("kiln-rr-tcp"); nt, ntp = rr("nbdkit-rr-tcp")
kc, nc = cpu("kiln-rate"), cpu("nbdkit-rate")
ks, ns = gibs("kiln-seq"), gibs("nbdkit-seq")
rate = os.environ["RATE"]
rows = [
    ("4K randread QD32, unix: IOPS", f"{ku:,.0f}", f"{nu:,.0f}", ku / nu),
    ("4K randread QD32, unix: p99 (us)", f"{kp:.0f}", f"{np_:.0f}", kp / np_),
    ("4K randread QD32, TCP: IOPS", f"{kt:,.0f}", f"{nt:,.0f}", kt / nt),
    ("4K randread QD32, TCP: p99 (us)", f"{ktp:.0f}", f"{ntp:.0f}", ktp / ntp),
    (f"4K randread at {int(rate)//1000}k IOPS, unix: server CPU %", f"{kc:.1f}", f"{nc:.1f}", kc / nc if nc else float("inf")),
    ("  (achieved IOPS at that rate)", f"{rate_iops('kiln-rate'):,.0f}", f"{rate_iops('nbdkit-rate'):,.0f}", None),
    ("128K seqread QD8, unix: GiB/s", f"{ks:.2f}", f"{ns:.2f}", ks / ns),
]
def parks(name):
    return int(open(f"{W}/{name}.parks").read())
k = int(rate) // 1000
diag = [
    (f"kiln at {k}k, default (adaptive, idle_spin_us=20): reactor parks/s", f"{parks('kiln-rate'):,}"),
    (f"kiln at {k}k, idle_spin_us=0: CPU %", f"{cpu('kiln-rate-nospin'):.1f}"),
    (f"kiln at {k}k, idle_spin_us=0: reactor parks/s", f"{parks('kiln-rate-nospin'):,}"),
    (f"kiln at {k}k, poll_mode=busy: CPU %", f"{cpu('kiln-rate-busy'):.1f}"),
]
w = max(len(r[0]) for r in rows + diag)
lines = [f"| {'point'.ljust(w)} | kiln | nbdkit | kiln/nbdkit |", f"|{'-'*(w+2)}|-----:|-------:|------------:|"]
for name, k, n, ratio in rows:
    lines.append(f"| {name.ljust(w)} | {k} | {n} | {'' if ratio is None else f'{ratio:.2f}'} |")
for name, k in diag:
    lines.append(f"| {name.ljust(w)} | {k} | | |")
table = "\n".join(lines)
final = f"iops_ratio={ku/nu:.2f} p99_ratio={kp/np_:.2f} cpu_ratio_at_30k={(kc/nc if nc else float('inf')):.2f}"
cmds = open(f"{W}/commands.txt").read().replace(W, "$WORK").replace(os.environ["ROOT"] + "/", "")
cpuinfo = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
section = f"""<!-- nbd:begin -->
## NBD: kiln vs nbdkit (bench/nbd.sh)

`bench/nbd.sh` (DURATION={os.environ['DURATION']}s per point, RATE={rate}, SIZE={os.environ['SIZE']}).
Machine: {os.cpu_count()} CPUs ({cpuinfo}), kernel {platform.release()}; load average at the end:
{os.environ['LOADAVG']}. Servers pinned to core {os.environ['SERVER_CORE']}, fio (nbd engine) to core {os.environ['FIO_CORE']}.
Both exports are RAM-backed and prefilled: kiln with a `malloc:1280MiB` tier and a 1 GiB volume,
`nbdkit memory size=1G`. CPU = utime+stime of the server process (all threads) from
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
m = re.search(r"<!-- nbd:begin -->.*?<!-- nbd:end -->", text, re.S)
if m:
    text = text[:m.start()] + section + text[m.end():]
else:
    text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
open(path, "w").write(text)
print(table)
print(f"(written to bench/RESULTS.md between the nbd markers)")
print(final)
EOF
