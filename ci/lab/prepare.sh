#!/usr/bin/env bash
# Prepare the QEMU guest lab (see ci/lab/README.md): download Debian packages
# with `apt-get download`, extract them with `dpkg-deb -x` (nothing is
# installed on the host) and build the base initramfs.
#
#   ci/lab/prepare.sh        # LAB_DIR=target/lab by default
#
# Idempotent: .debs are cached in $LAB_DIR/debs, and when the stamp
# $LAB_DIR/ready matches this script and the guest files the run ends at once.
set -euo pipefail
cd "$(dirname "$0")/../.."
src_dir=$PWD/ci/lab
lab_dir=${LAB_DIR:-target/lab}
mkdir -p "$lab_dir"
lab_dir=$(cd "$lab_dir" && pwd)
debs_dir=$lab_dir/debs
root_dir=$lab_dir/root

# Kernel modules the guest loads, in this order (dependencies from modules.dep
# come first). "?" marks optional ones: missing is a warning, not an error.
modules_wanted=(
  virtio_pci virtio_net configfs crc32c_generic crc32c_intel? libcrc32c
  nvme_core nvme nvme_fabrics nvme_tcp nvmet nvmet_tcp brd? null_blk?
  vfio vfio_iommu_type1 vfio_pci loop?
)
# Guest binaries (from the extracted packages) and the packages they come from.
guest_packages=(busybox-static nvme-cli fio)
host_packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios cpio kmod)

log() { printf '== lab: %s\n' "$*"; }
die() { printf 'lab prepare: %s\n' "$*" >&2; exit 1; }

stamp_now() {
  cat "$src_dir/prepare.sh" "$src_dir/init" "$src_dir/lib.sh" | sha256sum | cut -d' ' -f1
}
if [ -f "$lab_dir/ready" ] && [ "$(cat "$lab_dir/ready")" = "$(stamp_now)" ]; then
  log "ready ($lab_dir)"
  exit 0
fi
rm -f "$lab_dir/ready"

# Packages installed on the host, read once (dpkg-query per package is slow).
declare -A host_installed=()
while read -r pkg status; do
  [ "$status" = installed ] && host_installed[${pkg%%:*}]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n')

# The package lists are needed for apt-cache and apt-get download.
if ! apt-cache show qemu-system-x86 >/dev/null 2>&1; then
  log "apt-get update (package lists missing)"
  apt-get update -qq
fi

# The given packages plus their library dependencies that the host lacks,
# recursively; one apt-cache call per level. Only lib* packages are followed:
# the lab needs shared objects, not tools.
missing_closure() {
  local -A seen=()
  local -a level=("$@") next
  local pkg line alt chosen
  local -a group
  while [ ${#level[@]} -gt 0 ]; do
    for pkg in "${level[@]}"; do seen[$pkg]=1; echo "$pkg"; done
    next=()
    group=()
    while IFS= read -r line; do
      # "|Depends: a" means "a or the next line"; collect the alternatives.
      case $line in
        *'|Depends:'* | *'|PreDepends:'*) group+=("${line##*: }"); continue ;;
        *Depends:*) group+=("${line##*: }") ;;
        *) continue ;;
      esac
      chosen=""
      for alt in "${group[@]}"; do
        case $alt in '<'*) continue ;; esac
        if [ -n "${host_installed[$alt]:-}" ]; then chosen=""; break; fi
        [ -z "$chosen" ] && chosen=$alt
      done
      group=()
      case $chosen in lib*) ;; *) continue ;; esac
      [ -z "${seen[$chosen]:-}" ] && { seen[$chosen]=1; next+=("$chosen"); }
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances "${level[@]}" 2>/dev/null)
    level=(${next[@]+"${next[@]}"})
  done
}

# The cached .deb of PKG, downloaded when missing.
deb_of() {
  local pkg=$1 deb
  deb=$(find "$debs_dir" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
  if [ -z "$deb" ]; then
    (cd "$debs_dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) ||
      die "apt-get download $pkg failed"
    deb=$(find "$debs_dir" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $debs_dir"
  fi
  echo "$deb"
}

mkdir -p "$debs_dir"

# The kernel: the cloud meta-package names the versioned image package.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"

mapfile -t packages < <(
  missing_closure "${host_packages[@]}" "${guest_packages[@]}" | sort -u
)
packages+=("$kernel_pkg")
debs=()
for pkg in "${packages[@]}"; do
  debs+=("$(deb_of "$pkg")")
done
# Extract again only when the set of .debs changed.
extracted_key=$(printf '%s\n' "${debs[@]}" | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
if [ "$(cat "$root_dir/.extracted" 2>/dev/null || true)" != "$extracted_key" ]; then
  log "extracting ${#debs[@]} packages into $root_dir"
  rm -rf "$root_dir"
  mkdir -p "$root_dir"
  for deb in "${debs[@]}"; do
    dpkg-deb -x "$deb" "$root_dir"
  done
  echo "$extracted_key" >"$root_dir/.extracted"
fi

lib_path=$root_dir/usr/lib/x86_64-linux-gnu:$root_dir/lib/x86_64-linux-gnu

# QEMU: a wrapper with the extracted libraries and firmware. Debian's
# /usr/share/qemu links to other packages' files with absolute links; point
# them into root/.
qemu_bin=$root_dir/usr/bin/qemu-system-x86_64
[ -x "$qemu_bin" ] || die "qemu-system-x86_64 missing after extraction"
firmware_dir=$lab_dir/firmware
rm -rf "$firmware_dir"
mkdir -p "$firmware_dir"
for f in "$root_dir"/usr/share/qemu/* "$root_dir"/usr/share/seabios/*; do
  name=$(basename "$f")
  [ -e "$firmware_dir/$name" ] && continue
  target=$f
  if [ -L "$f" ]; then
    target=$(readlink "$f")
    case $target in /*) target=$root_dir$target ;; *) target=$(dirname "$f")/$target ;; esac
  fi
  [ -e "$target" ] && ln -s "$target" "$firmware_dir/$name"
done
[ -e "$firmware_dir/bios-256k.bin" ] || die "bios-256k.bin missing (seabios not extracted?)"
cat >"$lab_dir/qemu" <<EOF
#!/bin/sh
# Generated by ci/lab/prepare.sh: QEMU from the extracted Debian packages.
LD_LIBRARY_PATH=$lib_path\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} \\
  exec $qemu_bin -L $firmware_dir "\$@"
EOF
chmod +x "$lab_dir/qemu"
if LD_LIBRARY_PATH=$lib_path ldd "$qemu_bin" | grep -q 'not found'; then
  LD_LIBRARY_PATH=$lib_path ldd "$qemu_bin" | grep 'not found' >&2
  die "qemu-system-x86_64 still lacks libraries"
fi
log "$("$lab_dir/qemu" --version | head -n1)"

# The kernel and its modules.
kernel_version=${kernel_pkg#linux-image-}
ln -sf "$root_dir/boot/vmlinuz-$kernel_version" "$lab_dir/vmlinuz"
modules_dir=$root_dir/lib/modules/$kernel_version
# modules.dep is written by the package's postinst; run the extracted depmod.
LD_LIBRARY_PATH=$lib_path bash -c 'exec -a depmod "$0" -b "$1" "$2"' \
  "$root_dir/bin/kmod" "$root_dir" "$kernel_version" || die "depmod failed"
[ -f "$modules_dir/modules.dep" ] || die "no modules.dep in $modules_dir"

# Build the initramfs tree.
initrd_dir=$lab_dir/initrd
rm -rf "$initrd_dir"
mkdir -p "$initrd_dir"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc/nvme,lab}
mkdir -p "$initrd_dir"/{proc,sys,dev,tmp,run,mnt,payload}
cp "$root_dir/bin/busybox" "$initrd_dir/bin/busybox"
for applet in $("$initrd_dir/bin/busybox" --list-full); do
  [ -e "$initrd_dir/$applet" ] || ln -s /bin/busybox "$initrd_dir/$applet"
done
install -m 0755 "$src_dir/init" "$initrd_dir/init"
install -m 0644 "$src_dir/lib.sh" "$initrd_dir/lab/lib.sh"
echo "root:x:0:0:root:/:/bin/sh" >"$initrd_dir/etc/passwd"
echo "root:x:0:" >"$initrd_dir/etc/group"

# nvme-cli and fio with every shared object they load (from root/ or the host).
for tool in usr/sbin/nvme usr/bin/fio; do
  [ -x "$root_dir/$tool" ] || die "$tool missing after extraction"
  cp "$root_dir/$tool" "$initrd_dir/usr/bin/"
  ldd_out=$(LD_LIBRARY_PATH=$lib_path ldd "$root_dir/$tool")
  if grep -q 'not found' <<<"$ldd_out"; then
    grep 'not found' <<<"$ldd_out" >&2
    die "$tool lacks libraries"
  fi
  while read -r lib; do
    cp -L "$lib" "$initrd_dir/lib/x86_64-linux-gnu/"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$ldd_out")
done
cp -L /lib64/ld-linux-x86-64.so.2 "$initrd_dir/lib64/"

# Modules: resolve each wanted module and its dependencies from modules.dep,
# dependencies first, each once. Built-in modules need nothing.
declare -A module_path=()
while IFS= read -r line; do
  rel=${line%%:*}
  name=$(basename "$rel")
  name=${name%%.ko*}
  module_path[${name//-/_}]=$line
done <"$modules_dir/modules.dep"
declare -A module_loaded=()
module_order=()
add_module() {
  local name=${1//-/_} line rel dep
  [ -n "${module_loaded[$name]:-}" ] && return 0
  module_loaded[$name]=1
  line=${module_path[$name]:-}
  if [ -z "$line" ]; then
    grep -Eq "/${name//_/[-_]}\.ko" "$modules_dir/modules.builtin" && return 0
    return 1
  fi
  rel=${line%%:*}
  for dep in ${line#*:}; do
    dep=$(basename "$dep")
    add_module "${dep%%.ko*}" || die "module dependency $dep missing"
  done
  module_order+=("$rel")
}
for wanted in "${modules_wanted[@]}"; do
  name=${wanted%\?}
  if ! add_module "$name"; then
    [ "$name" != "$wanted" ] || die "kernel module $name is neither in modules.dep nor built in"
    log "optional module $name not available"
  fi
done
# The modules keep their paths under /lib/modules/VERSION, with modules.dep
# and modules.alias cut down to them, so busybox modprobe (and the kernel's
# request_module) load them with their dependencies.
guest_modules_dir=$initrd_dir/lib/modules/$kernel_version
mkdir -p "$guest_modules_dir"
declare -A module_kept=()
for rel in "${module_order[@]}"; do
  mkdir -p "$guest_modules_dir/$(dirname "$rel")"
  case $rel in
    *.ko) cp "$modules_dir/$rel" "$guest_modules_dir/$rel" ;;
    *) die "compressed module $rel: teach prepare.sh to unpack it" ;;
  esac
  name=$(basename "$rel" .ko)
  module_kept[${name//-/_}]=1
done
for rel in "${module_order[@]}"; do
  grep "^$rel:" "$modules_dir/modules.dep"
done >"$guest_modules_dir/modules.dep"
while read -r _ alias module; do
  [ -n "${module_kept[${module//-/_}]:-}" ] && echo "alias $alias $module"
done < <(grep '^alias ' "$modules_dir/modules.alias") >"$guest_modules_dir/modules.alias" || true
cp "$modules_dir/modules.builtin" "$guest_modules_dir/"
log "modules: $(for rel in "${module_order[@]}"; do basename "$rel" .ko; done | tr '\n' ' ')"

# The cpio (newc, uncompressed: TCG decompresses slowly), padded to 512 bytes.
cpio_bin=$root_dir/bin/cpio
[ -x "$cpio_bin" ] || die "cpio missing after extraction"
(cd "$initrd_dir" && find . -print0 | LC_ALL=C sort -z |
  "$cpio_bin" --quiet -o -0 -H newc -R 0:0) >"$lab_dir/base.cpio.tmp"
size=$(stat -c %s "$lab_dir/base.cpio.tmp")
truncate -s $(((size + 511) / 512 * 512)) "$lab_dir/base.cpio.tmp"
mv "$lab_dir/base.cpio.tmp" "$lab_dir/base.cpio"
ln -sf "$cpio_bin" "$lab_dir/cpio"
log "base.cpio $(($(stat -c %s "$lab_dir/base.cpio") / 1048576)) MiB, kernel $kernel_version"

stamp_now >"$lab_dir/ready"
log "ready ($lab_dir)"
