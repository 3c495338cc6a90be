package imagefile

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
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
