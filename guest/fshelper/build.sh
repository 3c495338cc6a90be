#!/bin/sh
# Builds the file restore helper of `vmshadow files` from Debian packages,
# reproducibly and cached (like guest/build.sh, which builds the test guest):
#   vmlinux     the Debian kernel (linux-image-amd64's dependency) decompressed
#               from its bzImage; QEMU boots it directly through PVH
#   initrd.img  gzip'd newc cpio: the agent (guest/fshelper/agent, static Go)
#               as /init, the kernel modules of guest/fshelper/modules.txt,
#               and lvm (LVM) and ntfs-3g (NTFS) with their libraries, copied
#               from the host's Debian packages lvm2 and ntfs-3g when installed
#               (scripts/deps.sh test installs them; without them the helper
#               reads no LVM or NTFS and says so)
#   manifest.txt  what went in, with versions
#
# Usage: guest/fshelper/build.sh [OUTDIR]
# The cache lies in $VMSHADOW_FSHELPER_CACHE, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/vmshadow/fshelper; each build goes to
# build-KEY (KEY a SHA-256 of everything that goes in) and the link
# "current" names the newest, which vmshadow files uses by default. The last
# line on standard output is the build directory; progress goes to stderr.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${VMSHADOW_FSHELPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmshadow/fshelper}
outdir=${1:-}
export LC_ALL=C
PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

log() { echo "fshelper/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs a Debian system (apt-get, dpkg-deb)"
command -v go >/dev/null || die "go not found (looked in PATH and /usr/local/go/bin)"
for t in cpio xz gzip flock; do command -v $t >/dev/null || die "$t not found (scripts/deps.sh installs it)"; done

mkdir -p "$cache/debs" "$cache/apt"
exec 9>"$cache/lock"
flock 9

aptc() { apt-cache -o Dir::Cache::pkgcache="$cache/apt/pkgcache.bin" \
	-o Dir::Cache::srcpkgcache="$cache/apt/srcpkgcache.bin" "$@"; }
kernel_pkg() { aptc show --no-all-versions linux-image-amd64 2>/dev/null |
	awk -F': ' '/^Depends:/ {print $2; exit}' | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -1; }
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
	$SUDO apt-get update -qq >&2 || die "apt-get update failed"
	kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || die "cannot resolve the kernel package linux-image-amd64 depends on (apt sources?)"
kver=$(aptc policy "$kpkg" | awk '/Candidate:/ {print $2}')
[ -n "$kver" ] && [ "$kver" != "(none)" ] || die "no installable version of $kpkg"
MODULES=$(grep -v '^#' "$here/modules.txt" | awk '{print $1}' | tr '\n' ' ')

# The package is kept (the helper's module list may change); its members
# are unpacked once per module list.
d="$cache/debs/$kpkg=$kver"
if ! ls "$d"/*.deb >/dev/null 2>&1; then
	rm -rf "$d" && mkdir -p "$d"
	log "downloading $kpkg=$kver"
	(cd "$d" && apt-get download -q "$kpkg=$kver" >/dev/null 2>"$d/apt.log") ||
		{ cat "$d/apt.log" >&2; die "apt-get download $kpkg=$kver failed"; }
fi
kdir=$d/x-$(echo "$MODULES" | sha256sum | cut -c1-8)
if [ ! -e "$kdir/.done" ]; then
	rm -rf "$kdir" && mkdir -p "$kdir"
	# shellcheck disable=SC2046
	dpkg-deb --fsys-tarfile "$d"/*.deb | tar -x -C "$kdir" --wildcards --wildcards-match-slash \
		'./boot/vmlinuz-*' './boot/config-*' $(for m in $MODULES; do echo "*/$m.ko"; done)
	: >"$kdir/.done"
fi

# Tools copied from the host with their libraries (as guest/build.sh does
# for qemu-ga): lvm from lvm2, ntfs-3g from ntfs-3g.
TOOLS=""
for t in /usr/sbin/lvm /sbin/lvm /usr/bin/ntfs-3g /bin/ntfs-3g; do
	[ -x "$t" ] || continue
	case " $TOOLS " in *" ${t##*/}="*) ;; *) TOOLS="$TOOLS ${t##*/}=$(readlink -f "$t")" ;; esac
done
libs() { ldd "$1" | awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}'; }

agent_srcs() {
	for f in "$here"/agent/*.go "$root"/internal/fsproto/*.go; do
		case "$f" in *_test.go) ;; *) cat "$f" ;; esac
	done
}
key=$(
	{
		cat "$here/build.sh" "$here/modules.txt" "$root/go.mod"
		agent_srcs
		go version
		echo "$kpkg=$kver"
		for tv in $TOOLS; do
			echo "$tv $(sha256sum <"${tv#*=}")"
			for l in $(libs "${tv#*=}"); do echo "$l $(sha256sum <"$l")"; done
		done
	} | sha256sum | cut -c1-16
)
out=$cache/build-$key

if [ ! -e "$out/.done" ]; then
	log "building helper $key into $out"
	stage=$cache/stage.$$
	rm -rf "$stage" && mkdir -p "$stage"
	trap 'rm -rf "$stage"' EXIT
	vmlinuz=$(ls "$kdir"/boot/vmlinuz-*)
	krel=${vmlinuz##*/vmlinuz-}
	# x86 boot protocol: see guest/build.sh.
	u8() { od -An -tu1 -j "$1" -N1 "$vmlinuz" | tr -d ' '; }
	u32() { od -An -tu4 -j "$1" -N4 "$vmlinuz" | tr -d ' '; }
	setup=$(u8 $((0x1f1)))
	[ "$setup" = 0 ] && setup=4
	poff=$(($(u32 $((0x248))) + (setup + 1) * 512))
	plen=$(u32 $((0x24c)))
	grep -q '^CONFIG_KERNEL_XZ=y' "$kdir/boot/config-$krel" || die "kernel $krel is not xz-compressed; only xz is handled"
	tail -c +$((poff + 1)) "$vmlinuz" | head -c $((plen - 4)) | xz -dc >"$stage/vmlinux" ||
		die "cannot decompress the kernel payload"

	r=$stage/root
	mkdir -p "$r/lib/modules" "$r/dev" "$r/proc" "$r/sys" "$r/run" "$r/mnt" "$r/tmp" "$r/bin" "$r/etc"
	for m in $MODULES; do
		f=$(find "$kdir/lib/modules/$krel" -name "$m.ko")
		[ -n "$f" ] || die "module $m.ko not in $kpkg"
		cp "$f" "$r/lib/modules/$m.ko"
	done
	grep -v '^#' "$here/modules.txt" >"$r/lib/modules/order"
	for tv in $TOOLS; do
		cp "${tv#*=}" "$r/bin/${tv%%=*}"
		for l in $(libs "${tv#*=}"); do
			mkdir -p "$r$(dirname "$l")"
			cp -L "$l" "$r$l"
		done
	done
	(cd "$root" && CGO_ENABLED=0 GOFLAGS='' go build -trimpath -buildvcs=false \
		-ldflags='-s -w -buildid=' -o "$r/init" ./guest/fshelper/agent) || die "go build of the agent failed"
	find "$r" -exec touch -h -d @0 {} +
	(cd "$r" && find . | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$stage/initrd.img"
	{
		echo "fshelper $key"
		echo "packages: $kpkg=$kver"
		echo "kernel: $krel"
		echo "modules: $MODULES"
		echo "tools (copied from the host):${TOOLS:- none}"
		for tv in $TOOLS; do
			n=${tv%%=*}
			o=$({ dpkg -S "${tv#*=}" || dpkg -S "/sbin/$n" || dpkg -S "/bin/$n"; } 2>/dev/null | head -1 | cut -d: -f1)
			echo "  ${tv%%=*} $o $(dpkg-query -W -f '${Version}' "$o" 2>/dev/null || true)"
		done
		go version
		for f in vmlinux initrd.img; do echo "  $f $(stat -c %s "$stage/$f")"; done
	} >"$stage/manifest.txt"
	rm -rf "$r"
	: >"$stage/.done"
	rm -rf "$out"
	mv "$stage" "$out"
	trap - EXIT
	# shellcheck disable=SC2012
	ls -dt "$cache"/build-* | tail -n +4 | while read -r old; do rm -rf "$old"; done
fi
ln -sfn "build-$key" "$cache/current.tmp" && mv -T "$cache/current.tmp" "$cache/current"
touch "$out"
if [ -n "$outdir" ]; then
	mkdir -p "$outdir"
	for f in vmlinux initrd.img manifest.txt; do
		ln -f "$out/$f" "$outdir/$f" 2>/dev/null || cp -f "$out/$f" "$outdir/$f"
	done
fi
echo "$out"
