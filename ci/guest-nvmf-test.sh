#!/usr/bin/env bash
# The NVMe/TCP initiator lab (issue 7, acceptance 1, 3 and 5): the Linux
# kernel initiator in a QEMU guest (ci/lab) against kiln's NVMe/TCP target on
# the host's 127.0.0.1, reached from the guest as 10.0.2.2. The guest runs
# nvme discover, nvme connect (plain, then with header and data digests),
# nvme list, nvme id-ctrl, a 512 MiB fio randrw crc32c verify run (>= 256 MiB
# written) and nvme disconnect, and checks that a host NQN not on the
# allow-list is refused. Exits 0 only when every step passed.
#
#   ci/guest-nvmf-test.sh               # against kiln (builds it if needed)
#   ci/guest-nvmf-test.sh --reference   # against Linux's nvmet inside the guest
#   ci/guest-nvmf-test.sh --check       # only `kiln serve --check` the config
#
# Environment: NVMF_PORT (default 4420), LAB_DIR, KILN_BIN (default
# target/release/kiln), LAB_TIMEOUT_S (default 600), DIGEST_RUNS
# ("plain digests"), FIO_SIZE_MIB (512), FIO_DIGESTS_SIZE_MIB (FIO_SIZE_MIB):
# the verify runs' sizes without and with digests.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

reference=0
check_only=0
case ${1:-} in
  --reference) reference=1 ;;
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--reference | --check]" >&2; exit 2 ;;
esac

port=${NVMF_PORT:-4420}
subnqn=nqn.2026-01.dev.kiln:lab-subsystem
model="kiln lab"
serial=KILNLAB0001
ns_size_mib=512
fio_size_mib=${FIO_SIZE_MIB:-512}
hostnqn=nqn.2026-01.dev.kiln:lab-host
hostid=2b1c1f42-7a6e-4b0e-9a53-6c6b1e6a0001
denied_hostnqn=nqn.2026-01.dev.kiln:lab-intruder
denied_hostid=2b1c1f42-7a6e-4b0e-9a53-6c6b1e6a0002

[ $check_only -eq 1 ] || ci/lab/prepare.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-nvmf-lab.XXXXXX")
kiln_pid=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [ -n "$kiln_pid" ]; then
    kill -TERM "$kiln_pid" 2>/dev/null || true
    wait "$kiln_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ $reference -eq 1 ]; then
  target_addr=127.0.0.1
  mem_mib=1536
  echo "== nvmf lab: reference target (Linux nvmet in the guest)"
else
  kiln=${KILN_BIN:-$repo/target/release/kiln}
  if [ -z "${KILN_BIN:-}" ]; then
    echo "== cargo build --release"
    cargo build --release --quiet
  fi
  sed -e "s|@DIR@|$work|g" -e "s|@PORT@|$port|g" -e "s|@SUBNQN@|$subnqn|g" \
    -e "s|@MODEL@|$model|g" -e "s|@SERIAL@|$serial|g" -e "s|@HOSTNQN@|$hostnqn|g" \
    -e "s|@NS_SIZE@|${ns_size_mib}MiB|g" -e "s|@TIER_SIZE@|$((ns_size_mib + 256))MiB|g" \
    ci/lab/kiln-nvmf.toml >"$work/kiln.toml"
  if [ $check_only -eq 1 ]; then
    "$kiln" serve --check --config "$work/kiln.toml"
    exit
  fi
  echo "== kiln serve on 127.0.0.1:$port"
  "$kiln" serve --config "$work/kiln.toml" >"$work/kiln.log" 2>&1 &
  kiln_pid=$!
  # Wait for the listener (or for kiln to die).
  for _ in $(seq 300); do
    kill -0 "$kiln_pid" 2>/dev/null || {
      cat "$work/kiln.log" >&2
      echo "kiln serve exited before listening on 127.0.0.1:$port" >&2
      exit 1
    }
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
    { cat "$work/kiln.log" >&2; echo "kiln is not listening on 127.0.0.1:$port" >&2; exit 1; }
  target_addr=10.0.2.2
  mem_mib=1024
fi

rc=0
ci/lab/run-guest.sh --mem "$mem_mib" --timeout "${LAB_TIMEOUT_S:-600}" \
  --env REFERENCE=$reference --env TARGET_ADDR=$target_addr --env TARGET_PORT="$port" \
  --env SUBNQN=$subnqn --env MODEL="$model" --env SERIAL=$serial \
  --env NS_SIZE_BYTES=$((ns_size_mib * 1048576)) \
  --env HOSTNQN=$hostnqn --env HOSTID=$hostid \
  --env DENIED_HOSTNQN=$denied_hostnqn --env DENIED_HOSTID=$denied_hostid \
  --env FIO_SIZE_MIB="$fio_size_mib" \
  --env FIO_DIGESTS_SIZE_MIB="${FIO_DIGESTS_SIZE_MIB:-$fio_size_mib}" \
  --env DIGEST_RUNS="${DIGEST_RUNS:-plain digests}" \
  ci/lab/guest-nvmf.sh || rc=$?
if [ $rc -ne 0 ] && [ -n "$kiln_pid" ]; then
  echo "== kiln log (last 40 lines)" >&2
  tail -n 40 "$work/kiln.log" >&2
fi
if [ $rc -eq 0 ]; then echo "== nvmf lab: PASSED"; else echo "== nvmf lab: FAILED ($rc)"; fi
exit $rc
