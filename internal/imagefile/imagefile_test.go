package imagefile

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestExtentsFollowHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img")
	f, _ := os.Create(p)
	const mib = 1 << 20
	f.Truncate(10 * mib)
	f.WriteAt(make([]byte, mib), 0)    // allocated (zeros, but data to SEEK_DATA)
	f.WriteAt([]byte("x"), 4*mib+10)   // one block allocated
	f.WriteAt([]byte("end"), 10*mib-3) // last block
	f.Close()
	im, err := Open("sda", p)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	var pos, data int64
	for e, err := range im.Extents(context.Background()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Off != pos || e.Len <= 0 {
			t.Fatalf("extent %+v does not continue at %d", e, pos)
		}
		pos += e.Len
		if e.Kind == backup.Data {
			data += e.Len
		}
	}
	if pos != 10*mib {
		t.Fatalf("extents cover %d of %d bytes", pos, 10*mib)
	}
	// ext4/xfs/tmpfs report holes at block granularity; allow a few blocks.
	if data < mib+8192 || data > mib+256<<10 {
		t.Errorf("%d bytes of data extents for 1 MiB + 2 blocks written", data)
	}
	buf := make([]byte, 3)
	if _, err := im.ReadAt(context.Background(), buf, 10*mib-3); err != nil || string(buf) != "end" {
		t.Fatalf("ReadAt: %q %v", buf, err)
	}
	if _, err := im.ReadAt(context.Background(), buf, 10*mib-2); err == nil {
		t.Fatal("read past the end succeeded")
	}
	if err := im.Finish(context.Background()); err != nil {
		t.Fatal(err)
	}
	os.Truncate(p, 11*mib)
	if err := im.Finish(context.Background()); err == nil {
		t.Fatal("size change not detected")
	}
}

// TestOpenRejectsNonImages: only regular files and block devices are disk
// images; anything else is a usage error naming the path and what it is,
// and a FIFO is not opened (that would block until a writer comes).
func TestOpenRejectsNonImages(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, what string }{
		{dir, "a directory"},
		{"/dev/zero", "a character device"},
		{"/dev/null", "a character device"},
		{fifo, "a named pipe"},
	} {
		done := make(chan error, 1)
		go func() {
			im, err := Open("sda", tc.path)
			if err == nil {
				im.Close()
			}
			done <- err
		}()
		var err error
		select {
		case err = <-done:
		case <-time.After(10 * time.Second):
			if w, err := os.OpenFile(fifo, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
				w.Close() // lets the blocked open return
			}
			t.Fatalf("Open(%s) blocks", tc.path)
		}
		if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), tc.path) || !strings.Contains(err.Error(), tc.what) {
			t.Errorf("Open(%s) = %v; want a usage error naming the path and %q", tc.path, err, tc.what)
		}
	}
	if _, err := Open("sda", filepath.Join(dir, "missing.raw")); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("Open(missing) = %v; want not found", err)
	}
	// A block device is a disk image (an unattached loop device may not
	// open, but not because of its type).
	if st, err := os.Stat("/dev/loop0"); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
		im, err := Open("sda", "/dev/loop0")
		if err == nil {
			im.Close()
		} else if errors.Is(err, errs.ErrUsage) {
			t.Errorf("Open(/dev/loop0): %v; a block device is a disk image", err)
		}
	}
}
