package qcow2

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkSequentialWrite writes a 256 MiB disk in 4 MiB pieces in
// increasing order, as restore does, into a qcow2 image and, for reference,
// into a raw file; each op ends with the file synced. "zeros" writes only
// zeros, which the qcow2 writer skips.
func BenchmarkSequentialWrite(b *testing.B) {
	const size, piece = 256 << 20, 4 << 20
	data := make([]byte, piece) // incompressible, no zero cluster
	rand.NewChaCha8([32]byte{1}).Read(data)
	zeros := make([]byte, piece)
	path := filepath.Join(b.TempDir(), "img")
	type writer interface {
		WriteAt([]byte, int64) (int, error)
	}
	for _, bc := range []struct {
		name string
		buf  []byte
		open func(f *os.File) (writer, func() error, error)
	}{
		{"raw", data, func(f *os.File) (writer, func() error, error) { return f, f.Sync, f.Truncate(size) }},
		{"qcow2", data, func(f *os.File) (writer, func() error, error) {
			w, err := Create(f, size, Options{})
			return w, func() error { return w.Close() }, err
		}},
		{"qcow2-zeros", zeros, func(f *os.File) (writer, func() error, error) {
			w, err := Create(f, size, Options{})
			return w, func() error { return w.Close() }, err
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				f, err := os.Create(path)
				if err != nil {
					b.Fatal(err)
				}
				w, done, err := bc.open(f)
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < size; off += piece {
					if _, err := w.WriteAt(bc.buf, off); err != nil {
						b.Fatal(err)
					}
				}
				if err := done(); err != nil {
					b.Fatal(err)
				}
				f.Close()
				os.Remove(path)
			}
		})
	}
}

// BenchmarkHugeImage creates and completes a 64 TiB image holding 1 MiB:
// B/op shows memory is bounded by the L1 table, not the virtual size.
func BenchmarkHugeImage(b *testing.B) {
	path := filepath.Join(b.TempDir(), "img")
	data := make([]byte, 1<<20)
	data[0] = 1
	b.ReportAllocs()
	for b.Loop() {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		w, err := Create(f, 64<<40, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := w.WriteAt(data, 40<<40); err != nil {
			b.Fatal(err)
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}
