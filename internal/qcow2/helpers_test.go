package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os/exec"
	"slices"
	"testing"
)

// memFile is an in-memory File for fuzzing and failure injection. Writes
// fail with failErr once failAfter writes have succeeded (failAfter < 0:
// never).
type memFile struct {
	b         []byte
	writes    int
	failAfter int
	failErr   error
}

func newMemFile() *memFile { return &memFile{failAfter: -1} }

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if m.failAfter >= 0 && m.writes >= m.failAfter {
		return 0, m.failErr
	}
	m.writes++
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.resize(end)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func (m *memFile) Truncate(size int64) error {
	m.resize(size)
	return nil
}

// resize sets the file size; new bytes read as zeros.
func (m *memFile) resize(size int64) {
	old := int64(len(m.b))
	m.b = slices.Grow(m.b, int(max(0, size-old)))[:size]
	if size > old {
		clear(m.b[old:])
	}
}

func (m *memFile) Sync() error { return nil }

// op is one write of a test pattern.
type op struct {
	off  int64
	data []byte
}

// randomOps makes n writes into a disk of size bytes with clusters of cs
// bytes, mixing what restore and worse callers do: unaligned random data,
// zero runs over written and unwritten space, chunks that are part zero
// clusters and part data, tiny writes, writes touching the end of the disk,
// and overwrites of earlier writes.
func randomOps(rng *rand.Rand, size, cs int64, n int) []op {
	var ops []op
	randLen := func(max int64) int64 { return 1 + rng.Int64N(max) }
	for range n {
		var off, l int64
		kind := rng.IntN(7)
		switch kind {
		case 0, 1: // random extent, unaligned
			l = randLen(min(size, 3*cs+cs/2))
			off = rng.Int64N(size - l + 1)
		case 2: // tiny
			l = randLen(min(size, 16))
			off = rng.Int64N(size - l + 1)
		case 3: // aligned chunk of several clusters
			l = min(size, cs*randLen(8))
			off = rng.Int64N(size/cs-l/cs+1) * cs
		case 4: // touching the end
			l = randLen(min(size, 2*cs))
			off = size - l
		case 5, 6: // overwrite an earlier write, partly
			if len(ops) == 0 {
				l = randLen(min(size, cs))
				off = rng.Int64N(size - l + 1)
				break
			}
			prev := ops[rng.IntN(len(ops))]
			off = prev.off + rng.Int64N(int64(len(prev.data)))
			l = randLen(int64(len(prev.data)))
			l = min(l, size-off)
		}
		data := make([]byte, l)
		switch rng.IntN(4) {
		case 0: // all zeros
		case 1: // data with zero clusters inside (as a restore chunk)
			fillRandom(rng, data)
			for c := int64(0); c < l; c += cs {
				if rng.IntN(2) == 0 {
					clear(data[c:min(l, c+cs)])
				}
			}
		default:
			fillRandom(rng, data)
		}
		ops = append(ops, op{off, data})
	}
	return ops
}

// fillRandom fills p with random bytes, or one time in three with zeros
// but for one byte, so that "not all zero" is sometimes decided late in a
// cluster.
func fillRandom(rng *rand.Rand, p []byte) {
	var w [8]byte
	for i := 0; i < len(p); i += 8 {
		binary.LittleEndian.PutUint64(w[:], rng.Uint64())
		copy(p[i:], w[:])
	}
	if len(p) > 0 && rng.IntN(3) == 0 {
		// Zero everything but one byte.
		k := rng.IntN(len(p))
		b := p[k] | 1
		clear(p)
		p[k] = b
	}
}

// applyModel applies ops to a flat model of the disk and returns the set of
// guest clusters that must be allocated: those that ever received a
// non-zero byte.
func applyModel(model []byte, ops []op, cs int64) map[int64]bool {
	alloc := map[int64]bool{}
	for _, o := range ops {
		copy(model[o.off:], o.data)
		for pos := int64(0); pos < int64(len(o.data)); {
			guest := o.off + pos
			n := min(cs-guest%cs, int64(len(o.data))-pos)
			if slices.ContainsFunc(o.data[pos:pos+n], func(b byte) bool { return b != 0 }) {
				alloc[guest/cs] = true
			}
			pos += n
		}
	}
	return alloc
}

// compareReader checks that r reads exactly model.
func compareReader(r *Reader, model []byte) error {
	if r.Size() != int64(len(model)) {
		return fmt.Errorf("reader size %d, want %d", r.Size(), len(model))
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < int64(len(model)); off += int64(len(buf)) {
		n, err := r.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read at %d: %v", off, err)
		}
		if !bytes.Equal(buf[:n], model[off:off+int64(n)]) {
			for i := range n {
				if buf[i] != model[off+int64(i)] {
					return fmt.Errorf("byte at guest offset %d is %#x, want %#x", off+int64(i), buf[i], model[off+int64(i)])
				}
			}
		}
	}
	return nil
}

// run runs a program and returns its combined output; it fails the test
// when the program fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}
