// Package testutil holds small helpers shared by tests: finding the external
// programs tests run against (QEMU, qemu-img, qemu-nbd, nbdkit) with the rule
// that in CI (CI=true) a missing program fails the test instead of skipping it.
package testutil

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// InCI reports whether the tests run in CI, where nothing may be skipped for
// lack of a program.
func InCI() bool { return os.Getenv("CI") == "true" }

// NeedCommand returns the path of the named program. When it is missing the
// test fails in CI and is skipped elsewhere.
func NeedCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if InCI() {
			t.Fatalf("%s is required (CI=true) but not installed: run 'make deps'", name)
		}
		t.Skipf("%s not installed (run 'make deps')", name)
	}
	return p
}

// SkipShort skips a test that runs external programs when -short is given.
// In CI -short is never given.
func SkipShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs external programs; skipped with -short")
	}
}

// ServeUnix listens on a UNIX socket in a new short-named temporary
// directory (socket paths are limited to 108 bytes) and runs serve for
// every connection it accepts, each in its own goroutine: a peer (QMP,
// guest agent, NBD) that misbehaves in the way serve does. A connection
// stays open, silent, after serve returns, until the test ends; then the
// listener and the directory go. It returns the socket's path.
func ServeUnix(t testing.TB, serve func(net.Conn)) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmshadow-peer")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "peer.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); ln.Close(); os.RemoveAll(dir) })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				serve(conn)
				<-done
			}()
		}
	}()
	return path
}
