#!/usr/bin/env bash
# Installs what the QEMU capture backend and its tests need on Debian
# bookworm, and fetches a guest kernel. Idempotent: does nothing (and
# touches no network) when everything is already present.
#
#   - qemu-system-x86 from bookworm-backports (QEMU 10.x; bookworm's own
#     7.2 conflicts with a backports qemu-utils and lacks what we use)
#   - busybox-static (guest userland), iproute2 (test network namespaces),
#     gdb, binutils and crash (the tests open restored ELF cores with them)
#   - the Debian cloud kernel package, downloaded and extracted (not
#     installed on the host) into $REMUS_GUEST_CACHE/kernel
#   - its debug symbols: vmlinux alone, taken from the matching -dbg
#     package (~280 MB download) into $REMUS_GUEST_CACHE/kernel-dbg, for
#     `crash`; $REMUS_GUEST_VMLINUX names it
#
# Prints the guest kernel path on the last line of stdout; everything
# else goes to stderr. Can be sourced or run.
set -euo pipefail

REMUS_GUEST_CACHE="${REMUS_GUEST_CACHE:-$HOME/.cache/remus-guest}"
export REMUS_GUEST_CACHE

_qd_die() { echo "qemu-deps: $*" >&2; exit 1; }

_qd_sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || _qd_die "needs root or sudo"
  _qd_sudo="sudo"
fi
command -v apt-get >/dev/null 2>&1 || _qd_die "needs a Debian system (apt-get)"

_qd_updated=0
_qd_apt_update() {
  if [ $_qd_updated -eq 0 ]; then
    $_qd_sudo apt-get update -qq >&2 || _qd_die "apt-get update failed"
    _qd_updated=1
  fi
}

# 1. bookworm-backports in the apt sources.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "qemu-deps: adding bookworm-backports to apt sources" >&2
  printf '%s\n' \
    'Types: deb' \
    'URIs: http://deb.debian.org/debian' \
    'Suites: bookworm-backports' \
    'Components: main' \
    'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' |
    $_qd_sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
  _qd_updated=0
fi

# 2. Packages.
_qd_qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local major
  major=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
  [ -n "$major" ] && [ "$major" -ge 8 ]
}
if ! _qd_qemu_ok || ! command -v qemu-nbd >/dev/null 2>&1; then
  echo "qemu-deps: installing qemu-system-x86 qemu-utils from bookworm-backports" >&2
  _qd_apt_update
  DEBIAN_FRONTEND=noninteractive $_qd_sudo apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null \
    || _qd_die "installing qemu-system-x86 from bookworm-backports failed"
  _qd_qemu_ok || _qd_die "qemu-system-x86_64 >= 8 still missing after install"
fi
_qd_missing=()
[ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 || _qd_missing+=(busybox-static)
command -v ip >/dev/null 2>&1 || _qd_missing+=(iproute2)
command -v cpio >/dev/null 2>&1 || _qd_missing+=(cpio)
# The tests open restored ELF cores with gdb and readelf.
command -v gdb >/dev/null 2>&1 || _qd_missing+=(gdb)
command -v readelf >/dev/null 2>&1 || _qd_missing+=(binutils)
command -v crash >/dev/null 2>&1 || _qd_missing+=(crash)
if [ ${#_qd_missing[@]} -gt 0 ]; then
  echo "qemu-deps: installing ${_qd_missing[*]}" >&2
  _qd_apt_update
  DEBIAN_FRONTEND=noninteractive $_qd_sudo apt-get install -y -qq --no-install-recommends \
    "${_qd_missing[@]}" >/dev/null || _qd_die "installing ${_qd_missing[*]} failed"
fi

# 3. Guest kernel: newest bookworm linux-image-*-cloud-amd64, extracted.
_qd_kdir="$REMUS_GUEST_CACHE/kernel"
if ! ls "$_qd_kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  _qd_apt_update
  _qd_pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' \
    | awk '{print $1}' | sort -V | tail -n 1)
  [ -n "$_qd_pkg" ] || _qd_die "no linux-image-6.1.0-*-cloud-amd64 package in apt"
  echo "qemu-deps: downloading guest kernel $_qd_pkg into $_qd_kdir" >&2
  _qd_tmp=$(mktemp -d)
  chmod 755 "$_qd_tmp"  # apt-get download drops privileges to _apt
  (cd "$_qd_tmp" && apt-get download -qq "$_qd_pkg" >&2) || _qd_die "apt-get download $_qd_pkg failed"
  mkdir -p "$_qd_kdir.tmp"
  dpkg-deb -x "$_qd_tmp"/*.deb "$_qd_kdir.tmp" || _qd_die "extracting $_qd_pkg failed"
  # The debug symbols must come from the very same build.
  dpkg-deb -f "$_qd_tmp"/*.deb Version >"$_qd_kdir.tmp/version"
  rm -rf "$_qd_tmp" "$_qd_kdir"
  mv "$_qd_kdir.tmp" "$_qd_kdir"
fi
REMUS_GUEST_KERNEL=$(ls "$_qd_kdir"/boot/vmlinuz-* | sort -V | tail -n 1)
export REMUS_GUEST_KERNEL
# The kernel image is mode 0600 in the package; QEMU may run unprivileged.
[ -r "$REMUS_GUEST_KERNEL" ] || _qd_die "cannot read $REMUS_GUEST_KERNEL"
chmod a+r "$REMUS_GUEST_KERNEL" 2>/dev/null || true

# 4. The guest kernel's vmlinux with debug symbols, from the -dbg package
#    of the same version (only vmlinux is extracted; the package's module
#    symbols are not needed).
_qd_kver="${REMUS_GUEST_KERNEL##*/vmlinuz-}"
REMUS_GUEST_VMLINUX="$REMUS_GUEST_CACHE/kernel-dbg/vmlinux-$_qd_kver"
if [ ! -f "$REMUS_GUEST_VMLINUX" ]; then
  _qd_apt_update
  if [ -f "$_qd_kdir/version" ]; then
    _qd_ver=$(cat "$_qd_kdir/version")
  else
    # A kernel fetched before its version was recorded: apt's.
    _qd_ver=$(apt-cache show "linux-image-$_qd_kver" | awk '/^Version:/ { print $2; exit }')
  fi
  [ -n "$_qd_ver" ] || _qd_die "no version known for linux-image-$_qd_kver"
  echo "qemu-deps: downloading the guest kernel's debug symbols (linux-image-$_qd_kver-dbg $_qd_ver)" >&2
  _qd_tmp=$(mktemp -d)
  chmod 755 "$_qd_tmp"
  (cd "$_qd_tmp" && apt-get download -qq "linux-image-$_qd_kver-dbg=$_qd_ver" >&2) \
    || _qd_die "apt-get download linux-image-$_qd_kver-dbg=$_qd_ver failed (remove $_qd_kdir to fetch a kernel and its symbols afresh)"
  mkdir -p "$_qd_tmp/x" "$(dirname "$REMUS_GUEST_VMLINUX")"
  dpkg-deb --fsys-tarfile "$_qd_tmp"/*.deb | tar -x -C "$_qd_tmp/x" "./usr/lib/debug/boot/vmlinux-$_qd_kver" \
    || _qd_die "extracting vmlinux-$_qd_kver failed"
  mv "$_qd_tmp/x/usr/lib/debug/boot/vmlinux-$_qd_kver" "$REMUS_GUEST_VMLINUX"
  rm -rf "$_qd_tmp"
fi
export REMUS_GUEST_VMLINUX

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "$REMUS_GUEST_KERNEL"
fi
