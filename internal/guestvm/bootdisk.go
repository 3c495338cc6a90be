package guestvm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

var (
	bootDiskMu  sync.Mutex
	bootDiskRes string
)

// BuildBootDisk runs guest/bootdisk.sh, which builds (once, cached next to
// the guest's build) bootable raw disk images of the test guest, kernel and
// initramfs on a FAT partition, qemu-ga started by the guest's init: for
// BIOS (MBR, syslinux) and for UEFI (GPT, systemd-boot; UEFIBootDisk
// names it). It returns the BIOS image's path; copy an image before
// writing to it. Within one process the script runs once.
func BuildBootDisk(ctx context.Context) (string, error) {
	bootDiskMu.Lock()
	defer bootDiskMu.Unlock()
	if bootDiskRes != "" {
		return bootDiskRes, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "guest", "bootdisk.sh"))
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build the bootable test guest disk (guest/bootdisk.sh): %w\n%s", err, tail(stderr.String(), 40))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	img := lines[len(lines)-1]
	if st, err := os.Stat(img); err != nil || !st.Mode().IsRegular() {
		return "", fmt.Errorf("guest/bootdisk.sh did not produce a disk image (%q): %v", img, err)
	}
	bootDiskRes = img
	return img, nil
}

// BootDiskForTest builds the bootable test guest disk (BuildBootDisk) and
// returns its cached path (read it, do not write it). It skips with
// -short, and when a program it needs is missing (fails in CI).
func BootDiskForTest(t testing.TB) string {
	t.Helper()
	testutil.SkipShort(t)
	for _, c := range []string{"qemu-system-x86_64", "apt-get", "dpkg-deb", "syslinux", "mcopy", "mkfs.vfat", "sfdisk"} {
		testutil.NeedCommand(t, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img, err := BuildBootDisk(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// UEFIBootDisk is the UEFI image built next to the BIOS image bios.
func UEFIBootDisk(bios string) string { return filepath.Join(filepath.Dir(bios), "boot-uefi.img") }
