#!/bin/sh
# kiln's steps in issue 8's NVMe lab, part 2 of 2 (busybox ash). Copied into the
# payload as guest-verify.sh; ci/guest-nvme-test.sh sources it after kiln has
# exited and the controller is back on the kernel nvme driver (NVME_CTRL set).
#
#   4. the kernel reads back, from /dev/nvmeXn1 at 64 MiB, the marker kiln
#      wrote through VFIO (cmp against guest-run.sh's copy);
#   5. the shared block-device test bodies on ng:/dev/ngXn1 (first MiBs) and
#      ng:/dev/ngXn2, and kiln bench -w verify on ng:/dev/ngXn2 (io_uring
#      NVMe passthrough).
#
# Returns non-zero if any step failed.
ctrl=${NVME_CTRL:?NVME_CTRL not set}
. "${PAYLOAD:-/payload}/kiln-lib.sh"

kiln_marker_read() {
  [ -f /tmp/kiln-marker.bin ] || { echo "guest-run.sh wrote no marker"; return 1; }
  dd if="/dev/${ctrl}n1" of=/tmp/kiln-marker-back.bin bs=1M skip=64 count=1 iflag=direct \
    2>/dev/null || return 1
  cmp /tmp/kiln-marker.bin /tmp/kiln-marker-back.bin &&
    echo "the kernel nvme driver read back the 1 MiB kiln wrote through VFIO (/dev/${ctrl}n1 @ 64 MiB)"
}

ng=/dev/ng${ctrl#nvme}
echo "== kiln: nvme-passthru on ${ng}n1 and ${ng}n2"
kiln_step kiln-kernel-reads-marker kiln_marker_read
lab_wait_for "${ng}n2" || kiln_failed=$((kiln_failed + 1))
kiln_step kiln-ng-device-test-ns1 kiln device-test --device "ng:${ng}n1"
kiln_step kiln-ng-device-test-ns2 kiln device-test --device "ng:${ng}n2"
kiln_step kiln-ng-bench-verify-4k kiln_bench_verify "ng:${ng}n2" 4096 32
kiln_step kiln-ng-bench-verify-1m kiln_bench_verify "ng:${ng}n2" 1MiB 4
echo "kiln guest-verify: $kiln_failed step(s) failed"
[ $kiln_failed -eq 0 ]
