#!/usr/bin/env bash
# Builds the test guest's initramfs: busybox, the virtio modules from the
# Debian cloud kernel, and an /init that starts two services:
#
#   TCP 7000  counter: per line "inc" -> increments the counter held in
#             guest memory (/run, tmpfs) and writes it to /dev/vda
#             (decimal at offset 0, O_DIRECT + fsync) before replying
#             "N"; "get" -> "MEM DISK" (memory value, value read back
#             from the disk with O_DIRECT). The counter starts from the
#             disk at boot (a zeroed disk starts at 0). One connection can
#             carry any number of requests; any number of connections.
#   TCP 7001  cpujob: send "N" (MiB), the guest hashes N MiB of zeros
#             with sha256sum and replies "MS" (guest-measured elapsed
#             milliseconds, 10 ms resolution). Also /bin/cpujob N on the
#             console.
#
# Kernel command line: remus.ip=10.0.2.15/24 (default), remus.gw=ADDR
# (optional). "remus-guest ready" is printed on the console when both
# services listen.
#
# Output: $REMUS_GUEST_CACHE/initramfs.cpio.gz (default cache
# ~/.cache/remus-guest). Prints the initramfs path, then the kernel path,
# one per line on stdout. Rebuilds only when this script or the kernel
# changed. Needs scripts/qemu-deps.sh to have run (it runs it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../scripts/qemu-deps.sh"

die() { echo "guest/build.sh: $*" >&2; exit 1; }

kernel="$REMUS_GUEST_KERNEL"
kver="$(basename "$kernel")"; kver="${kver#vmlinuz-}"
moddir="$REMUS_GUEST_CACHE/kernel/lib/modules/$kver"
out="$REMUS_GUEST_CACHE/initramfs.cpio.gz"
stamp="$REMUS_GUEST_CACHE/initramfs.stamp"
want="$(sha256sum "$0" | cut -d' ' -f1) $kver"

if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$out"; echo "$kernel"; exit 0
fi
[ -x /bin/busybox ] || die "/bin/busybox missing (busybox-static)"
[ -d "$moddir" ] || die "kernel modules missing: $moddir"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for app in $(/bin/busybox --list); do
  [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"
done

# Load order matters: dependencies first (no modules.dep in the extracted
# package; from each .ko's depends= modinfo field).
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
      failover net_failover virtio_net virtio_blk"
for m in $mods; do
  f="$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)"
  [ -n "$f" ] || die "module $m not found under $moddir"
  case "$f" in *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;; *) cp "$f" "$root/lib/modules/$m.ko" ;; esac
done
echo "$mods" | tr -s ' \n' '\n' | sed '/^$/d' >"$root/lib/modules/order"

cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "remus-guest: insmod $m failed"
done
ip=10.0.2.15/24; gw=
for a in $(cat /proc/cmdline); do
  case "$a" in remus.ip=*) ip="${a#remus.ip=}" ;; remus.gw=*) gw="${a#remus.gw=}" ;; esac
done
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
  ip addr add "$ip" dev eth0 && ip link set eth0 up
  [ -n "$gw" ] && ip route add default via "$gw"
else
  echo "remus-guest: no eth0"
fi
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
  n=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -n 1 | tr -cd 0-9)
else
  echo "remus-guest: no /dev/vda, counter kept in memory only"; n=
fi
echo "${n:-0}" >/run/counter
nc -ll -p 7000 -e /bin/counter.sh &
nc -ll -p 7001 -e /bin/cpujob-serve.sh &
i=0; while ! netstat -ltn 2>/dev/null | grep -q ':7001 ' && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
echo "remus-guest ready ip=$ip counter=$(cat /run/counter)"
while true; do sleep 3600; done
INIT

cat >"$root/bin/counter.sh" <<'COUNTER'
#!/bin/sh
# One process per connection; the counter is /run/counter (guest memory),
# serialised across connections by a mkdir lock.
lock() { while ! mkdir /run/counter.lock 2>/dev/null; do usleep 1000; done; }
unlock() { rmdir /run/counter.lock; }
disk_read() {
  [ -b /dev/vda ] || { echo -; return; }
  v=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -n 1 | tr -cd 0-9)
  echo "${v:-0}"
}
while IFS= read -r line; do
  line=$(echo "$line" | tr -d '\r')
  case "$line" in
  inc)
    lock
    n=$(( $(cat /run/counter) + 1 ))
    if [ -b /dev/vda ]; then
      printf '%s\n' "$n" | dd of=/dev/vda bs=4096 count=1 conv=sync,fsync oflag=direct 2>/dev/null \
        || { unlock; echo "ERR disk"; continue; }
    fi
    echo "$n" >/run/counter
    unlock
    echo "$n" ;;
  get)
    lock; m=$(cat /run/counter); d=$(disk_read); unlock
    echo "$m $d" ;;
  quit) exit 0 ;;
  "") ;;
  *) echo "ERR unknown" ;;
  esac
done
COUNTER

cat >"$root/bin/cpujob" <<'CPUJOB'
#!/bin/sh
# cpujob N: sha256 of N MiB of zeros; prints guest-elapsed milliseconds.
n=${1:-16}
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero bs=1048576 count="$n" 2>/dev/null | sha256sum >/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
echo "$t0 $t1" | awk '{ printf "%d\n", ($2 - $1) * 1000 }'
CPUJOB

cat >"$root/bin/cpujob-serve.sh" <<'SERVE'
#!/bin/sh
while IFS= read -r line; do
  n=$(echo "$line" | tr -cd 0-9)
  /bin/cpujob "${n:-16}"
done
SERVE
chmod +x "$root/init" "$root/bin/counter.sh" "$root/bin/cpujob" "$root/bin/cpujob-serve.sh"

mkdir -p "$REMUS_GUEST_CACHE"
(cd "$root" && find . | sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) >"$out.tmp"
mv "$out.tmp" "$out"
echo "$want" >"$stamp"
echo "guest/build.sh: built $out ($(du -k "$out" | cut -f1) KiB, kernel $kver)" >&2
echo "$out"; echo "$kernel"
