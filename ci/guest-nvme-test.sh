#!/usr/bin/env bash
# The NVMe guest lab (issue 8): QEMU's emulated NVMe controller on a raw image,
# behind a virtual IOMMU (q35 + intel-iommu), in the ci/lab guest. The guest
# checks /dev/ng0n1 and fio io_uring_cmd, writes a reference pattern, rebinds
# the controller to vfio-pci (driver_override + drivers_probe; /dev/vfio/N
# appears), runs PAYLOAD/guest-run.sh (statically linked kiln test binaries),
# rebinds it to the kernel nvme driver, reads the pattern back and runs
# PAYLOAD/guest-verify.sh. Exits 0 only when every step passed.
#
#   ci/guest-nvme-test.sh [--payload DIR | --no-kiln]
#
# Without --payload it builds kiln's payload (ci/lab/nvme-payload.sh: the release
# binary, its libraries and the guest scripts that run kiln's device tests and
# verify benches on nvme:BDF and ng:/dev/ngXnY). --no-kiln runs the lab steps only.
#
# The payload contract is in ci/lab/README.md. Environment: LAB_DIR,
# NVME_IMG_MIB (default 1024), HUGEPAGES (2 MiB pages, default 64),
# LAB_TIMEOUT_S (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."

payload=""
no_kiln=0
while [ $# -gt 0 ]; do
  case $1 in
    --payload) payload=$2; shift ;;
    --no-kiln) no_kiln=1 ;;
    *) echo "usage: $0 [--payload DIR | --no-kiln]" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$payload" ] && [ ! -f "$payload/guest-run.sh" ]; then
  echo "payload $payload has no guest-run.sh" >&2
  exit 2
fi

ci/lab/prepare.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-nvme-lab.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$payload" ] && [ $no_kiln -eq 0 ]; then
  payload=$work/payload
  ci/lab/nvme-payload.sh "$payload"
fi
# Sparse raw images: namespace 1 and a second namespace.
truncate -s "${NVME_IMG_MIB:-1024}M" "$work/ns1.img"
truncate -s 256M "$work/ns2.img"
[ -n "$payload" ] || mkdir "$work/empty-payload"

rc=0
ci/lab/run-guest.sh --iommu --nvme "$work/ns1.img" --nvme-ns "$work/ns2.img" \
  --mem 1536 --hugepages "${HUGEPAGES:-64}" --timeout "${LAB_TIMEOUT_S:-600}" \
  ci/lab/guest-nvme.sh "${payload:-$work/empty-payload}" || rc=$?
if [ $rc -eq 0 ]; then echo "== nvme lab: PASSED"; else echo "== nvme lab: FAILED ($rc)"; fi
exit $rc
