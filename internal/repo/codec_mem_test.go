package repo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// allocated returns the bytes allocated while f runs.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A damaged blob must cost memory in proportion to what it holds, not to
// the plaintext length its header claims.
func TestOpenDamagedBlobMemoryBounded(t *testing.T) {
	plain, _ := newTestRepo(t, EncryptionNone)
	// Found by FuzzOpenBlob: a 40-byte index blob whose header claims a
	// 671 MB plaintext (testdata/fuzz/FuzzOpenBlob/damaged-index-claims-671MB).
	crasher := []byte("vsIX\x01\x01\x00\x00X\x00\x00(\xb5/\xfd\x00\x00\x8d\x00\x00(\x00\x00\x02\x00\x01\x04\x00\x05\x12\xa8b\x12\xdc\xcb\xe0\x88")

	// A real index blob (an all-zero index of a 1 TiB disk compresses to a
	// few KiB) whose header then claims more than the plaintext.
	x, err := NewIndex(1<<40, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	lying := plain.codec.seal(nil, magicIndex, "x", x.Encode(), true)
	if lying[5] != compZstd {
		t.Fatal("index not compressed")
	}
	binary.LittleEndian.PutUint32(lying[8:12], maxMetaPlain)

	// A well-formed zstd frame that does not state its content size (one
	// raw 10-byte block), under a header claiming 1 GiB.
	noFCS := []byte("vsIX\x01\x01\x00\x00\x00\x00\x00\x40\x28\xb5\x2f\xfd\x00\x00")
	noFCS = append(noFCS, 10<<3|1, 0, 0)
	noFCS = append(noFCS, "0123456789"...)

	// The same frame stating a content size of 1 GiB, as the header does.
	withFCS := []byte("vsIX\x01\x01\x00\x00\x00\x00\x00\x40\x28\xb5\x2f\xfd\x80\x00\x00\x00\x00\x40")
	withFCS = append(withFCS, 10<<3|1, 0, 0)
	withFCS = append(withFCS, "0123456789"...)

	// A chunk claiming more than the repository's chunk size.
	chunk := plain.SealChunk(nil, plain.HashChunk(bytes.Repeat([]byte{7}, 1000)), bytes.Repeat([]byte{7}, 1000))
	binary.LittleEndian.PutUint32(chunk[8:12], MaxChunkSize)

	for _, c := range []struct {
		name  string
		magic [4]byte
		blob  []byte
		max   int
	}{
		{"fuzz crasher", magicIndex, crasher, maxMetaPlain},
		{"index claiming 1 GiB", magicIndex, lying, maxMetaPlain},
		{"frame without content size, claiming 1 GiB", magicIndex, noFCS, maxMetaPlain},
		{"frame and header claiming 1 GiB", magicIndex, withFCS, maxMetaPlain},
		{"manifest claiming 671 MB", magicManifest, append([]byte("vsMF"), crasher[4:]...), maxManifestPlain},
		{"chunk claiming 64 MiB", magicChunk, chunk, int(plain.ChunkSize())},
	} {
		t.Run(c.name, func(t *testing.T) {
			var err error
			n := allocated(func() {
				_, err = plain.codec.open(nil, c.magic, "x", append([]byte(nil), c.blob...), c.max)
			})
			if !errors.Is(err, errs.ErrCorrupt) {
				t.Errorf("open: %v, want ErrCorrupt", err)
			}
			if n > 4<<20 {
				t.Errorf("opening a %d-byte damaged blob allocated %d bytes, want < 4 MiB", len(c.blob), n)
			}
			t.Logf("%d bytes allocated: %v", n, err)
		})
	}
}
