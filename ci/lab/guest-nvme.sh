#!/bin/sh
# Guest side of ci/guest-nvme-test.sh (busybox ash, run as /test.sh): QEMU's
# emulated NVMe controller behind the virtual IOMMU. Checks the kernel's view
# (/dev/nvme0n1, /dev/ng0n1, fio io_uring_cmd), writes a reference pattern into
# the last MiB of namespace 1, rebinds the controller to vfio-pci, runs the
# payload's guest-run.sh, rebinds it to the kernel nvme driver, reads the
# pattern back and runs the payload's guest-verify.sh. Exits 0 only when every
# step passed.
# shellcheck source=ci/lab/lib.sh
. /lab/lib.sh

fail() {
  echo "NVME-TEST FAILED: $*"
  dmesg | tail -n 20
  exit 1
}

bdf=""
ctrl=""
ns_bytes=0
reserved_offset=0
pattern=/tmp/lab-pattern

find_controller() {
  bdf=$(lab_nvme_bdf) || { echo "no NVMe PCI function"; return 1; }
  [ -d "/sys/kernel/iommu_groups/$(lab_iommu_group "$bdf")" ] ||
    { echo "$bdf has no IOMMU group (is the virtual IOMMU on?)"; return 1; }
  lab_wait_for "/sys/bus/pci/devices/$bdf/nvme" || return 1
  ctrl=$(lab_nvme_ctrl "$bdf") || return 1
  lab_wait_for "/dev/${ctrl}n1" || return 1
  lab_wait_for "/dev/ng${ctrl#nvme}n1" || return 1
  ns_bytes=$(($(cat "/sys/block/${ctrl}n1/size") * 512))
  reserved_offset=$((ns_bytes - 1048576))
  echo "controller $bdf ($ctrl, $(sed 's/ *$//' "/sys/class/nvme/$ctrl/model")), IOMMU group" \
    "$(lab_iommu_group "$bdf"), namespace 1: $ns_bytes bytes"
  ls /dev/nvme* /dev/ng*
}

# fio through io_uring NVMe passthrough on the generic char device.
fio_uring_cmd() {
  fio --name=ng --filename="/dev/ng${ctrl#nvme}n1" --ioengine=io_uring_cmd --cmd_type=nvme \
    --rw=randwrite --bs=4k --iodepth=16 --size=16M --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output-format=terse |
    awk -F';' '/^3;fio-/ { printf "fio io_uring_cmd: error=%s written=%d KiB\n", $5, $47; exit ($5 != 0) }'
}

write_pattern() {
  dd if=/dev/urandom of="$pattern" bs=1M count=1 2>/dev/null &&
    dd if="$pattern" of="/dev/${ctrl}n1" bs=1M seek=$((reserved_offset / 1048576)) \
      oflag=direct conv=fsync 2>/dev/null
}

bind_vfio() {
  lab_bind_vfio "$bdf" || return 1
  [ ! -e "/dev/${ctrl}n1" ] || { echo "/dev/${ctrl}n1 still present under vfio-pci"; return 1; }
  echo "$bdf bound to vfio-pci: /dev/vfio/$(lab_iommu_group "$bdf")"
  ls -l /dev/vfio
}

payload_run() {
  NVME_BDF=$bdf VFIO_GROUP=$(lab_iommu_group "$bdf") PAYLOAD=/payload \
    NVME_CTRL=$ctrl NVME_NS_BYTES=$ns_bytes LAB_RESERVED_OFFSET=$reserved_offset \
    sh -c '. /lab/lib.sh; . "$0"' "/payload/$1"
}

bind_kernel() {
  lab_bind_kernel "$bdf" || return 1
  ctrl=$(lab_nvme_ctrl "$bdf") || return 1
  echo "$bdf back on the nvme driver: /dev/${ctrl}n1"
}

read_pattern() {
  dd if="/dev/${ctrl}n1" of=/tmp/lab-readback bs=1M skip=$((reserved_offset / 1048576)) \
    count=1 iflag=direct 2>/dev/null || return 1
  cmp "$pattern" /tmp/lab-readback || { echo "the pattern did not read back"; return 1; }
  echo "1 MiB pattern at offset $reserved_offset read back through the kernel driver"
}

lab_step find-controller find_controller || fail "controller not found"
lab_step fio-io-uring-cmd fio_uring_cmd || fail "fio io_uring_cmd on the ng device"
lab_step write-pattern write_pattern || fail "writing the reference pattern"
lab_step bind-vfio bind_vfio || fail "rebinding to vfio-pci"
if [ -f /payload/guest-run.sh ]; then
  lab_step guest-run payload_run guest-run.sh || fail "payload guest-run.sh"
else
  echo "no guest-run.sh in the payload: lab checks only"
fi
lab_step bind-kernel bind_kernel || fail "rebinding to the kernel nvme driver"
lab_step read-pattern read_pattern || fail "reading the reference pattern back"
if [ -f /payload/guest-verify.sh ]; then
  lab_step guest-verify payload_run guest-verify.sh || fail "payload guest-verify.sh"
fi
echo "NVME-TEST PASSED"
