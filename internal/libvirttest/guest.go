package libvirttest

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// GuestOptions returns Options that boot the project's test guest (see
// internal/guestvm and guest/: a kernel and initramfs with qemu-ga and its
// fsfreeze hook, which mounts ext4 data disks on /data, /data-vdb, ...)
// with the org.qemu.guest_agent.0 channel libvirt talks to qemu-ga
// through. It builds the guest on first use (cached). Wait for
// guestvm.ReadyMarker on the console (WaitConsole) after Start.
func GuestOptions(t testing.TB, disks ...Disk) Options {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "apt-get")
	testutil.NeedCommand(t, "dpkg-deb")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	g, err := guestvm.Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The cache is under root's home, which QEMU's user cannot enter; and
	// libvirt relabels (chowns) the files it boots: give it copies.
	dir := TempDir(t)
	kernel, initrd := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd.img")
	for src, dst := range map[string]string{g.Kernel: kernel, g.Initrd: initrd} {
		if err := copyFile(src, dst); err != nil {
			t.Fatal(err)
		}
	}
	return Options{Disks: disks, Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1 quiet no_timer_check", Agent: true, MemoryMB: 256}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
