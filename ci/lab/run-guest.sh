#!/usr/bin/env bash
# shellcheck disable=SC2054 # QEMU option values contain commas
# Boot the lab guest with a test script and a payload (ci/lab/README.md).
#
#   ci/lab/run-guest.sh [--iommu] [--nvme IMG [--nvme-ns IMG]...] [--mem MIB]
#                       [--smp N] [--hugepages N] [--timeout S] [--log FILE]
#                       [--append ARGS] [--env K=V]... SCRIPT [PAYLOAD_DIR]
#
# Exits with the guest script's status (from the KILN-GUEST-EXIT=N console
# line), 124 when the guest ran past the timeout, 125 when it died without
# the marker (panic, failed boot).
set -euo pipefail
lab_dir=${LAB_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target/lab}

usage() {
  sed -n '3,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

iommu=0
nvme_img=""
nvme_ns=()
mem_mib=1024
smp=2
hugepages=""
timeout_s=300
log_file=""
append=""
envs=()
while [ $# -gt 0 ]; do
  case $1 in
    --iommu) iommu=1 ;;
    --nvme) nvme_img=$2; shift ;;
    --nvme-ns) nvme_ns+=("$2"); shift ;;
    --mem) mem_mib=$2; shift ;;
    --smp) smp=$2; shift ;;
    --hugepages) hugepages=$2; shift ;;
    --timeout) timeout_s=$2; shift ;;
    --log) log_file=$2; shift ;;
    --append) append=$2; shift ;;
    --env) envs+=("$2"); shift ;;
    -h | --help) usage ;;
    --*) echo "run-guest: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
script=$1
payload=${2:-}
[ -f "$script" ] || { echo "run-guest: no script $script" >&2; exit 2; }
[ -z "$payload" ] || [ -d "$payload" ] || { echo "run-guest: no payload dir $payload" >&2; exit 2; }
[ ${#nvme_ns[@]} -eq 0 ] || [ -n "$nvme_img" ] || { echo "run-guest: --nvme-ns needs --nvme" >&2; exit 2; }
[ -f "$lab_dir/ready" ] || { echo "run-guest: lab not prepared: run ci/lab/prepare.sh" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-lab.XXXXXX")
qemu_pid=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ -n "$log_file" ] || log_file=$work/console.log

# The payload: /test.sh, /payload/..., /lab/env; a second newc cpio appended
# to the base one, padded to 512 bytes (the kernel rejects it otherwise).
mkdir -p "$work/payload/payload" "$work/payload/lab"
install -m 0755 "$script" "$work/payload/test.sh"
[ -z "$payload" ] || cp -a "$payload/." "$work/payload/payload/"
: >"$work/payload/lab/env"
for kv in ${envs[@]+"${envs[@]}"}; do
  printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}" >>"$work/payload/lab/env"
done
(cd "$work/payload" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  "$lab_dir/cpio" --quiet -o -0 -H newc -R 0:0) >"$work/payload.cpio"
size=$(stat -c %s "$work/payload.cpio")
truncate -s $(((size + 511) / 512 * 512)) "$work/payload.cpio"
cat "$lab_dir/base.cpio" "$work/payload.cpio" >"$work/initrd"

# no_timer_check: on a loaded host TCG can miss the kernel's IO-APIC timer
# check, which with interrupt remapping (--iommu) is a panic ("timer doesn't
# work through Interrupt-remapped IO-APIC").
cmdline="console=ttyS0 panic=-1 quiet no_timer_check"
args=(-accel tcg -cpu max -smp "$smp" -m "$mem_mib" -nographic -no-reboot
  -kernel "$lab_dir/vmlinuz" -initrd "$work/initrd"
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=)
if [ $iommu -eq 1 ]; then
  # The IOMMU must come before the devices it translates for.
  args=(-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on
    "${args[@]}")
  cmdline+=" intel_iommu=on iommu=pt"
fi
if [ -n "$nvme_img" ]; then
  args+=(-drive "file=$nvme_img,if=none,id=nvm0,format=raw,cache=none,aio=threads"
    -device nvme,id=nvme0,serial=kiln-lab-nvme0,drive=nvm0)
  nsid=2
  for img in ${nvme_ns[@]+"${nvme_ns[@]}"}; do
    args+=(-drive "file=$img,if=none,id=nvm$nsid,format=raw,cache=none,aio=threads"
      -device "nvme-ns,drive=nvm$nsid,bus=nvme0,nsid=$nsid")
    nsid=$((nsid + 1))
  done
fi
[ -z "$hugepages" ] || cmdline+=" kiln.hugepages=$hugepages"
[ -z "$append" ] || cmdline+=" $append"
args+=(-append "$cmdline")

# The log exists before tail follows it (the redirection below runs in the child).
: >"$log_file"
t0=$(date +%s.%N)
timeout -k 5 "$timeout_s" "$lab_dir/qemu" "${args[@]}" </dev/null >"$log_file" 2>&1 &
qemu_pid=$!
tail -n +1 -f --pid="$qemu_pid" "$log_file" 2>/dev/null | tr -d '\r' &
tail_pid=$!
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
wait "$tail_pid" 2>/dev/null || true
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

# The last marker; kernel messages may share its line.
marker=$(tr -d '\r' <"$log_file" | sed -n 's/.*KILN-GUEST-EXIT=\([0-9][0-9]*\).*/\1/p' | tail -n1)
if [ $qemu_rc -eq 124 ] || [ $qemu_rc -eq 137 ]; then
  echo "run-guest: guest ran past ${timeout_s}s" >&2
  exit 124
fi
if [ -z "$marker" ]; then
  echo "run-guest: guest ended without KILN-GUEST-EXIT (panic or failed boot) after ${elapsed}s" >&2
  exit 125
fi
echo "run-guest: guest exit $marker, boot-test-poweroff ${elapsed}s"
exit "$marker"
