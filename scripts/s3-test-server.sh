#!/bin/sh
# Installs and runs versitygw, the real S3 server (Apache-2.0, an S3 gateway
# over a POSIX directory, one subdirectory per bucket) that vmshadow's S3
# tests and benchmarks run against. The tests find the same binary (or
# install it themselves: internal/repo/backend/s3/s3test).
#
# Usage:
#   scripts/s3-test-server.sh install          build it once into the cache (about 3 min on 2 cores); prints its path
#   scripts/s3-test-server.sh path             prints its path (exit 1 if not installed)
#   scripts/s3-test-server.sh start DIR [PORT] runs it in the background over DIR on 127.0.0.1:PORT
#                                              (default 7070) until 'stop DIR'; the root credentials are
#                                              $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY (the variables
#                                              vmshadow reads), so set them first
#   scripts/s3-test-server.sh stop DIR         stops the server started over DIR
#
# Cache: ${XDG_CACHE_HOME:-~/.cache}/vmshadow/bin/versitygw-VERSION/versitygw.
set -eu
VERSION=v1.8.0
MODULE=github.com/versity/versitygw/cmd/versitygw
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/vmshadow/bin
BIN=$CACHE/versitygw-$VERSION/versitygw
export PATH="$PATH:/usr/local/go/bin"

install() {
	[ -x "$BIN" ] && { echo "$BIN"; return 0; }
	command -v go >/dev/null || { echo "go is not installed" >&2; exit 2; }
	mkdir -p "$(dirname "$BIN")"
	# The tests take the same lock, so parallel installs build once.
	exec 9>"$CACHE/versitygw-$VERSION.lock"
	flock 9
	if [ ! -x "$BIN" ]; then
		echo "building versitygw $VERSION (once, about 3 minutes)" >&2
		tmp=$(mktemp -d "$(dirname "$BIN")/install-XXXXXX")
		GOBIN=$tmp GOFLAGS=-buildvcs=false CGO_ENABLED=0 go install "$MODULE@$VERSION"
		mv "$tmp/versitygw" "$BIN"
		rmdir "$tmp"
	fi
	flock -u 9
	echo "$BIN"
}

case "${1:-}" in
install) install ;;
path) [ -x "$BIN" ] && echo "$BIN" || exit 1 ;;
start)
	dir=${2:?usage: $0 start DIR [PORT]}
	port=${3:-7070}
	: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the server takes them as its root credentials}"
	: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
	install >/dev/null
	mkdir -p "$dir/root"
	ROOT_ACCESS_KEY=$AWS_ACCESS_KEY_ID ROOT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
		setsid "$BIN" --port "127.0.0.1:$port" --keep-alive --quiet posix "$dir/root" >"$dir/versitygw.log" 2>&1 &
	echo $! >"$dir/versitygw.pid"
	i=0
	until curl -s -o /dev/null "http://127.0.0.1:$port/"; do
		i=$((i + 1))
		if [ $i -gt 100 ] || ! kill -0 "$(cat "$dir/versitygw.pid")" 2>/dev/null; then
			echo "versitygw did not start:" >&2
			cat "$dir/versitygw.log" >&2
			exit 1
		fi
		sleep 0.1
	done
	echo "versitygw listening on http://127.0.0.1:$port (buckets are directories in $dir/root)" >&2
	;;
stop)
	dir=${2:?usage: $0 stop DIR}
	[ -f "$dir/versitygw.pid" ] && kill "$(cat "$dir/versitygw.pid")" 2>/dev/null || true
	rm -f "$dir/versitygw.pid"
	;;
*)
	sed -n '2,19p' "$0" >&2
	exit 2
	;;
esac
