#!/bin/sh
# kiln's steps in issue 8's NVMe lab, part 1 of 2 (busybox ash). Copied into the
# payload as guest-run.sh by ci/lab/nvme-payload.sh; ci/guest-nvme-test.sh
# sources it with the controller bound to vfio-pci and NVME_BDF, VFIO_GROUP,
# NVME_NS_BYTES and LAB_RESERVED_OFFSET set (the last MiB of namespace 1 holds
# the lab's own pattern, so nothing here writes there). Steps:
#
#   1. the shared block-device test bodies on nvme:BDF (kiln device-test:
#      read/write/zeroes/trim/flush/bounds, QD32 with queue-full, 1 MiB I/O
#      through pool and heap buffers, at least one command with a PRP list),
#      on namespace 1 (first MiBs) and namespace 2;
#   2. kiln bench -w verify on nvme:BDF?ns=2 (whole namespace; 4 KiB QD32,
#      then 1 MiB QD4);
#   3. kiln writes a random 1 MiB marker at 64 MiB of namespace 1 through
#      VFIO and exits; guest-verify.sh checks the kernel driver reads it back.
#
# Returns non-zero if any step failed. KILN_VERIFY_S (default 5): bench time.
bdf=${NVME_BDF:?NVME_BDF not set}
. "${PAYLOAD:-/payload}/kiln-lib.sh"

kiln_marker_write() {
  dd if=/dev/urandom of=/tmp/kiln-marker.bin bs=1M count=1 2>/dev/null &&
    kiln device-test --device "nvme:$bdf?ns=1" --write-file /tmp/kiln-marker.bin \
      --offset 64MiB
}

echo "== kiln: vfio-nvme on $bdf (IOMMU group ${VFIO_GROUP:-?})"
kiln_step kiln-vfio-device-test-ns1 kiln device-test --device "nvme:$bdf"
kiln_step kiln-vfio-device-test-ns2 kiln device-test --device "nvme:$bdf?ns=2"
kiln_step kiln-vfio-bench-verify-4k kiln_bench_verify "nvme:$bdf?ns=2" 4096 32
kiln_step kiln-vfio-bench-verify-1m kiln_bench_verify "nvme:$bdf?ns=2" 1MiB 4
kiln_step kiln-vfio-marker-write kiln_marker_write
echo "kiln guest-run: $kiln_failed step(s) failed"
[ $kiln_failed -eq 0 ]
