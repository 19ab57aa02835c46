#!/usr/bin/env bash
# Fetches the source of the installed fio (Debian's source package, the exact
# version `dpkg-query` reports, e.g. 3.33-3 on Debian 12), unpacks it with the
# Debian patches and runs fio's ./configure for config-host.h, into
# target/fio-src (or $KILN_FIO_SRC). native/build.rs compiles the fio external
# ioengine against these headers. Idempotent: a tree prepared for the same fio
# version is left alone.
#
# Needs network access to deb.debian.org and dpkg-source (package dpkg-dev).
# The system's apt sources are not touched: the deb-src entry lives in a
# private apt state directory under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dest=${KILN_FIO_SRC:-$root/target/fio-src}
case "$dest" in /*) ;; *) dest=$root/$dest ;; esac

command -v fio >/dev/null 2>&1 || { echo "fio-headers: fio is not installed (apt-get install fio)" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' fio 2>/dev/null || true)
if [ -z "$version" ]; then
  echo "fio-headers: fio is not a Debian package here ($(command -v fio)); point KILN_FIO_SRC at a configured source tree of $(fio --version)" >&2
  exit 1
fi
if [ -f "$dest/config-host.h" ] && [ "$(cat "$dest/.kiln-fio-version" 2>/dev/null)" = "$version" ]; then
  echo "fio-headers: $dest already prepared for fio $version"
  exit 0
fi
command -v dpkg-source >/dev/null 2>&1 || { echo "fio-headers: dpkg-source is missing (apt-get install dpkg-dev)" >&2; exit 1; }

# A private apt configuration with one deb-src line for the release fio came from.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || { echo "fio-headers: no VERSION_CODENAME in /etc/os-release" >&2; exit 1; }
mirror=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$root/target"
work=$(mktemp -d "$root/target/fio-src.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
state=$work/apt
mkdir -p "$state/lists/partial" "$state/download"
cat >"$state/sources.list" <<LIST
deb-src $mirror $codename main
deb-src $mirror $codename-updates main
deb-src ${KILN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $codename-security main
LIST
apt_opts=(
  -o "Dir::Etc::SourceList=$state/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$state/lists"
  -o "APT::Sandbox::User=$(id -un)"
  -o "Debug::NoLocking=1"
)
echo "fio-headers: fetching the source of fio $version"
apt-get -q "${apt_opts[@]}" update >"$state/update.log" 2>&1 || { cat "$state/update.log" >&2; echo "fio-headers: apt-get update of the deb-src lists failed" >&2; exit 1; }
(cd "$state/download" && apt-get -q "${apt_opts[@]}" source --download-only "fio=$version") >"$state/source.log" 2>&1 \
  || { cat "$state/source.log" >&2; echo "fio-headers: apt-get source --download-only fio=$version failed" >&2; exit 1; }
dsc=$(ls "$state/download"/fio_*.dsc | head -1)

# Unpack (with the Debian patches) and configure in the scratch tree, then move it in place.
dpkg-source -x "$dsc" "$work/fio" >"$work/unpack.log" 2>&1 || { cat "$work/unpack.log" >&2; echo "fio-headers: dpkg-source -x $dsc failed" >&2; exit 1; }
# The same configure flags as debian/rules, less the GTK front end (gfio) and libnbd,
# whose development packages are not installed; neither changes the engine ABI.
(cd "$work/fio" && ./configure --disable-native --prefix=/usr) >"$work/configure.log" 2>&1 \
  || { cat "$work/configure.log" >&2; echo "fio-headers: fio ./configure failed" >&2; exit 1; }
grep -q "FIO_IOOPS_VERSION" "$work/fio/ioengines.h" || { echo "fio-headers: $work/fio/ioengines.h has no FIO_IOOPS_VERSION" >&2; exit 1; }
echo "$version" >"$work/fio/.kiln-fio-version"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$work/fio" "$dest"
echo "fio-headers: prepared $dest for fio $version ($(grep -m1 'define FIO_IOOPS_VERSION' "$dest/ioengines.h"))"
