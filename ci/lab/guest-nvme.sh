#!/bin/sh
# Guest half of issue 8's NVMe tests (busybox ash), run by ci/guest-nvme-test.sh
# as /payload/guest-run.sh with NVME_BDF, VFIO_GROUP and PAYLOAD set and the
# controller bound to vfio-pci. Exits 0 only if every step passed:
#
#   1. the shared block-device test bodies on nvme:BDF (kiln device-test:
#      read/write/zeroes/trim/flush/bounds, QD32 with queue-full, 1 MiB I/O
#      through pool and heap buffers, and at least one command with a PRP list);
#   2. kiln bench -w verify on nvme:BDF (4 KiB QD32, then 1 MiB QD4);
#   3. kiln writes a random 1 MiB marker through VFIO and exits; the kernel
#      nvme driver re-binds and /dev/nvme0n1 reads the marker back (cmp);
#   4. the same bodies and bench verify on ng:/dev/ng0n1 (io_uring passthrough).
#
# KILN_VERIFY_S (default 5) sets the bench verify run time.
. /lab/lib.sh

bdf=${NVME_BDF:?NVME_BDF not set}
verify_s=${KILN_VERIFY_S:-5}
marker_mib=64
failed=0
export KILN_LOG=${KILN_LOG:-info}

step() {
  lab_step "$@" || failed=$((failed + 1))
}

kiln_bench_verify() {
  # $1 spec, $2 I/O size, $3 queue depth: exit 0 and zero mismatches.
  out=$(kiln bench --device "$1" -w verify -o "$2" -q "$3" -t "$verify_s" --cores 0 \
    --poll-mode busy 2>&1)
  rc=$?
  echo "$out"
  [ $rc -eq 0 ] && echo "$out" | grep -q "verify mismatches 0"
}

marker_write() {
  dd if=/dev/urandom of=/tmp/marker.bin bs=1M count=1 2>/dev/null &&
    kiln device-test --device "nvme:$bdf" --write-file /tmp/marker.bin \
      --offset "${marker_mib}MiB"
}

kernel_reads_marker() {
  lab_bind_kernel "$bdf" || return 1
  ctrl=$(ls "/sys/bus/pci/devices/$bdf/nvme" | head -n1)
  dev=/dev/${ctrl}n1
  dd if="$dev" of=/tmp/back.bin bs=1M skip=$marker_mib count=1 2>/dev/null || return 1
  cmp /tmp/marker.bin /tmp/back.bin && echo "kernel nvme driver read kiln's marker back from $dev"
}

ng_ready() {
  ctrl=$(ls "/sys/bus/pci/devices/$bdf/nvme" | head -n1)
  lab_wait_for "/dev/ng${ctrl#nvme}n1"
}

echo "== vfio-nvme on $bdf (group ${VFIO_GROUP:-?})"
step vfio_device_test kiln device-test --device "nvme:$bdf"
step vfio_bench_verify_4k kiln_bench_verify "nvme:$bdf" 4096 32
step vfio_bench_verify_1m kiln_bench_verify "nvme:$bdf" 1MiB 4
step vfio_marker_write marker_write
step kernel_rebind_reads_marker kernel_reads_marker

echo "== nvme-passthru"
if ng_ready; then
  ng=/dev/ng$(ls "/sys/bus/pci/devices/$bdf/nvme" | head -n1 | sed 's/^nvme//')n1
  step ng_device_test kiln device-test --device "ng:$ng"
  step ng_bench_verify_4k kiln_bench_verify "ng:$ng" 4096 32
  step ng_bench_verify_1m kiln_bench_verify "ng:$ng" 1MiB 4
else
  echo "LAB-STEP ng_device FAILED: no /dev/ngXn1"
  failed=$((failed + 1))
fi

if [ $failed -eq 0 ]; then
  echo "guest-nvme: all steps passed"
else
  echo "guest-nvme: $failed step(s) FAILED"
fi
exit $failed
