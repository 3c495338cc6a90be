package directio

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// alignedBuf returns n bytes of random data starting skew bytes past a
// 4 KiB boundary of memory.
func alignedBuf(n, skew int) []byte {
	b := make([]byte, n+2*Align)
	off := (Align - int(addr(b)%Align)) % Align
	b = b[off+skew : off+skew+n]
	r := rand.NewChaCha8([32]byte{byte(n), byte(n >> 8), byte(n >> 16), byte(skew), byte(skew >> 8)})
	r.Read(b)
	return b
}

func TestSplit(t *testing.T) {
	tests := []struct {
		name      string
		n, skew   int   // length and memory offset from a 4 KiB boundary
		off       int64 // file offset
		direct    bool  // O_DIRECT available
		head, mid int
	}{
		{"aligned whole", 4 << 20, 0, 0, true, 0, 4 << 20},
		{"aligned with tail", 4<<20 + 100, 0, 8192, true, 0, 4 << 20},
		{"memory and offset skewed alike", 1 << 20, 100, 4096*7 + 100, true, 3996, 1<<20 - 4096},
		{"memory and offset skewed differently", 1 << 20, 100, 4096, true, 0, 0},
		{"too small", MinSize - 1, 0, 0, true, 0, 0},
		{"smallest", MinSize, 0, 0, true, 0, MinSize},
		{"no O_DIRECT", 4 << 20, 0, 0, false, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := alignedBuf(tt.n, tt.skew)
			head, mid := split(p, tt.off, tt.direct)
			if head != tt.head || mid != tt.mid {
				t.Fatalf("split(%d bytes at memory skew %d, off %d) = head %d, mid %d; want %d, %d", tt.n, tt.skew, tt.off, head, mid, tt.head, tt.mid)
			}
			if mid > 0 && ((tt.off+int64(head))%Align != 0 || mid%Align != 0 || addr(p[head:])%Align != 0) {
				t.Fatalf("middle not aligned: off %d, len %d", tt.off+int64(head), mid)
			}
		})
	}
}

// TestWriteAt writes a file in pieces of every size and alignment, in
// parallel, on a disk file system and on tmpfs, and checks every byte.
func TestWriteAt(t *testing.T) {
	dirs := []string{t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "vmshadow-test-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			dirs = append(dirs, d)
		}
	}
	type piece struct {
		off  int64
		skew int
		data []byte
	}
	sizes := []int{1, 4095, MinSize - 1, MinSize, MinSize + 1, 4 << 20, 4<<20 + 1000}
	var pieces []piece
	var off int64
	for i, size := range sizes {
		for j, skew := range []int{0, 1, 512} {
			// Every other piece starts at a 4 KiB boundary of the file;
			// the others keep the skew so that memory and file offset
			// agree (the O_DIRECT path with a head).
			if (i+j)%2 == 0 {
				off = (off + Align - 1) &^ (Align - 1)
			} else {
				off = (off &^ (Align - 1)) + Align + int64(skew)
			}
			pieces = append(pieces, piece{off, skew, alignedBuf(size, skew)})
			off += int64(size)
		}
	}
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			p := filepath.Join(dir, "file")
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			w := New(f, os.O_WRONLY)
			var wg sync.WaitGroup
			errc := make(chan error, len(pieces))
			for _, pc := range pieces {
				wg.Go(func() {
					n, err := w.WriteAt(pc.data, pc.off)
					if err == nil && n != len(pc.data) {
						err = fmt.Errorf("wrote %d of %d bytes", n, len(pc.data))
					}
					if err != nil {
						errc <- fmt.Errorf("WriteAt(%d bytes, off %d): %w", len(pc.data), pc.off, err)
					}
				})
			}
			wg.Wait()
			close(errc)
			for err := range errc {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			for _, pc := range pieces {
				if !bytes.Equal(got[pc.off:pc.off+int64(len(pc.data))], pc.data) {
					t.Fatalf("the %d bytes written at %d differ", len(pc.data), pc.off)
				}
			}
			testReadAt(t, p, got)
		})
	}
}

// testReadAt reads the file at p, whose content is want, back through a
// File in pieces of every size and alignment, in parallel, and across its
// end.
func testReadAt(t *testing.T, p string, want []byte) {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := New(f, os.O_RDONLY)
	defer r.Close()
	size := int64(len(want))
	type req struct {
		off     int64
		n, skew int
		wantN   int
		wantEOF bool
	}
	var reqs []req
	for _, n := range []int{1, 4095, MinSize, 4<<20 + 1000} {
		for _, skew := range []int{0, 1, 512} {
			for _, off := range []int64{0, int64(skew), 8192 + int64(skew), 12345} {
				reqs = append(reqs, req{off: off, n: n, skew: skew, wantN: n})
			}
		}
	}
	// Across the end: the aligned middle would reach past it.
	for _, tail := range []int{1, 4095, 100000} {
		off := (size - int64(tail)) &^ (Align - 1)
		n := int(size-off) + MinSize
		reqs = append(reqs, req{off: off, n: n, skew: 0, wantN: int(size - off), wantEOF: true})
	}
	var wg sync.WaitGroup
	errc := make(chan error, len(reqs))
	for _, rq := range reqs {
		wg.Go(func() {
			buf := alignedBuf(rq.n, rq.skew)
			n, err := r.ReadAt(buf, rq.off)
			switch {
			case rq.wantEOF && (err != io.EOF || n != rq.wantN):
				errc <- fmt.Errorf("ReadAt(%d bytes, off %d) across the end = %d, %v; want %d, EOF", rq.n, rq.off, n, err, rq.wantN)
			case !rq.wantEOF && (err != nil || n != rq.wantN):
				errc <- fmt.Errorf("ReadAt(%d bytes, off %d) = %d, %v", rq.n, rq.off, n, err)
			case !bytes.Equal(buf[:n], want[rq.off:rq.off+int64(n)]):
				errc <- fmt.Errorf("ReadAt(%d bytes, off %d, memory skew %d) read other bytes", rq.n, rq.off, rq.skew)
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

// TestOpensDirect checks that a file on a disk file system gets its
// O_DIRECT descriptor (else every request would quietly take the slow
// path).
func TestOpensDirect(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC || st.Type == unix.OVERLAYFS_SUPER_MAGIC {
		t.Skipf("%s is on tmpfs or overlayfs, which may refuse O_DIRECT", dir)
	}
	f, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := New(f, os.O_WRONLY)
	defer d.Close()
	if d.direct == nil {
		t.Fatalf("no O_DIRECT descriptor for a file in %s (file system type %#x)", dir, st.Type)
	}
}
