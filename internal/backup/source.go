// Package backup owns the backup data path shared by image-file backups and
// live VM backups: each disk's Source gives an extent plan; chunks are read
// in parallel, hashed, looked up, compressed, encrypted and stored; then
// each disk's index and finally the backup's manifest are written.
//
//	extent plan -> planner -> readers -> workers (zero check, hash, dedup,
//	compress+encrypt) -> uploaders -> index per disk -> manifest
//
// Memory is bounded by the number of chunk buffers in flight (about
// (2*Readers + 2*Workers + Uploaders + 2) x chunk size), whatever the disk size,
// plus 32 bytes of index per chunk of disk.
package backup

import (
	"context"
	"fmt"
	"iter"
)

// ExtentKind says what the backup must do with a byte range of a disk.
type ExtentKind int

const (
	// Data must be read.
	Data ExtentKind = iota
	// Zero is known to read as zeros: not read.
	Zero
	// Unchanged is identical to the same range in the disk's base index
	// (the previous backup): a chunk wholly unchanged reuses the base entry
	// without reading.
	Unchanged
)

func (k ExtentKind) String() string {
	switch k {
	case Data:
		return "data"
	case Zero:
		return "zero"
	case Unchanged:
		return "unchanged"
	}
	return "invalid"
}

// Extent is a byte range of a disk with its kind.
type Extent struct {
	Off, Len int64
	Kind     ExtentKind
}

// Source is one disk to back up.
type Source interface {
	// Name is the disk's name in the backup (see repo.ValidName).
	Name() string
	// Size is the disk size in bytes at the snapshot instant.
	Size() int64
	// ReadAt reads len(p) bytes at off. It must be safe for concurrent use;
	// fewer bytes than asked is an error (for an image, a sign that it
	// shrank during the backup).
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	// Extents yields the extent plan in ascending offset order, without
	// overlaps, within [0, Size). Ranges it does not cover are Data. It is
	// consumed once, lazily, so a source never materialises a whole disk's
	// extents. An error ends the plan and fails the backup.
	Extents(ctx context.Context) iter.Seq2[Extent, error]
}

// Finisher is implemented by sources that can check, after every read,
// that what they read is still valid (an image file checks that its size did
// not change during the backup).
type Finisher interface {
	Finish(ctx context.Context) error
}

// DoneSource is a Source told when the backup has finished with it (read
// in full, or failed), so that it can give back what it holds (the
// connections of a server that limits them) before the next disk is read.
type DoneSource interface {
	Source
	Done()
}

// Bytes is a Source of data held in memory (a file describing the VM, see
// Job.Files); every byte is Data.
func Bytes(name string, data []byte) Source { return &bytesSource{name, data} }

type bytesSource struct {
	name string
	data []byte
}

func (s *bytesSource) Name() string { return s.name }
func (s *bytesSource) Size() int64  { return int64(len(s.data)) }

func (s *bytesSource) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(s.data)) {
		return 0, fmt.Errorf("%s: read of %d bytes at %d beyond its %d bytes", s.name, len(p), off, len(s.data))
	}
	return copy(p, s.data[off:]), nil
}

func (s *bytesSource) Extents(context.Context) iter.Seq2[Extent, error] {
	return func(func(Extent, error) bool) {}
}
