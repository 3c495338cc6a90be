package guestvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// MakeDataDisk creates an empty ext4 data disk of size bytes at path in the
// format "raw" or "qcow2" (persistent dirty bitmaps need qcow2). The file
// system is made whole up front (no lazy inode table initialisation), so the
// guest writes nothing but what walapp writes. No root needed.
func MakeDataDisk(ctx context.Context, path string, size int64, format string) error {
	if size < 16<<20 {
		return fmt.Errorf("data disk of %d bytes is too small for ext4 with a journal: give at least 16 MiB", size)
	}
	raw := path
	switch format {
	case "raw", "":
	case "qcow2":
		raw = path + ".raw.tmp"
		defer os.Remove(raw)
	default:
		return fmt.Errorf("data disk format %q: use raw or qcow2", format)
	}
	f, err := os.Create(raw)
	if err != nil {
		return fmt.Errorf("create data disk: %w", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("size data disk %s: %w", raw, err)
	}
	if err := run(ctx, "mkfs.ext4", "-F", "-q", "-m", "0", "-L", "vmshadow-data",
		"-E", "lazy_itable_init=0,lazy_journal_init=0", raw); err != nil {
		return err
	}
	if format == "qcow2" {
		return run(ctx, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path)
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
