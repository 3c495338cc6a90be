package local

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unsafe"
)

// alignedBuf returns n bytes of random data starting at skew bytes past a
// 4 KiB boundary.
func alignedBuf(n, skew int) []byte {
	b := make([]byte, n+2*directAlign)
	off := (directAlign - int(uintptr(unsafe.Pointer(&b[0]))%directAlign)) % directAlign
	b = b[off+skew : off+skew+n]
	r := rand.NewChaCha8([32]byte{byte(n), byte(skew)})
	r.Read(b)
	return b
}

// TestWriteFile checks that blobs of every size and alignment are written
// exactly, whether or not they take the O_DIRECT path, on a disk file
// system and on tmpfs.
func TestWriteFile(t *testing.T) {
	dirs := []string{t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "vmshadow-test-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			dirs = append(dirs, d)
		}
	}
	sizes := []int{1, 4095, directMin - 1, directMin, directMin + 1, 4 << 20, 4<<20 + 1000}
	for _, dir := range dirs {
		for _, size := range sizes {
			for _, skew := range []int{0, 1, 512} {
				t.Run(fmt.Sprintf("%s/%d/skew%d", filepath.Base(dir), size, skew), func(t *testing.T) {
					data := alignedBuf(size, skew)
					p := filepath.Join(dir, fmt.Sprintf("blob-%d-%d", size, skew))
					f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
					if err != nil {
						t.Fatal(err)
					}
					if err := writeFile(f, data); err != nil {
						t.Fatalf("writeFile: %v", err)
					}
					if err := f.Close(); err != nil {
						t.Fatal(err)
					}
					got, err := os.ReadFile(p)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, data) {
						t.Fatalf("file holds %d bytes that differ from the %d written", len(got), len(data))
					}
				})
			}
		}
	}
}
