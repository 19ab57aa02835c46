#!/bin/sh
# Guest side of ci/guest-nvmf-test.sh (busybox ash, run as /test.sh): the
# Linux kernel NVMe/TCP initiator against the target at TARGET_ADDR:TARGET_PORT.
# With REFERENCE=1 the target is Linux's own nvmet, set up here through
# configfs on a RAM disk and listening on the guest's 127.0.0.1.
#
# Environment (from run-guest.sh --env): TARGET_ADDR TARGET_PORT SUBNQN MODEL
# SERIAL NS_SIZE_BYTES HOSTNQN HOSTID DENIED_HOSTNQN DENIED_HOSTID
# FIO_SIZE_MIB FIO_DIGESTS_SIZE_MIB (default FIO_SIZE_MIB) DIGEST_RUNS
# ("plain digests" by default) REFERENCE. Prints one LAB-STEP line per step; exits 0 only when all passed.
# shellcheck disable=SC2153 # the upper-case variables come from the environment
# shellcheck source=ci/lab/lib.sh
. /lab/lib.sh

fail() {
  echo "NVMF-TEST FAILED: $*"
  dmesg | tail -n 20
  exit 1
}
need() { eval "[ -n \"\${$1:-}\" ]" || fail "environment variable $1 is not set"; }
for v in TARGET_ADDR TARGET_PORT SUBNQN MODEL NS_SIZE_BYTES HOSTNQN HOSTID \
  DENIED_HOSTNQN DENIED_HOSTID FIO_SIZE_MIB; do
  need "$v"
done
DIGEST_RUNS=${DIGEST_RUNS:-plain digests}

# Linux's nvmet on a brd RAM disk: the cross-check for kiln's target.
reference_target() {
  lab_modprobe brd rd_nr=1 rd_size=$((NS_SIZE_BYTES / 1024)) max_part=0 || return 1
  lab_wait_for /dev/ram0 || return 1
  cfg=/sys/kernel/config/nvmet
  sub=$cfg/subsystems/$SUBNQN
  mkdir "$cfg/hosts/$HOSTNQN" "$sub" || return 1
  echo 0 >"$sub/attr_allow_any_host"
  echo "$MODEL" >"$sub/attr_model"
  echo "$SERIAL" >"$sub/attr_serial"
  ln -s "$cfg/hosts/$HOSTNQN" "$sub/allowed_hosts/" || return 1
  mkdir "$sub/namespaces/1"
  echo /dev/ram0 >"$sub/namespaces/1/device_path"
  echo 1 >"$sub/namespaces/1/enable" || return 1
  port=$cfg/ports/1
  mkdir "$port"
  echo tcp >"$port/addr_trtype"
  echo ipv4 >"$port/addr_adrfam"
  echo "$TARGET_ADDR" >"$port/addr_traddr"
  echo "$TARGET_PORT" >"$port/addr_trsvcid"
  ln -s "$sub" "$port/subsystems/" || return 1
}

# The controller (nvmeN) the initiator holds for SUBNQN, if any.
subsys_ctrl() {
  for c in /sys/class/nvme/nvme*; do
    [ -e "$c/subsysnqn" ] || continue
    [ "$(cat "$c/subsysnqn")" = "$SUBNQN" ] && { basename "$c"; return 0; }
  done
  return 1
}

discover() {
  out=$(nvme discover -t tcp -a "$TARGET_ADDR" -s "$TARGET_PORT" \
    --hostnqn="$HOSTNQN" --hostid="$HOSTID") || { echo "$out"; return 1; }
  echo "$out"
  echo "$out" | grep -q "subnqn: *$SUBNQN\$" || { echo "discovery log lacks $SUBNQN"; return 1; }
}

# connect [EXTRA nvme-connect FLAGS]: sets $ctrl and $dev.
connect() {
  nvme connect -t tcp -a "$TARGET_ADDR" -s "$TARGET_PORT" -n "$SUBNQN" \
    --hostnqn="$HOSTNQN" --hostid="$HOSTID" "$@" || return 1
  ctrl=$(subsys_ctrl) || { echo "no controller for $SUBNQN after connect"; return 1; }
  dev=/dev/${ctrl}n1
  lab_wait_for "$dev" || return 1
  echo "connected: $ctrl, $dev, transport $(cat "/sys/class/nvme/$ctrl/transport")," \
    "address $(cat "/sys/class/nvme/$ctrl/address")"
}

check_list() {
  nvme list || return 1
  json=$(nvme list -o json) || return 1
  echo "$json" | grep -q "\"DevicePath\" *: *\"$dev\"" || { echo "nvme list lacks $dev"; return 1; }
  model=$(sed 's/ *$//' "/sys/class/nvme/$ctrl/model")
  [ "$model" = "$MODEL" ] || { echo "model '$model', want '$MODEL'"; return 1; }
  echo "$json" | grep -q "\"ModelNumber\" *: *\"$MODEL *\"" ||
    { echo "nvme list does not show model '$MODEL'"; return 1; }
  size=$(($(cat "/sys/block/${dev#/dev/}/size") * 512))
  [ "$size" = "$NS_SIZE_BYTES" ] || { echo "size $size, want $NS_SIZE_BYTES"; return 1; }
  echo "$json" | grep -Eq "\"PhysicalSize\" *: *$NS_SIZE_BYTES([^0-9]|\$)" ||
    { echo "nvme list does not show size $NS_SIZE_BYTES"; return 1; }
  echo "model '$model', size $size bytes"
}

check_id_ctrl() {
  out=$(nvme id-ctrl "/dev/$ctrl") || return 1
  echo "$out" | grep -E '^(vid|sn|mn|fr|mdts|cntlid|ver|kas|sqes|cqes|maxcmd|nn|oncs|vwc|sgls|subnqn|ioccsz|iorcsz|icdoff|cntrltype) '
  echo "$out" | grep -q "^subnqn *: $SUBNQN\$" || { echo "id-ctrl subnqn is not $SUBNQN"; return 1; }
  echo "$out" | grep -q "^mn *: $MODEL *\$" || { echo "id-ctrl mn is not $MODEL"; return 1; }
}

# fio_verify SIZE_MIB: randrw (60% writes) over the first SIZE_MIB MiB with
# crc32c verify; at least half of SIZE_MIB written.
fio_verify() {
  size_mib=$1
  out=$(fio --name=kiln-lab --filename="$dev" --ioengine=libaio --direct=1 \
    --rw=randrw --rwmixwrite=60 --bsrange=4k-64k --iodepth=16 \
    --size="${size_mib}M" --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output-format=terse 2>&1)
  rc=$?
  terse=$(echo "$out" | grep '^3;fio-')
  echo "$out" | grep -v '^3;fio-'
  [ $rc -eq 0 ] || { echo "fio exit $rc"; return 1; }
  err=$(echo "$terse" | cut -d';' -f5)
  read_kib=$(echo "$terse" | cut -d';' -f6)
  write_kib=$(echo "$terse" | cut -d';' -f47)
  echo "fio: error=$err read=$((read_kib / 1024)) MiB (with verify) written=$((write_kib / 1024)) MiB"
  [ "$err" = 0 ] || return 1
  [ $((write_kib / 1024)) -ge $((size_mib / 2)) ] ||
    { echo "fio wrote less than $((size_mib / 2)) MiB"; return 1; }
}

disconnect() {
  nvme disconnect -n "$SUBNQN" || return 1
  if subsys_ctrl >/dev/null; then
    echo "controller for $SUBNQN still present after disconnect"
    return 1
  fi
  [ ! -e "$dev" ] || { echo "$dev still present after disconnect"; return 1; }
}

# A host NQN not on the allow-list must be refused and leave no controller.
denied_connect() {
  if nvme connect -t tcp -a "$TARGET_ADDR" -s "$TARGET_PORT" -n "$SUBNQN" \
    --hostnqn="$DENIED_HOSTNQN" --hostid="$DENIED_HOSTID"; then
    echo "connect as $DENIED_HOSTNQN was accepted"
    nvme disconnect -n "$SUBNQN"
    return 1
  fi
  if subsys_ctrl >/dev/null; then
    echo "a controller for $SUBNQN exists after the refused connect"
    return 1
  fi
  echo "refused, as it must be"
}

if [ "${REFERENCE:-0}" = 1 ]; then
  lab_step reference-nvmet-setup reference_target || fail "nvmet set-up"
fi
lab_step discover discover || fail "nvme discover"
for run in $DIGEST_RUNS; do
  case $run in
    plain) flags="" size_mib=$FIO_SIZE_MIB ;;
    digests) flags="-g -G" size_mib=${FIO_DIGESTS_SIZE_MIB:-$FIO_SIZE_MIB} ;;
    *) fail "unknown digest run '$run'" ;;
  esac
  # shellcheck disable=SC2086 # $flags is a word list
  lab_step "connect-$run" connect $flags || fail "nvme connect ($run)"
  lab_step "list-$run" check_list || fail "nvme list ($run)"
  lab_step "id-ctrl-$run" check_id_ctrl || fail "nvme id-ctrl ($run)"
  lab_step "fio-verify-$run" fio_verify "$size_mib" || fail "fio verify ($run)"
  lab_step "disconnect-$run" disconnect || fail "nvme disconnect ($run)"
done
lab_step denied-host denied_connect || fail "connect from a host not on the allow-list"
echo "NVMF-TEST PASSED"
