package walcheck

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// ext4Image makes a small ext4 image holding log as /wal.log (when not nil).
func ext4Image(t *testing.T, log []byte) string {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "mkfs.ext4")
	testutil.NeedCommand(t, "debugfs")
	testutil.NeedCommand(t, "e2fsck")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(32 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-F", "-q", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	if log != nil {
		src := filepath.Join(dir, "wal.log")
		if err := os.WriteFile(src, log, 0o644); err != nil {
			t.Fatal(err)
		}
		debugfsW(t, img, "write "+src+" wal.log")
	}
	return img
}

func debugfsW(t *testing.T, img, request string) {
	t.Helper()
	out, err := exec.Command("debugfs", "-w", "-R", request, img).CombinedOutput()
	if err != nil || strings.Contains(string(out), "rror") {
		t.Fatalf("debugfs -w -R %q: %v: %s", request, err, out)
	}
}

func TestCheckImage(t *testing.T) {
	ctx := context.Background()
	img := ext4Image(t, logOf(1, 500))
	res, err := CheckImage(ctx, img, "")
	if err != nil || res.LastSeq != 500 || res.TrailingPartial {
		t.Fatalf("got %+v, %v", res, err)
	}
	fsck, err := Fsck(ctx, img)
	if err != nil || !fsck.Clean || fsck.ExitCode != 0 || fsck.NeedsRecovery {
		t.Fatalf("fsck of a fresh image: %+v, %v", fsck, err)
	}

	if _, err := CheckImage(ctx, img, "/nope.log"); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("missing log: %v, want not found", err)
	}

	// A wrong link count is damage e2fsck -n reports and does not fix.
	debugfsW(t, img, "set_inode_field /wal.log links_count 5")
	fsck, err = Fsck(ctx, img)
	if err != nil || fsck.Clean || fsck.ExitCode != 4 || !strings.Contains(fsck.Output, "count") {
		t.Errorf("fsck of a damaged image: clean %v, exit %d, err %v:\n%s", fsck.Clean, fsck.ExitCode, err, fsck.Output)
	}
}

func TestCheckImageCorruptLog(t *testing.T) {
	log := logOf(1, 100)
	log[5000] ^= 0x80
	img := ext4Image(t, log)
	_, err := CheckImage(context.Background(), img, "")
	var ce *CorruptError
	if !errors.As(err, &ce) || !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), img) {
		t.Fatalf("err = %v, want a CorruptError naming the image", err)
	}
}

func TestImageErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	qcow := filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(qcow, []byte("QFI\xfb\x00\x00\x00\x03rest"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckImage(ctx, qcow, ""); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "qemu-img convert") {
		t.Errorf("qcow2: %v", err)
	}
	if _, err := Fsck(ctx, qcow); !errors.Is(err, errs.ErrUnsupported) {
		t.Errorf("qcow2 fsck: %v", err)
	}
	if _, err := CheckImage(ctx, filepath.Join(dir, "missing"), ""); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing image: %v", err)
	}
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "debugfs")
	junk := filepath.Join(dir, "junk.raw")
	if err := os.WriteFile(junk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckImage(ctx, junk, ""); err == nil || errors.Is(err, errs.ErrNotFound) {
		t.Errorf("image without a file system: %v, want an extraction error", err)
	}
}
