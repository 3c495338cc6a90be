package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"sync"
	"syscall"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestCreateRejectsBadArguments(t *testing.T) {
	cases := []struct {
		name  string
		size  int64
		opts  Options
		class error
	}{
		{"negative size", -512, Options{}, errs.ErrUsage},
		{"size not a multiple of 512", 1000, Options{}, errs.ErrUsage},
		{"cluster size not a power of two", 1 << 20, Options{ClusterSize: 3 << 10}, errs.ErrUsage},
		{"cluster size too small", 1 << 20, Options{ClusterSize: 256}, errs.ErrUsage},
		{"cluster size too large", 1 << 20, Options{ClusterSize: 4 << 20}, errs.ErrUsage},
		{"negative cache", 1 << 20, Options{L2CacheTables: -1}, errs.ErrUsage},
		// 512-byte clusters: one L1 entry maps 32 KiB; 32 MiB of L1 maps 128 GiB.
		{"L1 table beyond QEMU's limit", 128<<30 + 512, Options{ClusterSize: 512}, errs.ErrUnsupported},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := Create(newMemFile(), c.size, c.opts); !errors.Is(err, c.class) {
				t.Fatalf("Create: %v, want %v", err, c.class)
			}
		})
	}
	// The largest size that fits is accepted.
	if _, err := Create(newMemFile(), 128<<30, Options{ClusterSize: 512}); err != nil {
		t.Fatalf("Create 128 GiB with 512-byte clusters: %v", err)
	}
}

func TestWriteOutOfRange(t *testing.T) {
	m := newMemFile()
	w, err := Create(m, 1<<20, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n int64 }{{-1, 1}, {1 << 20, 1}, {1<<20 - 10, 11}, {1<<20 + 1, 0}, {1 << 62, 4096}} {
		if n, err := w.WriteAt(make([]byte, c.n), c.off); err == nil || n != 0 {
			t.Errorf("WriteAt(%d bytes at %d) = %d, %v; want an error", c.n, c.off, n, err)
		}
	}
	// A range error leaves the writer usable.
	if _, err := w.WriteAt([]byte{1}, 1<<20-1); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(nil, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("WriteAt after Close succeeded")
	}
	if err := w.Close(); err == nil {
		t.Fatal("second Close succeeded")
	}
	r, err := Open(bytes.NewReader(m.b), int64(len(m.b)))
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 1<<20)
	want[len(want)-1] = 1
	if err := compareReader(r, want); err != nil {
		t.Fatal(err)
	}
}

// TestWriteFailureIsSticky injects a write failure at every possible point
// and checks that the error is reported, repeated by later calls, and that
// the image is never completed.
func TestWriteFailureIsSticky(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	ops := randomOps(rng, 1<<20, 4096, 40)
	for failAfter := 0; ; failAfter++ {
		m := newMemFile()
		m.failAfter, m.failErr = failAfter, syscall.ENOSPC
		w, err := Create(m, 1<<20, Options{ClusterSize: 4096, L2CacheTables: 1})
		if err == nil {
			for _, o := range ops {
				if _, err = w.WriteAt(o.data, o.off); err != nil {
					break
				}
			}
			if err == nil {
				err = w.Close()
			}
		}
		if err == nil {
			if m.writes != failAfter {
				t.Fatalf("no error although write %d of %d should have failed", failAfter+1, m.writes)
			}
			break // every failure point has been tried
		}
		if !errors.Is(err, errs.ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("failure after %d writes: %v, want ErrNoSpace wrapping ENOSPC", failAfter, err)
		}
		if w == nil {
			continue
		}
		if _, err2 := w.WriteAt([]byte{1}, 0); !errors.Is(err2, syscall.ENOSPC) {
			t.Fatalf("WriteAt after a failure: %v, want the first error", err2)
		}
		if err2 := w.Close(); !errors.Is(err2, syscall.ENOSPC) {
			t.Fatalf("Close after a failure: %v, want the first error", err2)
		}
		if _, err2 := Open(bytes.NewReader(m.b), int64(len(m.b))); !errors.Is(err2, errs.ErrCorrupt) {
			t.Fatalf("Open of an image whose writer failed: %v, want ErrCorrupt", err2)
		}
	}
}

// TestConcurrentWrites: WriteAt is safe for concurrent use (run with -race).
func TestConcurrentWrites(t *testing.T) {
	const size, cs = 8 << 20, 4096
	m := newMemFile()
	w, err := Create(m, size, Options{ClusterSize: cs, L2CacheTables: 2})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	var wg sync.WaitGroup
	for g := range 4 {
		// Each goroutine owns every fourth 64 KiB stripe.
		rng := rand.New(rand.NewPCG(uint64(g), 9))
		var ops []op
		for stripe := int64(g); stripe < size/65536; stripe += 4 {
			for range 3 {
				off := stripe*65536 + rng.Int64N(65536-1000)
				data := make([]byte, 1+rng.IntN(999))
				fillRandom(rng, data)
				ops = append(ops, op{off, data})
			}
		}
		applyModel(model, ops, cs)
		wg.Go(func() {
			for _, o := range ops {
				if _, err := w.WriteAt(o.data, o.off); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := checkLayout(bytes.NewReader(m.b), int64(len(m.b))); err != nil {
		t.Fatal(err)
	}
	r, err := Open(bytes.NewReader(m.b), int64(len(m.b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := compareReader(r, model); err != nil {
		t.Fatal(err)
	}
}

// TestMemoryBoundedHugeImage: creating and completing a 64 TiB image with a
// few writes allocates little more than its 1 MiB L1 table.
func TestMemoryBoundedHugeImage(t *testing.T) {
	const size = 64 << 40
	m := newMemFile()
	m.b = make([]byte, 0, 8<<20) // so that the file's growth allocates nothing
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	w, err := Create(m, size, Options{})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 1<<20)
	for _, off := range []int64{0, 1 << 40, 33 << 40, size - 1<<20} {
		if _, err := w.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if cap(m.b) != 8<<20 {
		t.Fatalf("the in-memory image file grew to %d bytes", len(m.b))
	}
	// L1 1 MiB, its encoded copy 1 MiB, 4 cached L2 tables and scratch of
	// 64 KiB each, the 1 MiB of data written.
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d bytes", alloc)
	if alloc > 4<<20 {
		t.Fatalf("allocated %d bytes besides the image file for a 64 TiB image", alloc)
	}
	lay, err := checkLayout(bytes.NewReader(m.b), int64(len(m.b)))
	if err != nil {
		t.Fatal(err)
	}
	if lay.dataClusters != 64 || lay.l2Tables != 4 {
		t.Fatalf("layout %+v, want 64 data clusters in 4 L2 tables", lay)
	}
}

// FuzzWriter applies random write sequences to a Writer with 512-byte
// clusters and a tiny L2 cache, and to a flat model, then checks the layout
// invariants, exact sparseness and the content read back.
func FuzzWriter(f *testing.F) {
	f.Add([]byte{0, 0})
	f.Add([]byte("\x07\x01\x00\x10\x00\x00\x02\x00\x01\xff\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x03\x00\x03\x00\x00\x00\x01"))
	f.Add(bytes.Repeat([]byte{0x3c, 0x91, 0x05, 0x00, 0x02, 0x00, 0x00, 0x7e}, 40))
	rng := rand.New(rand.NewPCG(5, 5))
	for range 4 {
		b := make([]byte, 300)
		fillRandom(rng, b)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 2 {
			return
		}
		const cs = 512                   // an L2 table maps 64 clusters, 32 KiB
		size := int64(in[0]%65) * 8 * cs // 0 to 256 KiB
		cacheTables := 1 + int(in[1]%3)
		in = in[2:]
		m := newMemFile()
		w, err := Create(m, size, Options{ClusterSize: cs, L2CacheTables: cacheTables})
		if err != nil {
			t.Fatal(err)
		}
		model := make([]byte, size)
		var ops []op
		for len(in) >= 7 {
			// 3 bytes offset, 2 bytes length, 1 byte kind, 1 byte value.
			off := int64(in[0])<<16 | int64(in[1])<<8 | int64(in[2])
			off %= size + 64 // sometimes out of range
			l := int64(in[3])<<8 | int64(in[4])
			l %= 3 * cs
			data := make([]byte, l)
			switch in[5] % 4 {
			case 0: // zeros
			case 1: // one value
				for i := range data {
					data[i] = in[6]
				}
			case 2: // one non-zero byte somewhere
				if l > 0 {
					data[int64(in[6])*l/256] = in[6] | 1
				}
			case 3: // counting
				for i := range data {
					data[i] = byte(int(in[6]) + i)
				}
			}
			in = in[7:]
			n, err := w.WriteAt(data, off)
			if off+l > size {
				if err == nil || n != 0 {
					t.Fatalf("WriteAt(%d bytes at %d) beyond size %d = %d, %v", l, off, size, n, err)
				}
				continue
			}
			if err != nil || n != int(l) {
				t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", l, off, n, err)
			}
			ops = append(ops, op{off, data})
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		alloc := applyModel(model, ops, cs)
		lay, err := checkLayout(bytes.NewReader(m.b), int64(len(m.b)))
		if err != nil {
			t.Fatal(err)
		}
		tables := map[int64]bool{}
		for c := range alloc {
			tables[c/(cs/8)] = true
		}
		if lay.dataClusters != int64(len(alloc)) || lay.l2Tables != int64(len(tables)) {
			t.Fatalf("%d data clusters in %d L2 tables, want %d in %d", lay.dataClusters, lay.l2Tables, len(alloc), len(tables))
		}
		r, err := Open(bytes.NewReader(m.b), int64(len(m.b)))
		if err != nil {
			t.Fatal(err)
		}
		if err := compareReader(r, model); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzOpen feeds arbitrary bytes to Open and ReadAt: errors are fine,
// panics and unbounded work are not.
func FuzzOpen(f *testing.F) {
	for i, size := range []int64{0, 4096, 100 << 10} {
		m := newMemFile()
		w, err := Create(m, size, Options{ClusterSize: 512, L2CacheTables: 1})
		if err != nil {
			f.Fatal(err)
		}
		if size > 0 {
			if _, err := w.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 1500), size/3); err != nil {
				f.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			f.Fatal(err)
		}
		f.Add(m.b)
		// A version 2 variant of the same image.
		v2 := bytes.Clone(m.b)
		v2[7] = 2
		f.Add(v2)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		r, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			if !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrUnsupported) {
				t.Fatalf("Open error without a class: %v", err)
			}
			return
		}
		buf := make([]byte, 64<<10)
		for _, off := range []int64{0, 64 << 10, 128 << 10, r.Size() - 100} {
			if off < 0 {
				continue
			}
			n, err := r.ReadAt(buf, off)
			if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrUnsupported) {
				t.Fatalf("ReadAt error without a class: %v", err)
			}
			if n < 0 || n > len(buf) {
				t.Fatalf("ReadAt returned %d", n)
			}
		}
	})
}

func ExampleCreate() {
	f := newMemFile() // an *os.File in real use
	w, err := Create(f, 1<<30, Options{})
	if err != nil {
		panic(err)
	}
	// Unaligned, and mostly zeros: only the cluster holding "hello" is
	// allocated.
	chunk := make([]byte, 4<<20)
	copy(chunk[100:], "hello")
	if _, err := w.WriteAt(chunk, 12345); err != nil {
		panic(err)
	}
	if err := w.Close(); err != nil {
		panic(err)
	}
	r, err := Open(bytes.NewReader(f.b), int64(len(f.b)))
	if err != nil {
		panic(err)
	}
	got := make([]byte, 5)
	if _, err := r.ReadAt(got, 12345+100); err != nil {
		panic(err)
	}
	fmt.Printf("%s, file of %d KiB\n", got, len(f.b)>>10)
	// Output: hello, file of 384 KiB
}
