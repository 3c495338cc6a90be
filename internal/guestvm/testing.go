package guestvm

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// TempDir makes a directory removed when the test ends, short enough for
// UNIX socket paths (t.TempDir's can be too long).
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmshadow-vm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// DataDiskForTest makes an ext4 data disk named name in dir (see
// MakeDataDisk) and returns it for Options.DataDisks.
func DataDiskForTest(t testing.TB, dir, name string, size int64, format string) Disk {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "mkfs.ext4")
	if format == "qcow2" {
		testutil.NeedCommand(t, "qemu-img")
	}
	path := filepath.Join(dir, name)
	if err := MakeDataDisk(context.Background(), path, size, format); err != nil {
		t.Fatal(err)
	}
	return Disk{Path: path, Format: format}
}

// StartForTest builds the guest and boots it with opts (Dir defaults to a
// TempDir), and kills QEMU when the test ends, logging the console and QEMU's
// log if the test failed. It skips with -short, skips when a program it needs
// is missing (fails in CI), and fails when the guest cannot be built or booted.
func StartForTest(t testing.TB, opts Options) *VM {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "qemu-system-x86_64")
	testutil.NeedCommand(t, "apt-get")
	testutil.NeedCommand(t, "dpkg-deb")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	g, err := Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Dir == "" {
		opts.Dir = TempDir(t)
	}
	vm, err := Start(ctx, g, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ready in %v under %s (pid %d)", vm.BootTime.Round(time.Millisecond), vm.Accel, vm.PID)
	t.Cleanup(func() {
		vm.Kill()
		if t.Failed() {
			t.Logf("%s", vm.diagnostics())
		}
	})
	return vm
}
