// Package guestvm builds and boots the vmshadow test guest: a small Linux VM
// made only from Debian packages by guest/build.sh, running the real qemu-ga
// with an fsfreeze hook and the walapp workload (guest/walapp) that writes a
// write-ahead log on each ext4 data disk. Tests and the demo use it to prove
// application consistency against a real guest under real QEMU.
//
// Build runs the build script (cached); MakeDataDisk makes an ext4 data disk;
// Start boots QEMU with the data disks as virtio-blk devices, a QMP socket, the
// guest agent's socket and the guest's control socket, and waits until the
// guest prints its ready marker. StartForTest does all three for a test.
package guestvm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// Guest is a built guest: the files QEMU boots.
type Guest struct {
	Dir      string // cache directory holding the files below
	Kernel   string // uncompressed vmlinux, booted through PVH
	BzImage  string // the packaged kernel, for QEMUs that cannot boot vmlinux
	Initrd   string // gzip'd cpio initramfs
	Manifest string // what went in, with package versions and sizes
}

var (
	buildMu  sync.Mutex
	buildRes *Guest
)

// RepoRoot is the directory of the vmshadow source tree holding guest/build.sh,
// found from this file's compile-time location; VMSHADOW_REPO overrides it.
func RepoRoot() (string, error) {
	if r := os.Getenv("VMSHADOW_REPO"); r != "" {
		return r, nil
	}
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("cannot locate the vmshadow source tree: set VMSHADOW_REPO")
	}
	root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	if _, err := os.Stat(filepath.Join(root, "guest", "build.sh")); err != nil {
		return "", fmt.Errorf("guest/build.sh not found under %s (set VMSHADOW_REPO to the source tree): %w", root, err)
	}
	return root, nil
}

// Build runs guest/build.sh, which builds the guest or finds it in its cache
// (see the script for the cache location), and returns the files. Within one
// process the script runs once.
func Build(ctx context.Context) (*Guest, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildRes != nil {
		return buildRes, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "guest", "build.sh"))
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("build the test guest (guest/build.sh): %w\n%s", err, tail(stderr.String(), 40))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := lines[len(lines)-1]
	g := &Guest{
		Dir:      dir,
		Kernel:   filepath.Join(dir, "vmlinux"),
		BzImage:  filepath.Join(dir, "bzImage"),
		Initrd:   filepath.Join(dir, "initrd.img"),
		Manifest: filepath.Join(dir, "manifest.txt"),
	}
	for _, f := range []string{g.Kernel, g.BzImage, g.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("guest/build.sh did not produce %s: %w", f, err)
		}
	}
	buildRes = g
	return g, nil
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
