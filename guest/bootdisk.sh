#!/bin/sh
# Builds a bootable disk image of the vmshadow test guest (for the health
# check tests): an MBR disk with syslinux's mbr.bin, one active FAT32
# partition holding syslinux (ldlinux.sys), syslinux.cfg, the guest's kernel
# (bzImage) and initramfs (the guest's root, with qemu-ga started by its
# init). SeaBIOS boots it like a real disk: no -kernel, no -initrd.
#
# Usage: guest/bootdisk.sh
# Built once, from guest/build.sh's artifacts, into
# <guest build dir>/bootdisk-<key>/boot.img (key: a hash of this script and
# the build), without root and without mounting anything (mtools and
# syslinux's mtools installer). The last line on standard output is the
# image's path. Packages: syslinux, syslinux-common, mtools, dosfstools,
# fdisk (scripts/deps.sh test installs them).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export LC_ALL=C
PATH=$PATH:/usr/sbin:/sbin
log() { echo "guest/bootdisk.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

mbr=/usr/lib/syslinux/mbr/mbr.bin
for c in syslinux mcopy mkfs.vfat sfdisk; do
	command -v $c >/dev/null || die "$c not found: install syslinux mtools dosfstools fdisk (scripts/deps.sh test)"
done
[ -r $mbr ] || die "$mbr not found: install syslinux-common"

gdir=$("$here/build.sh" | tail -n 1)
[ -e "$gdir/bzImage" ] || die "guest/build.sh did not give a build directory ($gdir)"
key=$({ cat "$here/bootdisk.sh" "$mbr"; sha256sum "$gdir/bzImage" "$gdir/initrd.img"; syslinux --version 2>&1; } | sha256sum | cut -c1-16)
out=$gdir/bootdisk-$key
if [ ! -e "$out/.done" ]; then
	exec 9>"$gdir/bootdisk.lock"
	flock 9
fi
if [ ! -e "$out/.done" ]; then
	log "building $out/boot.img"
	stage=$gdir/bootdisk-stage.$$
	rm -rf "$stage" && mkdir -p "$stage"
	trap 'rm -rf "$stage"' EXIT
	# The partition: 1 MiB in, to the end of a 64 MiB disk.
	disk_mib=64
	part_mib=$((disk_mib - 1))
	p=$stage/part.img
	truncate -s ${part_mib}M "$p"
	mkfs.vfat -F 32 -n VMSHADOW -i 766d7368 "$p" >/dev/null
	cat >"$stage/syslinux.cfg" <<'CFG'
SERIAL 0 115200
DEFAULT vmshadow
PROMPT 0
TIMEOUT 0
LABEL vmshadow
  KERNEL /bzImage
  INITRD /initrd.img
  APPEND console=ttyS0 panic=-1 quiet vmshadow.noapp=1
CFG
	export MTOOLS_SKIP_CHECK=1
	mcopy -i "$p" "$gdir/bzImage" ::/bzImage
	mcopy -i "$p" "$gdir/initrd.img" ::/initrd.img
	mcopy -i "$p" "$stage/syslinux.cfg" ::/syslinux.cfg
	syslinux --install "$p" || die "syslinux --install failed"
	d=$stage/boot.img
	truncate -s ${disk_mib}M "$d"
	echo 'label: dos
label-id: 0x766d7368
start=2048, type=c, bootable' | sfdisk -q "$d" >/dev/null || die "sfdisk failed"
	dd if=$mbr of="$d" bs=440 count=1 conv=notrunc status=none
	dd if="$p" of="$d" bs=1M seek=1 conv=notrunc status=none
	rm -f "$p"
	: >"$stage/.done"
	rm -rf "$out"
	mv "$stage" "$out"
	trap - EXIT
fi
echo "$out/boot.img"
