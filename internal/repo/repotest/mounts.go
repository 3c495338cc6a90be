// Package repotest owns test helpers for repository tests that need real
// file-system conditions: a read-only view of a directory and a tiny tmpfs
// that fills up. Both need root (mount); without it the test is skipped, or
// fails when CI=true.
package repotest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

func needMount(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if testutil.InCI() {
			t.Fatal("this test needs root to mount (CI=true)")
		}
		t.Skip("needs root to mount")
	}
	testutil.NeedCommand(t, "mount")
}

func run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// ReadOnlyDir returns a read-only bind mount of dir, unmounted at cleanup.
// Writes through it fail with EROFS even for root.
func ReadOnlyDir(t testing.TB, dir string) string {
	t.Helper()
	needMount(t)
	mp := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(mp, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "--bind", dir, mp)
	t.Cleanup(func() { exec.Command("umount", mp).Run() })
	run(t, "mount", "-o", "remount,bind,ro", mp)
	return mp
}

// TinyTmpfs mounts a tmpfs of size bytes and returns its path, unmounted at
// cleanup.
func TinyTmpfs(t testing.TB, size int64) string {
	t.Helper()
	needMount(t)
	mp := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(mp, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-t", "tmpfs", "-o", "size="+strconv.FormatInt(size, 10), "tmpfs", mp)
	t.Cleanup(func() { exec.Command("umount", mp).Run() })
	return mp
}
