package instant

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/nbd"
)

// memBase is an in-memory base for testing the overlay's block logic.
type memBase []byte

func (m memBase) Size() int64 { return int64(len(m)) }
func (m memBase) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	return copy(p, m[off:]), nil
}
func (m memBase) Extents(_ context.Context, off, length int64) ([]nbd.Extent, error) {
	return []nbd.Extent{{Offset: off, Length: length}}, nil
}

func TestOverlayMatchesModel(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	size := 10*Block + 1234 // a partial last block
	base := make(memBase, size)
	for i := range base {
		base[i] = byte(rng.IntN(256))
	}
	model := bytes.Clone(base)
	o, err := NewOverlay(base, filepath.Join(t.TempDir(), "overlay"))
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	for i := 0; i < 300; i++ {
		off := rng.IntN(size)
		n := 1 + rng.IntN(min(size-off, 3*Block))
		if rng.IntN(2) == 0 {
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.IntN(256))
			}
			if _, err := o.WriteAt(ctx, p, int64(off)); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		} else {
			p := make([]byte, n)
			if _, err := o.ReadAt(ctx, p, int64(off)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, model[off:off+n]) {
				t.Fatalf("step %d: read %d+%d differs from the model", i, off, n)
			}
		}
	}
	all := make([]byte, size)
	o.ReadAt(ctx, all, 0)
	if !bytes.Equal(all, model) {
		t.Fatal("final content differs from the model")
	}
	// The base was never written.
	if bytes.Equal(base, model) {
		t.Fatal("test wrote nothing")
	}
	// Extents cover the disk contiguously.
	for pos := int64(0); pos < int64(size); {
		ext, err := o.Extents(ctx, pos, int64(size)-pos)
		if err != nil || len(ext) == 0 || ext[0].Offset != pos {
			t.Fatalf("extents at %d: %v %v", pos, ext, err)
		}
		for _, e := range ext {
			pos = e.Offset + e.Length
		}
	}
}

// RemoveStaleOverlays removes the overlays nobody holds (left by a killed
// serve) and keeps a live one, which stays usable.
func TestRemoveStaleOverlays(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	base := make(memBase, 4*Block)
	live := filepath.Join(dir, "live-sda-1"+OverlaySuffix)
	o, err := NewOverlay(base, live)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	// What a serve killed with kill -9 leaves: its lock died with it.
	stale := filepath.Join(dir, "dead-sda-2"+OverlaySuffix)
	if err := os.WriteFile(stale, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	removed, err := RemoveStaleOverlays(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != stale {
		t.Errorf("removed %q, want only %s", removed, stale)
	}
	for p, want := range map[string]bool{live: true, stale: false, other: true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s exists: %v, want %v", filepath.Base(p), err == nil, want)
		}
	}
	p := bytes.Repeat([]byte{9}, Block)
	if _, err := o.WriteAt(ctx, p, Block); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, Block)
	if _, err := o.ReadAt(ctx, got, Block); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("live overlay after the clean-up: %v", err)
	}
	// Once closed (its serve ended without removing it), it is stale too.
	o.Close()
	if removed, err := RemoveStaleOverlays(dir); err != nil || len(removed) != 1 || removed[0] != live {
		t.Errorf("after close: removed %q, %v; want %s", removed, err, live)
	}
	if removed, err := RemoveStaleOverlays(filepath.Join(dir, "missing")); err != nil || len(removed) != 0 {
		t.Errorf("missing dir: %q, %v", removed, err)
	}
}
