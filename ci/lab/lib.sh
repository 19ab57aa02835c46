# Shell helpers for guest scripts of the kiln lab (busybox ash). /init sources
# this file and so do test scripts: `. /lab/lib.sh`.

lab_log() { echo "lab: $*"; }

# Seconds since boot with two decimals.
lab_uptime() { cut -d' ' -f1 /proc/uptime; }

# lab_step NAME CMD...: runs CMD, prints one line with the result and the time.
lab_step() {
  _name=$1
  shift
  _t0=$(lab_uptime)
  "$@"
  _rc=$?
  _t1=$(lab_uptime)
  _dt=$(awk -v a="$_t0" -v b="$_t1" 'BEGIN { printf "%.2f", b - a }')
  if [ $_rc -eq 0 ]; then
    echo "LAB-STEP $_name ok ${_dt}s"
  else
    echo "LAB-STEP $_name FAILED rc=$_rc ${_dt}s"
  fi
  return $_rc
}

# lab_modprobe NAME [PARAM=VALUE...]: loads a module the initramfs carries,
# with its dependencies (no-op when loaded or built in).
lab_modprobe() {
  _m=$(echo "$1" | tr - _)
  shift
  [ -d "/sys/module/$_m" ] && return 0
  grep -Eq "/${_m}\.ko\$|/$(echo "$_m" | tr _ -)\.ko\$" "/lib/modules/$(uname -r)/modules.builtin" &&
    return 0
  modprobe "$_m" "$@"
}

# lab_wait_for PATH [SECONDS]: polls (100 ms) until PATH exists; fails after
# SECONDS (default 10).
lab_wait_for() {
  _n=$((${2:-10} * 10))
  while [ ! -e "$1" ]; do
    _n=$((_n - 1))
    [ $_n -le 0 ] && { lab_log "timed out waiting for $1"; return 1; }
    sleep 0.1
  done
}

# PCI address of the first NVMe controller (class 0x010802).
lab_nvme_bdf() {
  for _d in /sys/bus/pci/devices/*; do
    [ "$(cat "$_d/class")" = 0x010802 ] && { basename "$_d"; return 0; }
  done
  return 1
}

# The kernel's controller (nvmeN) for the PCI function BDF.
lab_nvme_ctrl() {
  for _c in "/sys/bus/pci/devices/$1/nvme/"nvme*; do
    [ -e "$_c" ] && { basename "$_c"; return 0; }
  done
  return 1
}

lab_iommu_group() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }

# lab_unbind BDF: detaches whatever driver holds the function.
lab_unbind() {
  [ -e "/sys/bus/pci/devices/$1/driver" ] &&
    echo "$1" >"/sys/bus/pci/devices/$1/driver/unbind"
  return 0
}

# lab_bind_vfio BDF: hands the function to vfio-pci; /dev/vfio/GROUP appears.
lab_bind_vfio() {
  lab_modprobe vfio_iommu_type1 || return 1
  lab_modprobe vfio_pci || return 1
  lab_unbind "$1"
  echo vfio-pci >"/sys/bus/pci/devices/$1/driver_override"
  echo "$1" >/sys/bus/pci/drivers_probe
  [ "$(basename "$(readlink "/sys/bus/pci/devices/$1/driver")")" = vfio-pci ] || {
    lab_log "$1 did not bind to vfio-pci"
    return 1
  }
  lab_wait_for "/dev/vfio/$(lab_iommu_group "$1")"
}

# lab_bind_kernel BDF: hands the function back to the kernel nvme driver and
# waits for its first namespace block device.
lab_bind_kernel() {
  lab_unbind "$1"
  echo >"/sys/bus/pci/devices/$1/driver_override"
  echo "$1" >/sys/bus/pci/drivers_probe
  [ "$(basename "$(readlink "/sys/bus/pci/devices/$1/driver")")" = nvme ] || {
    lab_log "$1 did not bind to nvme"
    return 1
  }
  lab_wait_for "/sys/bus/pci/devices/$1/nvme" || return 1
  _ctrl=$(lab_nvme_ctrl "$1") || return 1
  lab_wait_for "/dev/${_ctrl}n1"
}
