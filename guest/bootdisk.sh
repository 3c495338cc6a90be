#!/bin/sh
# Builds bootable disk images of the vmshadow test guest (for the health
# check tests), 64 MiB (BIOS) and 65 MiB (UEFI) raw, holding the guest's kernel (bzImage) and
# initramfs (the guest's root, with qemu-ga started by its init):
#   boot.img       BIOS: an MBR with syslinux's mbr.bin, one active FAT32
#                  partition with syslinux (ldlinux.sys) and syslinux.cfg.
#                  SeaBIOS boots it like a real disk: no -kernel, no -initrd.
#   boot-uefi.img  UEFI: a GPT with one EFI system partition (FAT32) holding
#                  systemd-boot as EFI/BOOT/BOOTX64.EFI and its loader
#                  entry. OVMF boots it.
#
# Usage: guest/bootdisk.sh
# Built once, from guest/build.sh's artifacts, into
# <guest build dir>/bootdisk-<key>/ (key: a hash of this script, the
# bootloaders and the build), without root and without mounting anything
# (mtools and syslinux's mtools installer). The last line on standard
# output is the BIOS image's path; the UEFI image lies next to it.
# Packages: syslinux, syslinux-common, mtools, dosfstools, fdisk,
# systemd-boot-efi (scripts/deps.sh test installs them).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export LC_ALL=C
PATH=$PATH:/usr/sbin:/sbin
log() { echo "guest/bootdisk.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

mbr=/usr/lib/syslinux/mbr/mbr.bin
sdboot=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
for c in syslinux mcopy mkfs.vfat sfdisk; do
	command -v $c >/dev/null || die "$c not found: install syslinux mtools dosfstools fdisk (scripts/deps.sh test)"
done
[ -r $mbr ] || die "$mbr not found: install syslinux-common"
[ -r $sdboot ] || die "$sdboot not found: install systemd-boot-efi"

gdir=$("$here/build.sh" | tail -n 1)
[ -e "$gdir/bzImage" ] || die "guest/build.sh did not give a build directory ($gdir)"
key=$({ cat "$here/bootdisk.sh" "$mbr" "$sdboot"; sha256sum "$gdir/bzImage" "$gdir/initrd.img"; syslinux --version 2>&1; } | sha256sum | cut -c1-16)
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
	rm -f "$stage/syslinux.cfg"
	syslinux --install "$p" || die "syslinux --install failed"
	d=$stage/boot.img
	truncate -s ${disk_mib}M "$d"
	echo 'label: dos
label-id: 0x766d7368
start=2048, type=c, bootable' | sfdisk -q "$d" >/dev/null || die "sfdisk failed"
	dd if=$mbr of="$d" bs=440 count=1 conv=notrunc status=none
	dd if="$p" of="$d" bs=1M seek=1 conv=notrunc status=none
	rm -f "$p"

	# UEFI: GPT, one EFI system partition, systemd-boot.
	truncate -s ${part_mib}M "$p"
	mkfs.vfat -F 32 -n VMSHADOWEFI -i 766d7369 "$p" >/dev/null
	mmd -i "$p" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
	mcopy -i "$p" $sdboot ::/EFI/BOOT/BOOTX64.EFI
	mcopy -i "$p" "$gdir/bzImage" ::/bzImage
	mcopy -i "$p" "$gdir/initrd.img" ::/initrd.img
	printf 'default vmshadow.conf\ntimeout 0\n' >"$stage/loader.conf"
	printf 'title vmshadow test guest\nlinux /bzImage\ninitrd /initrd.img\noptions console=ttyS0 panic=-1 quiet vmshadow.noapp=1\n' >"$stage/vmshadow.conf"
	mcopy -i "$p" "$stage/loader.conf" ::/loader/loader.conf
	mcopy -i "$p" "$stage/vmshadow.conf" ::/loader/entries/vmshadow.conf
	rm -f "$stage/loader.conf" "$stage/vmshadow.conf"
	u=$stage/boot-uefi.img
	truncate -s $((disk_mib + 1))M "$u" # room for the backup GPT after the partition
	echo 'label: gpt
label-id: 766D7368-0000-4000-8000-000000000001
start=2048, size='$((part_mib * 2048))', type=U, uuid=766D7368-0000-4000-8000-000000000002' | sfdisk -q "$u" >/dev/null || die "sfdisk (gpt) failed"
	dd if="$p" of="$u" bs=1M seek=1 conv=notrunc status=none
	rm -f "$p"
	: >"$stage/.done"
	rm -rf "$out"
	mv "$stage" "$out"
	trap - EXIT
	# Only the newest images are kept (each is 130 MiB).
	for old in "$gdir"/bootdisk-*; do
		[ "$old" = "$out" ] || [ ! -d "$old" ] || case "$old" in *stage*) ;; *) rm -rf "$old" ;; esac
	done
fi
echo "$out/boot.img"
