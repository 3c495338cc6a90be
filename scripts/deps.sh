#!/bin/sh
# Installs the Debian packages vmshadow's build, tests or demo need, only when
# a command they provide is missing. Usage: scripts/deps.sh test|demo|bench
set -eu
need=""
want() { command -v "$1" >/dev/null 2>&1 || need="$need $2"; }
want qemu-system-x86_64 qemu-system-x86
want qemu-img qemu-utils
want qemu-storage-daemon qemu-system-common
want qemu-nbd qemu-utils
want nbdkit nbdkit
want nbdinfo libnbd-bin
want nbdcopy libnbd-bin
want mkfs.ext4 e2fsprogs
want e2fsck e2fsprogs
want cpio cpio
want python3 python3
want openssl openssl
want /usr/bin/time time
want mount mount
case "${1:-test}" in
test) want /usr/sbin/libvirtd libvirt-daemon-system; want virsh libvirt-clients
      want swtpm swtpm; want swtpm_setup swtpm-tools
      [ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need="$need ovmf"
      # the Debian package's tests (packaging/deb)
      want dpkg-deb dpkg; want systemd-analyze systemd; want man man-db
      want groff groff-base; want zsh zsh; want fish fish
      [ -e /usr/share/bash-completion/bash_completion ] || need="$need bash-completion"
      # file-level restore: test disks (sfdisk, mkfs.*, mtools, LVM, NTFS);
      # lvm and ntfs-3g also go into the helper VM (guest/fshelper/build.sh)
      want sfdisk fdisk; want mkfs.vfat dosfstools; want mcopy mtools
      want mkfs.xfs xfsprogs; want mkfs.btrfs btrfs-progs; want lvm lvm2
      want mkntfs ntfs-3g; want ntfs-3g ntfs-3g
      # guest/bootdisk.sh (the bootable guest disk of the healthcheck tests)
      want syslinux syslinux; want mcopy mtools; want mkfs.vfat dosfstools; want sfdisk fdisk
      [ -e /usr/lib/syslinux/mbr/mbr.bin ] || need="$need syslinux-common"
      [ -e /usr/lib/systemd/boot/efi/systemd-bootx64.efi ] || need="$need systemd-boot-efi"
      # the web interface's browser test (internal/server/web)
      want chromium chromium
      # ... which validates the libvirt domain XML the page shows
      want virt-xml-validate libvirt-clients; want xmllint libxml2-utils ;;
esac
case "${1:-test}" in
bench) want restic restic; want borg borgbackup; want gnuplot gnuplot-nox
       want virtnbdbackup virtnbdbackup; want /usr/sbin/libvirtd libvirt-daemon-system
       want virsh libvirt-clients; want qemu-io qemu-utils; want tar tar ;;
esac
# versitygw, the real S3 server of the S3 tests and benchmarks: built once
# with go install into ~/.cache/vmshadow/bin (the tests would build it too,
# inside their time limit).
case "${1:-test}" in
test|bench) "$(dirname "$0")/s3-test-server.sh" install >/dev/null ;;
esac
[ -z "$need" ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing:$need" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
