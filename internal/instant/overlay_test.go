package instant

import (
	"bytes"
	"context"
	"math/rand/v2"
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
