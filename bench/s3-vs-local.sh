#!/bin/sh
# Backs up the same mixed disk image into a local directory repository and
# into an S3 repository on a real S3 server over loopback (versitygw, its
# data on the same file system), side by side, and prints the median
# throughput of each and their ratio (issue 8 asks for S3 >= 0.8 x local).
#
# Usage: bench/s3-vs-local.sh [SIZE_GIB] [WORKDIR]
#   SIZE_GIB  image size in GiB (default 2)
#   WORKDIR   scratch directory (default bench/out-s3); needs about 3 x SIZE free
# Environment: ROUNDS (default 5), ENCRYPTION (aes-256-gcm or none,
#   default aes-256-gcm), S3_CONNECTIONS (vmshadow --s3-connections).
#
# The image mixes what VM disks hold (like bench/repo-vs-restic.sh): 25%
# compressible system files, 25% random data, 15% duplicated regions, 35%
# holes. Rounds alternate which target goes first. CPU time is vmshadow's;
# the S3 server's CPU time is reported separately (on a real deployment it
# runs elsewhere). Needs: go, curl, GNU time; the script installs versitygw
# (scripts/s3-test-server.sh).
set -eu
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-2}
WORK=${2:-bench/out-s3}
ROUNDS=${ROUNDS:-5}
ENCRYPTION=${ENCRYPTION:-aes-256-gcm}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
IMG=$WORK/image.raw
BIN=$WORK/vmshadow
PORT=${PORT:-17171}
for c in /usr/bin/time go curl; do
	command -v $c >/dev/null || { echo "missing $c: run scripts/deps.sh bench" >&2; exit 2; }
done
go build -o "$BIN" ./cmd/vmshadow
export VMSHADOW_PASSWORD=bench-password
AWS_ACCESS_KEY_ID=bench$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
AWS_SECRET_ACCESS_KEY=$(od -An -N20 -tx4 /dev/urandom | tr -d ' \n')
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_REGION AWS_DEFAULT_REGION
S3DIR=$WORK/s3
rm -rf "$S3DIR"
scripts/s3-test-server.sh start "$S3DIR" "$PORT"
trap 'scripts/s3-test-server.sh stop "$S3DIR"' EXIT INT TERM
S3PID=$(cat "$S3DIR/versitygw.pid")

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

# cpu PID: user+system clock ticks of a process.
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# run NAME REPO: init REPO, back up the image into it under GNU time into
# $WORK/NAME.$round.time (wall s, peak RSS KiB, user s, system s, server s).
run() {
	name=$1 repo=$2
	"$BIN" repo init --repo "$repo" --encryption "$ENCRYPTION" >/dev/null
	sync
	s0=$(cpu "$S3PID")
	/usr/bin/time -f "%e %M %U %S" -o "$WORK/$name.$round.time" \
		"$BIN" backup --repo "$repo" ${S3_CONNECTIONS:+--s3-connections "$S3_CONNECTIONS"} --vm bench --disk sda="$IMG" >"$WORK/$name.log" 2>&1 || {
		echo "$name failed:" >&2; cat "$WORK/$name.log" >&2; exit 1; }
	s1=$(cpu "$S3PID")
	sed -i "s/\$/ $(echo "$s0 $s1 $HZ" | awk '{ printf "%.1f", ($2 - $1) / $3 }')/" "$WORK/$name.$round.time"
	sync
}

cat "$IMG" >/dev/null # warm the page cache
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
rm -f "$WORK"/local.*.time "$WORK"/s3.*.time
round=1
while [ $round -le $ROUNDS ]; do
	echo "round $round of $ROUNDS" >&2
	rm -rf "$WORK/local-repo"
	s3repo="s3:http://127.0.0.1:$PORT/bench/round$round"
	if [ $((round % 2)) = 1 ]; then
		run local "$WORK/local-repo"
		run s3 "$s3repo"
	else
		run s3 "$s3repo"
		run local "$WORK/local-repo"
	fi
	rm -rf "$S3DIR/root/bench/round$round"
	round=$((round + 1))
done

# median NAME: the fields of the round with the median wall time.
median() { cat "$WORK/$1".*.time | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p"; }
report() {
	set -- $(median "$1")
	printf "%-8s %8s s %8s MiB/s %8s s %10s MiB %12s s\n" "$name" "$1" \
		"$(echo "$size $1" | awk '{ printf "%.0f", $1 / 1048576 / $2 }')" \
		"$(echo "$3 $4" | awk '{ printf "%.1f", $1 + $2 }')" "$(($2 / 1024))" "$5"
}
echo
echo "$(nproc) CPUs, vmshadow $(git describe --always --dirty 2>/dev/null || echo dev), $SIZE_GIB GiB image, encryption $ENCRYPTION, $ROUNDS rounds"
echo "load average before the runs: $LOAD (the figures are only comparable on an idle machine)"
printf "%-8s %10s %15s %10s %14s %14s\n" "target" "wall time" "throughput" "CPU time" "peak RSS" "server CPU"
name=local report local
name=s3 report s3
l=$(median local | cut -d' ' -f1)
s=$(median s3 | cut -d' ' -f1)
# Per round, the two runs were back to back: their ratio is less disturbed
# by other load on the machine than the ratio of medians.
ratios=$(r=1; while [ $r -le $ROUNDS ]; do
	echo "$(cut -d' ' -f1 "$WORK/local.$r.time") $(cut -d' ' -f1 "$WORK/s3.$r.time")" | awk '{ printf "%.2f\n", $1 / $2 }'
	r=$((r + 1)); done)
echo "rounds (wall s, local/s3): $(r=1; while [ $r -le $ROUNDS ]; do printf "%s/%s " "$(cut -d' ' -f1 "$WORK/local.$r.time")" "$(cut -d' ' -f1 "$WORK/s3.$r.time")"; r=$((r + 1)); done)"
echo "S3 / local throughput: $(echo "$l $s" | awk '{ printf "%.2f", $1 / $2 }') from the medians; per round $(echo $ratios), median $(echo "$ratios" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p") (issue 8: at least 0.80)"
