#!/bin/sh
# Builds the vmshadow test guest from Debian packages only, reproducibly and
# cached:
#   vmlinux     the Debian 6.1 kernel (linux-image-amd64's dependency) decompressed
#               from its bzImage; QEMU boots it directly through PVH
#   bzImage     the same kernel as packaged (fallback for -kernel)
#   initrd.img  gzip'd newc cpio: busybox-static, the virtio/ext4 modules,
#               qemu-ga from qemu-guest-agent with its libraries, the fsfreeze
#               hook, walapp (guest/walapp, static Go) and guest/init
#   manifest.txt  what went in, with versions
#
# Usage: guest/build.sh [OUTDIR]
# The artifacts are built once into a cache directory named by a SHA-256 of
# everything that goes in (this script, guest/init, guest/fsfreeze-hook,
# walapp's sources, go version, the exact package versions and qemu-ga's
# library files) and rebuilt only when one of those changes. The cache lies
# in $VMSHADOW_GUEST_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/vmshadow/guest.
# With OUTDIR, the artifacts are also linked (or copied) there. The last line
# on standard output is the cache directory holding the artifacts; progress
# goes to standard error.
#
# Packages are only downloaded (apt-get download) and unpacked with dpkg-deb
# -x, never installed, except the tools the build runs (cpio, e2fsprogs,
# xz-utils) and qemu-ga's libraries when the host lacks them.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache=${VMSHADOW_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmshadow/guest}
outdir=${1:-}
export LC_ALL=C
PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The modules the Debian kernel has as modules, in the order guest/init loads them.
MODULES="virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci
virtio_blk virtio_console jbd2 mbcache crc16 ext4 crc32c_generic"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
apt_updated=""
apt_update() {
	[ -n "$apt_updated" ] && return 0
	log "apt-get update"
	$SUDO apt-get update -qq >&2 || die "apt-get update failed"
	apt_updated=1
}
apt_install() {
	apt_update
	log "installing $*"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2 ||
		die "apt-get install $* failed"
}

# --- tools the build runs ---------------------------------------------------
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
	die "needs a Debian system (apt-get, dpkg-deb)"
fi
command -v go >/dev/null || die "go not found (looked in PATH and /usr/local/go/bin)"
missing=""
command -v cpio >/dev/null || missing="$missing cpio"
command -v mkfs.ext4 >/dev/null || missing="$missing e2fsprogs"
command -v xz >/dev/null || missing="$missing xz-utils"
command -v flock >/dev/null || missing="$missing util-linux"
# shellcheck disable=SC2086
[ -z "$missing" ] || apt_install $missing

mkdir -p "$cache/debs" "$cache/apt"
exec 9>"$cache/lock"
flock 9 # one build at a time per cache (tests of several packages start together)

# --- exact package versions -------------------------------------------------
# Images that disable apt's binary cache (Dir::Cache::pkgcache "") make every
# apt-cache call parse all package lists (a second or two): keep one here.
aptc() { apt-cache -o Dir::Cache::pkgcache="$cache/apt/pkgcache.bin" \
	-o Dir::Cache::srcpkgcache="$cache/apt/srcpkgcache.bin" "$@"; }
kernel_pkg() { aptc show --no-all-versions linux-image-amd64 2>/dev/null |
	awk -F': ' '/^Depends:/ {print $2; exit}' | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -1; }
versions() { aptc policy "$@" 2>/dev/null |
	awk '/^[^ ].*:$/ {p = substr($1, 1, length($1) - 1)} /Candidate:/ && $2 != "(none)" {printf " %s=%s", p, $2}'; }
kpkg=$(kernel_pkg)
[ -n "$kpkg" ] || { apt_update; kpkg=$(kernel_pkg); }
[ -n "$kpkg" ] || die "cannot resolve the kernel package linux-image-amd64 depends on (apt sources?)"
pkgs=$(versions "$kpkg" busybox-static qemu-guest-agent)
case "$pkgs" in *" $kpkg="*" busybox-static="*" qemu-guest-agent="*) ;; *)
	apt_update
	pkgs=$(versions "$kpkg" busybox-static qemu-guest-agent) ;;
esac
case "$pkgs" in *" $kpkg="*" busybox-static="*" qemu-guest-agent="*) ;; *)
	die "no installable version of $kpkg, busybox-static or qemu-guest-agent (found:$pkgs)" ;;
esac

# --- download and unpack (cached by exact version) ---------------------------
# unpacked P=V [PATTERN...] prints the directory holding package P at version
# V unpacked (only the members matching the patterns, if any are given).
unpacked() {
	d="$cache/debs/$1"
	_pv=$1
	shift
	if [ ! -e "$d/.done" ]; then
		rm -rf "$d" && mkdir -p "$d/x"
		log "downloading $_pv"
		(cd "$d" && apt-get download -q "$_pv" >/dev/null 2>"$d/apt.log") ||
			{ cat "$d/apt.log" >&2; die "apt-get download $_pv failed"; }
		if [ $# = 0 ]; then
			dpkg-deb -x "$d"/*.deb "$d/x"
		else
			dpkg-deb --fsys-tarfile "$d"/*.deb | tar -x -C "$d/x" --wildcards --wildcards-match-slash "$@"
		fi
		rm -f "$d"/*.deb
		: >"$d/.done"
	fi
	echo "$d/x"
}
for pv in $pkgs; do
	case "$pv" in
	linux-image-*)
		# shellcheck disable=SC2046
		kdir=$(unpacked "$pv" './boot/vmlinuz-*' './boot/config-*' $(for m in $MODULES; do echo "*/$m.ko"; done))
		;;
	busybox-static=*) bbdir=$(unpacked "$pv") ;;
	qemu-guest-agent=*) gadir=$(unpacked "$pv") gapv=$pv ;;
	esac
done
qga=$gadir/usr/sbin/qemu-ga
[ -x "$qga" ] || die "qemu-guest-agent has no usr/sbin/qemu-ga"

# --- qemu-ga's libraries, from the host -------------------------------------
libs() { ldd "$qga" | awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}'; }
if ldd "$qga" | grep -q 'not found'; then
	deps=$(aptc show "$gapv" | awk -F': ' '/^Depends:/ {print $2; exit}')
	# "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3) | x, ..." -> first alternative names
	# shellcheck disable=SC2046
	apt_install $(echo "$deps" | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/ //g')
fi
! ldd "$qga" | grep 'not found' >&2 || die "qemu-ga's libraries above are missing on the host"

# --- the cache key ------------------------------------------------------------
# walapp and the packages it imports, without tests.
walapp_srcs() {
	for f in "$root"/guest/walapp/*.go "$root"/internal/walcheck/*.go "$root"/internal/errs/*.go; do
		case "$f" in *_test.go) ;; *) cat "$f" ;; esac
	done
}
key=$(
	{
		cat "$here/build.sh" "$here/init" "$here/fsfreeze-hook"
		cat "$root/go.mod"
		walapp_srcs
		go version
		echo "$pkgs"
		for l in $(libs); do echo "$l $(sha256sum <"$l")"; done
	} | sha256sum | cut -c1-16
)
out=$cache/build-$key

if [ ! -e "$out/.done" ]; then
	log "building guest $key into $out"
	stage=$cache/stage.$$
	rm -rf "$stage" && mkdir -p "$stage"
	trap 'rm -rf "$stage"' EXIT

	# Kernel: the bzImage as packaged, and vmlinux decompressed from it.
	vmlinuz=$(ls "$kdir"/boot/vmlinuz-*)
	kver=${vmlinuz##*/vmlinuz-}
	cp "$vmlinuz" "$stage/bzImage"
	# x86 boot protocol: the compressed payload starts payload_offset (0x248)
	# bytes into the protected-mode part, which follows (setup_sects+1)*512
	# bytes; payload_length (0x24c) includes a 4-byte little-endian size of the
	# decompressed kernel appended after the xz stream.
	u8() { od -An -tu1 -j "$1" -N1 "$vmlinuz" | tr -d ' '; }
	u32() { od -An -tu4 -j "$1" -N4 "$vmlinuz" | tr -d ' '; }
	setup=$(u8 $((0x1f1)))
	[ "$setup" = 0 ] && setup=4
	poff=$(($(u32 $((0x248))) + (setup + 1) * 512))
	plen=$(u32 $((0x24c)))
	grep -q '^CONFIG_KERNEL_XZ=y' "$kdir/boot/config-$kver" || die "kernel $kver is not xz-compressed; only xz is handled"
	tail -c +$((poff + 1)) "$vmlinuz" | head -c $((plen - 4)) | xz -dc >"$stage/vmlinux" ||
		die "cannot decompress the kernel payload"
	want=$(tail -c +$((poff + plen - 3)) "$vmlinuz" | head -c 4 | od -An -tu4 | tr -d ' ')
	[ "$(stat -c %s "$stage/vmlinux")" = "$want" ] || die "decompressed kernel is not $want bytes"

	# Root file system of the initramfs.
	r=$stage/root
	mkdir -p "$r/bin" "$r/etc/qemu" "$r/lib/modules" "$r/lib64" "$r/lib/x86_64-linux-gnu" \
		"$r/dev" "$r/proc" "$r/sys" "$r/run" "$r/tmp" "$r/data" "$r/var" "$r/usr"
	ln -s bin "$r/sbin"
	ln -s ../bin "$r/usr/bin"
	ln -s ../bin "$r/usr/sbin"
	ln -s ../run "$r/var/run"
	cp "$bbdir/bin/busybox" "$r/bin/busybox"
	for a in $("$r/bin/busybox" --list); do
		[ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
	done
	for m in $MODULES; do
		f=$(find "$kdir/lib/modules/$kver" -name "$m.ko")
		[ -n "$f" ] || die "module $m.ko not in $kpkg"
		cp "$f" "$r/lib/modules/$m.ko"
	done
	cp "$qga" "$r/bin/qemu-ga"
	for l in $(libs); do
		mkdir -p "$r$(dirname "$l")"
		cp -L "$l" "$r$l"
	done
	install -m 0755 "$here/init" "$r/init"
	install -m 0755 "$here/fsfreeze-hook" "$r/etc/qemu/fsfreeze-hook"
	(cd "$root" && CGO_ENABLED=0 GOFLAGS='' go build -trimpath -buildvcs=false \
		-ldflags='-s -w -buildid=' -o "$r/bin/walapp" ./guest/walapp) || die "go build walapp failed"
	printf 'root:x:0:0:root:/:/bin/sh\n' >"$r/etc/passwd"
	printf 'root:x:0:\n' >"$r/etc/group"

	# Reproducible archive: sorted names, fixed times and owners.
	find "$r" -exec touch -h -d @0 {} +
	(cd "$r" && find . | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$stage/initrd.img"

	{
		echo "guest $key"
		echo "packages:$pkgs"
		echo "kernel: $kver"
		go version
		echo "qemu-ga libraries (copied from the host):"
		for l in $(libs); do
			owner=$(dpkg -S "$l" 2>/dev/null || dpkg -S "$(readlink -f "$l")" 2>/dev/null || echo "?: ")
			owner=${owner%%:*}
			echo "  $l ${owner} $(dpkg-query -W -f '${Version}' "$owner" 2>/dev/null || true)"
		done
		echo "sizes (bytes):"
		for f in vmlinux bzImage initrd.img; do echo "  $f $(stat -c %s "$stage/$f")"; done
		echo "  initramfs unpacked $(du -sb "$r" | cut -f1)"
	} >"$stage/manifest.txt"
	rm -rf "$r"
	: >"$stage/.done"
	rm -rf "$out"
	mv "$stage" "$out"
	trap - EXIT
	log "built $(sed -n 's/^  //p' "$out/manifest.txt" | grep -E '^(vmlinux|bzImage|initrd.img) ' | tr '\n' ' ')"

	# Keep the three newest builds and the packages they use.
	# shellcheck disable=SC2012
	ls -dt "$cache"/build-* | tail -n +4 | while read -r old; do rm -rf "$old"; done
	for d in "$cache"/debs/*; do
		case " $pkgs " in *" ${d##*/} "*) ;; *) grep -qs "${d##*/}" "$cache"/build-*/manifest.txt || rm -rf "$d" ;; esac
	done
fi
touch "$out"

if [ -n "$outdir" ]; then
	mkdir -p "$outdir"
	for f in vmlinux bzImage initrd.img manifest.txt; do
		ln -f "$out/$f" "$outdir/$f" 2>/dev/null || cp -f "$out/$f" "$outdir/$f"
	done
fi
echo "$out"
