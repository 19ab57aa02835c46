#!/usr/bin/env bash
# The cold tier on S3 against a local S3 server (moto_server on 127.0.0.1): demotion rate
# and ranged-read latency at the acceptance size.
#
# A volume of SIZE (default 512 MiB) on tiers fast (file) → capacity (file) → cold (S3) is
# written sequentially with crc32c verify headers, then `policy_force_tier` demotes all of
# it (objects of 64 MiB, multipart); the demotion rate is SIZE / wall time of that call.
# Then fio reads 4 KiB at random (QD1, 20 s) through NBD: every read is a ranged GET of one
# 64 KiB block, checked by crc32c; p50/p99 are fio's completion latencies. A last fio pass
# verifies every block (mismatches must be 0).
#
#   bench/s3.sh [SIZE_MIB]        writes the s3 section of bench/RESULTS.md
#
# Needs: fio (nbd engine), moto_server, curl, python3; builds target/release/kiln if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-512}
KILN=${KILN:-target/release/kiln}
[[ -x $KILN ]] || cargo build --release
for t in fio moto_server curl python3; do command -v "$t" >/dev/null || { echo "s3.sh: needs $t" >&2; exit 2; }; done
KILN=$(realpath "$KILN")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

dir=$(mktemp -d /tmp/kiln-s3bench-XXXXXX)
S3_PORT=$(free_port); NBD_PORT=$(free_port)
SERVER_PID=; MOTO_PID=
cleanup() {
    [[ -n $SERVER_PID ]] && kill -9 "$SERVER_PID" 2>/dev/null
    [[ -n $MOTO_PID ]] && kill "$MOTO_PID" 2>/dev/null
    rm -rf "$dir"
    true
}
trap cleanup EXIT

moto_server -H 127.0.0.1 -p "$S3_PORT" >"$dir/moto.log" 2>&1 &
MOTO_PID=$!
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" && break; sleep 0.1; done
curl -s -X PUT -o /dev/null "http://127.0.0.1:$S3_PORT/bench"

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
device = "file:$dir/capacity.img?size=$((SIZE_MIB + 64))MiB"
capacity = "$((SIZE_MIB + 64))MiB"
cost_per_gib_month = 0.02
read_latency_us = 2000
write_latency_us = 2000
bandwidth_mib_s = 2000

[[tier]]
name = "cold"
device = "s3://bench/kiln?endpoint=http://127.0.0.1:$S3_PORT&region=us-east-1&access_key_id=bench&secret_access_key=bench"
capacity = "64GiB"
cost_per_gib_month = 0.004
cost_per_1k_get = 0.0004
cost_per_1k_put = 0.005
read_latency_us = 20000
write_latency_us = 40000
bandwidth_mib_s = 2000

[[volume]]
name = "vol0"
size = "${SIZE_MIB}MiB"

[nbd]
listen = ["127.0.0.1:$NBD_PORT", "unix:$dir/nbd.sock"]

[rpc]
socket = "$dir/kiln.sock"

[policy]
policy = "static"
migration_bandwidth_pct = 100
EOF
"$KILN" serve --config "$dir/kiln.toml" >"$dir/kiln.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 600); do "$KILN" rpc kiln_get_version -s "$dir/kiln.sock" --timeout 2 >/dev/null 2>&1 && break; sleep 0.05; done
rpc() { "$KILN" rpc "$@" -s "$dir/kiln.sock" --timeout 900; }
URI="nbd+unix:///vol0?socket=$dir/nbd.sock"
WRITE=(--name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size="${SIZE_MIB}m" --verify=crc32c --verify_state_save=0)

fio "${WRITE[@]}" --do_verify=0 --output-format=json >"$dir/fill.json" 2>"$dir/fill.err"
t0=$(date +%s.%N)
rpc policy_force_tier '{"tier":"cold","wait":true}' >/dev/null
t1=$(date +%s.%N)
rpc tier_list >"$dir/tiers.json"
rpc volume_get_map '{"volume":"vol0"}' >"$dir/map.json"
fio --name=lat --ioengine=nbd --uri="$URI" --rw=randread --bs=4k --iodepth=1 --size="${SIZE_MIB}m" \
    --time_based --runtime=20 --norandommap --output-format=json >"$dir/lat.json" 2>"$dir/lat.err"
fio --name=qd16 --ioengine=nbd --uri="$URI" --rw=randread --bs=4k --iodepth=16 --size="${SIZE_MIB}m" \
    --time_based --runtime=10 --norandommap --output-format=json >"$dir/qd16.json" 2>"$dir/qd16.err"
# Baseline: the same ranged GET (one 64 KiB block of an object) straight from the server with curl.
key=$(curl -s "http://127.0.0.1:$S3_PORT/bench?list-type=2&prefix=kiln/" | grep -o "<Key>[^<]*" | head -1 | cut -c6-)
for i in $(seq 20); do
    curl -s -o /dev/null -r $((8192 + i * 65536))-$((8192 + i * 65536 + 65535)) -w "%{time_total}\n" "http://127.0.0.1:$S3_PORT/bench/$key"
done | sort -n >"$dir/curl.txt"
set +e
fio "${WRITE[@]}" --verify_only --output-format=json >"$dir/verify.json" 2>"$dir/verify.err"
vrc=$?
set -e
mism=$( (grep -ci "verify.*bad\|crc32c.*wanted\|bad magic" "$dir/verify.err" "$dir/verify.json" || true) | awk -F: '{s+=$2} END {print s+0}')
objects=$( (curl -s "http://127.0.0.1:$S3_PORT/bench?list-type=2&prefix=kiln/" | grep -o "<Key>" || true) | wc -l)

DIR=$dir T0=$t0 T1=$t1 SIZE_MIB=$SIZE_MIB VRC=$vrc MISM=$mism OBJECTS=$objects python3 - <<'EOF'
import json, os, re
d = os.environ["DIR"]
def fio_json(p):
    t = open(p).read()
    return json.loads(t[t.index("{"):])
size = int(os.environ["SIZE_MIB"])
secs = float(os.environ["T1"]) - float(os.environ["T0"])
tiers = json.load(open(f"{d}/tiers.json"))
cold = [t for t in tiers if t["name"] == "cold"][0]
chunks = json.load(open(f"{d}/map.json"))["chunks"]
on_cold = sum(c["length"] for c in chunks if c["tier"] == "cold") >> 20
lat = fio_json(f"{d}/lat.json")["jobs"][0]["read"]
pct = lat["clat_ns"]["percentile"]
qd16 = fio_json(f"{d}/qd16.json")["jobs"][0]["read"]
verify = fio_json(f"{d}/verify.json")["jobs"][0]
vrc, mism = int(os.environ["VRC"]), int(os.environ["MISM"])
mism = mism if vrc == 0 and verify["error"] == 0 else max(mism, 1)
L = []
A = L.append
A("## Cold tier on S3 (bench/s3.sh)")
A("")
A(f"Local S3 server: moto_server (in-process Python, 127.0.0.1), one kiln reactor, "
  f"{size} MiB volume on fast → capacity → cold (S3). Measured {os.popen('date -u +%Y-%m-%dT%H:%MZ').read().strip()} "
  f"on the shared 2-core build machine (other jobs running).")
A("")
A("| metric | value |")
A("|---|---|")
A(f"| demotion of {size} MiB to S3 (64 MiB objects, multipart, read-back verified) | {secs:.1f} s = **{size/secs:.1f} MiB/s** |")
A(f"| data on the cold tier after demotion | {on_cold} MiB in {os.environ['OBJECTS']} objects |")
A(f"| ranged read 4 KiB QD1 (one 64 KiB GET, crc32c checked) p50 / p99 | **{pct['50.000000']/1000:.0f} µs / {pct['99.000000']/1000:.0f} µs** ({lat['total_ios']} reads) |")
A(f"| ranged read 4 KiB QD16 | {qd16['iops']:.0f} IOPS, p99 {qd16['clat_ns']['percentile']['99.000000']/1000:.0f} µs |")
curl = [float(x) * 1e6 for x in open(f"{d}/curl.txt").read().split()]
A(f"| the same ranged GET of 64 KiB straight from the server with curl (baseline), median of {len(curl)} | {curl[len(curl)//2]:.0f} µs |")
A(f"| fio verify of every block read back from S3 | {verify['read']['total_ios']} blocks, mismatches={mism} |")
A(f"| object tier counters | {json.dumps(cold['objects'])} |")
A("")
A("```")
A(f"bench/s3.sh {size}")
A(f"fio --rw=write --bs=1m --iodepth=8 --size={size}m --verify=crc32c --do_verify=0   # fill")
A("kiln rpc policy_force_tier '{\"tier\":\"cold\",\"wait\":true}'                     # timed")
A(f"fio --rw=randread --bs=4k --iodepth=1 --runtime=20 --norandommap                 # latency")
A(f"fio --rw=randread --bs=4k --iodepth=16 --runtime=10 --norandommap")
A(f"fio --rw=write --bs=1m --size={size}m --verify=crc32c --verify_only")
A("```")
A("")
A("The read latency is dominated by the server: moto is a Python process that serves each")
A("ranged GET of a 64 MiB multipart object in tens of ms (the curl baseline above); kiln")
A("adds the NBD hop, one message to the tier's runtime thread and the crc32c check of 64 KiB.")
section = "\n".join(L) + "\n"
path = "bench/RESULTS.md"
text = open(path).read()
b, e = "<!-- s3:begin -->", "<!-- s3:end -->"
if b not in text or e not in text:
    text = text.rstrip("\n") + f"\n\n{b}\n{e}\n"
i, j = text.index(b) + len(b), text.index(e)
text = text[:i] + "\n" + section + text[j:]
open(path, "w").write(text)
print(section)
print(f"demotion_mib_s={size/secs:.1f} read_p50_us={pct['50.000000']/1000:.0f} read_p99_us={pct['99.000000']/1000:.0f} mismatches={mism}")
EOF
