package repo

import (
	"encoding/binary"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Index is the fixed-chunk index of one disk in one backup (like a Proxmox
// Backup Server .fidx): entry i holds the ID of the chunk covering disk bytes
// [i*ChunkSize, min((i+1)*ChunkSize, Size)), or the zero ID when those bytes
// are all zero (nothing stored). Every backup has a complete index, so a
// restore never replays a chain.
//
// Set may be called concurrently for different entries.
type Index struct {
	size      int64
	chunkSize int64
	ids       []byte // 32 bytes per entry
}

// Index plaintext layout (then sealed as a "vsIX" blob), little-endian:
//
//	0  8  disk size in bytes
//	8  4  chunk size in bytes
//	12 4  reserved, 0
//	16 8  entry count = ceil(size / chunk size)
//	24 .. entries, 32 bytes each: chunk ID, or 32 zero bytes for a zero chunk
const indexHeaderLen = 24

// NewIndex returns an index of all-zero entries for a disk of size bytes.
func NewIndex(size, chunkSize int64) (*Index, error) {
	if size < 0 || chunkSize < MinChunkSize || chunkSize > MaxChunkSize || chunkSize&(chunkSize-1) != 0 {
		return nil, fmt.Errorf("invalid index geometry: size %d, chunk size %d: %w", size, chunkSize, errs.ErrUsage)
	}
	n := size / chunkSize // ceil without overflowing near math.MaxInt64
	if size%chunkSize != 0 {
		n++
	}
	if n > (maxMetaPlain-indexHeaderLen)/32 {
		return nil, fmt.Errorf("disk of %d bytes needs an index larger than %d bytes: use a larger chunk size: %w", size, maxMetaPlain, errs.ErrUnsupported)
	}
	return &Index{size: size, chunkSize: chunkSize, ids: make([]byte, n*32)}, nil
}

// Size is the disk size in bytes.
func (x *Index) Size() int64 { return x.size }

// ChunkSize is the chunk size in bytes.
func (x *Index) ChunkSize() int64 { return x.chunkSize }

// Len is the number of entries.
func (x *Index) Len() int { return len(x.ids) / 32 }

// ID returns entry i.
func (x *Index) ID(i int) ID { return ID(x.ids[i*32 : i*32+32]) }

// Set sets entry i.
func (x *Index) Set(i int, id ID) { copy(x.ids[i*32:], id[:]) }

// Range returns the disk offset and length entry i covers.
func (x *Index) Range(i int) (off, n int64) {
	off = int64(i) * x.chunkSize
	return off, min(x.chunkSize, x.size-off)
}

// Encode returns the index plaintext.
func (x *Index) Encode() []byte {
	b := make([]byte, indexHeaderLen+len(x.ids))
	binary.LittleEndian.PutUint64(b[0:], uint64(x.size))
	binary.LittleEndian.PutUint32(b[8:], uint32(x.chunkSize))
	binary.LittleEndian.PutUint64(b[16:], uint64(x.Len()))
	copy(b[indexHeaderLen:], x.ids)
	return b
}

// DecodeIndex parses index plaintext. Malformed input is errs.ErrCorrupt.
func DecodeIndex(b []byte) (*Index, error) {
	if len(b) < indexHeaderLen {
		return nil, fmt.Errorf("index truncated: %d bytes: %w", len(b), errs.ErrCorrupt)
	}
	size := binary.LittleEndian.Uint64(b[0:])
	cs := int64(binary.LittleEndian.Uint32(b[8:]))
	count := binary.LittleEndian.Uint64(b[16:])
	if binary.LittleEndian.Uint32(b[12:]) != 0 {
		return nil, fmt.Errorf("index has reserved bits set: %w", errs.ErrCorrupt)
	}
	if size > 1<<62 || cs < MinChunkSize || cs > MaxChunkSize || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("index has invalid geometry: size %d, chunk size %d: %w", size, cs, errs.ErrCorrupt)
	}
	want := (size + uint64(cs) - 1) / uint64(cs)
	if count != want || uint64(len(b)-indexHeaderLen) != count*32 {
		return nil, fmt.Errorf("index of a %d-byte disk has %d entries and %d entry bytes, want %d entries: %w", size, count, len(b)-indexHeaderLen, want, errs.ErrCorrupt)
	}
	return &Index{size: int64(size), chunkSize: cs, ids: append([]byte(nil), b[indexHeaderLen:]...)}, nil
}
