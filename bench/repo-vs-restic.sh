#!/bin/sh
# Backs up the same multi-GiB mixed disk image with vmshadow and with restic
# and prints throughput, peak RSS and repository size side by side.
#
# Usage: bench/repo-vs-restic.sh [SIZE_GIB] [WORKDIR]
#   SIZE_GIB  image size in GiB (default 4)
#   WORKDIR   scratch directory (default bench/out); needs about 2.5 x SIZE free
#
# The image mixes what VM disks hold, in 4 MiB-aligned regions of 64 MiB:
#   25% compressible system files (a tar of /usr), 25% random data (already
#   compressed media, encrypted files), 15% copies of earlier regions at
#   other offsets (cloned files, duplicated blocks), 35% holes (never written).
# Both tools encrypt and compress (restic repository format 2, compression
# auto; vmshadow AES-256-GCM + zstd). Both read the image from the page cache
# (it was just written), so the figures compare the tools, not the disk.
# Needs: go, restic, GNU time (scripts/deps.sh bench installs them).
set -eu
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-4}
WORK=${2:-bench/out}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
IMG=$WORK/image.raw
BIN=$WORK/vmshadow
export VMSHADOW_PASSWORD=bench-password RESTIC_PASSWORD=bench-password
for c in restic /usr/bin/time go; do
	command -v $c >/dev/null || { echo "missing $c: run scripts/deps.sh bench" >&2; exit 2; }
done
go build -o "$BIN" ./cmd/vmshadow

region=$((64 << 20))
size=$((SIZE_GIB << 30))
regions=$((size / region))
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != "$size" ]; then
	echo "creating $SIZE_GIB GiB image $IMG" >&2
	rm -f "$IMG" "$WORK/usr.tar"
	truncate -s "$size" "$IMG"
	tar -cf "$WORK/usr.tar" --ignore-failed-read /usr/lib /usr/share /usr/bin 2>/dev/null || true
	tarsize=$(stat -c %s "$WORK/usr.tar")
	i=0
	while [ $i -lt $regions ]; do
		# Region kind by position in a 20-region cycle: 5 text, 5 random, 3 dup, 7 hole.
		k=$((i % 20))
		off=$((i * 64))
		if [ $k -lt 5 ]; then
			skip=$(( (i * 64 << 20) % (tarsize - region) / 1048576 ))
			dd if="$WORK/usr.tar" of="$IMG" bs=1M count=64 skip=$skip seek=$off conv=notrunc status=none
		elif [ $k -lt 10 ]; then
			head -c $region /dev/urandom | dd of="$IMG" bs=1M seek=$off conv=notrunc status=none
		elif [ $k -lt 13 ]; then
			src=$(( (i - 10) * 64 ))
			dd if="$IMG" of="$IMG" bs=1M count=64 skip=$src seek=$off conv=notrunc status=none
		fi
		i=$((i + 1))
	done
	rm -f "$WORK/usr.tar"
	sync
fi
alloc=$(du -B1 "$IMG" | cut -f1)
echo "image: $(numfmt --to=iec "$size") apparent, $(numfmt --to=iec "$alloc") allocated" >&2

# run NAME CMD...: runs CMD under GNU time into $WORK/NAME.$round.time
# (wall seconds, peak RSS KiB, user and system CPU seconds).
run() {
	name=$1; shift
	sync
	/usr/bin/time -f "%e %M %U %S" -o "$WORK/$name.$round.time" "$@" >"$WORK/$name.log" 2>&1 || {
		echo "$name failed:" >&2; cat "$WORK/$name.log" >&2; exit 1; }
}

ROUNDS=${ROUNDS:-3}
cat "$IMG" >/dev/null # warm the page cache for both
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
round=1
while [ $round -le $ROUNDS ]; do
	echo "round $round of $ROUNDS" >&2
	rm -rf "$WORK/vmshadow-repo" "$WORK/restic-repo"
	"$BIN" repo init --repo "$WORK/vmshadow-repo" >/dev/null
	restic init --repository-version 2 --repo "$WORK/restic-repo" >/dev/null
	run vmshadow "$BIN" backup --repo "$WORK/vmshadow-repo" --vm bench --disk sda="$IMG"
	run restic restic backup --repo "$WORK/restic-repo" --quiet "$IMG"
	run vmshadow-again "$BIN" backup --repo "$WORK/vmshadow-repo" --vm bench --disk sda="$IMG"
	# --force: re-read the image instead of trusting its unchanged mtime and
	# size (vmshadow has no such shortcut for images; live backups use bitmaps).
	run restic-again restic backup --repo "$WORK/restic-repo" --quiet --force "$IMG"
	round=$((round + 1))
done

# report NAME REPO: the round with the median wall time.
report() {
	name=$1 repo=$2
	set -- $(cat "$WORK/$name".*.time | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")
	secs=$1 rss_kib=$2 cpu=$(echo "$3 $4" | awk '{ printf "%.1f", $1 + $2 }')
	maxrss=$(cat "$WORK/$name".*.time | awk '$2 > m { m = $2 } END { print int(m / 1024) }')
	mbs=$(echo "$size $secs" | awk '{ printf "%.0f", $1 / 1048576 / $2 }')
	reposize=$(du -sb "$repo" | cut -f1)
	printf "%-16s %9s s %9s MiB/s %9s s %9s MiB %14s\n" "$name" "$secs" "$mbs" "$cpu" "$maxrss" "$reposize"
}
echo
echo "$(nproc) CPUs, $(restic version | cut -d' ' -f1-2), vmshadow $(git describe --always --dirty 2>/dev/null || echo dev), $ROUNDS rounds"
echo "load average before the runs: $LOAD (the figures are only comparable on an idle machine)"
printf "%-16s %11s %15s %11s %13s %14s\n" "run (median)" "wall time" "throughput" "CPU time" "max peak RSS" "repo bytes"
report vmshadow "$WORK/vmshadow-repo"
report restic "$WORK/restic-repo"
echo "second backup of the unchanged image (dedup only):"
report vmshadow-again "$WORK/vmshadow-repo"
report restic-again "$WORK/restic-repo"
