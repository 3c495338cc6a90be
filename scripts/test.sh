#!/bin/sh
# make test's test run: every package, with the end-to-end tests of
# cmd/vmshadow (the long pole: real guests under TCG) split into two shards
# run beside the other packages, so the machine's waits overlap. Each shard
# is its own test binary; the libvirt tests among them share one libvirtd
# through internal/libvirttest's lock.
set -u
GO=${GO:-go}
SHARD='^(TestFiles.*|TestHealthcheck.*|TestGuest.*|TestServer.*|TestLibvirt.*)$'
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
$GO test -count=1 -timeout 28m -run "$SHARD" ./cmd/vmshadow/ >"$dir/a" 2>&1 &
a=$!
$GO test -count=1 -timeout 28m -skip "$SHARD" ./cmd/vmshadow/ >"$dir/b" 2>&1 &
b=$!
$GO test -count=1 -timeout 28m $($GO list ./... | grep -v '/cmd/vmshadow$')
rest=$?
wait $a; ra=$?
wait $b; rb=$?
echo "--- cmd/vmshadow: end-to-end tests of files, healthcheck, guest, server, libvirt"
cat "$dir/a"
echo "--- cmd/vmshadow: the other tests"
cat "$dir/b"
[ $rest -eq 0 ] && [ $ra -eq 0 ] && [ $rb -eq 0 ]
