//go:build linux

package nbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
)

// FileExport serves a regular file (a raw image) as an Export with writes,
// flush (fsync), trim and zeroing (fallocate) and allocation reported from
// the file's holes (SEEK_DATA/SEEK_HOLE). Its size is the file's size when
// it was created. Serve a file opened read-only with ExportOptions.ReadOnly.
type FileExport struct {
	f      *os.File
	size   int64
	seekMu sync.Mutex // SEEK_DATA/SEEK_HOLE move the file offset
}

// NewFileExport wraps f, which the caller keeps and closes.
func NewFileExport(f *os.File) (*FileExport, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("nbd file export %s: not a regular file", f.Name())
	}
	return &FileExport{f: f, size: fi.Size()}, nil
}

// Size is the size of the file when the export was made.
func (e *FileExport) Size() int64 { return e.size }

// ReadAt reads from the file.
func (e *FileExport) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	return e.f.ReadAt(p, off)
}

// WriteAt writes to the file.
func (e *FileExport) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	return e.f.WriteAt(p, off)
}

// Flush syncs the file.
func (e *FileExport) Flush(context.Context) error { return e.f.Sync() }

const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Trim punches a hole; file systems that cannot are left as they are.
func (e *FileExport) Trim(_ context.Context, off, length int64) error {
	err := syscall.Fallocate(int(e.f.Fd()), fallocPunchHole|fallocKeepSize, off, length)
	if errors.Is(err, syscall.EOPNOTSUPP) {
		return nil
	}
	return err
}

// WriteZeroes punches a hole (punch) or zeroes the range in place, falling
// back to writing zeroes where the file system cannot.
func (e *FileExport) WriteZeroes(ctx context.Context, off, length int64, punch bool) error {
	mode := uint32(fallocZeroRange | fallocKeepSize)
	if punch {
		mode = fallocPunchHole | fallocKeepSize
	}
	err := syscall.Fallocate(int(e.f.Fd()), mode, off, length)
	if !errors.Is(err, syscall.EOPNOTSUPP) {
		return err
	}
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if _, err := e.f.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// maxFileExtents bounds the extents one Extents call returns.
const maxFileExtents = 4096

const (
	seekData = 3
	seekHole = 4
)

// Extents reports the file's data and holes in [off, off+length).
func (e *FileExport) Extents(_ context.Context, off, length int64) ([]Extent, error) {
	e.seekMu.Lock()
	defer e.seekMu.Unlock()
	end := off + length
	var out []Extent
	for pos := off; pos < end && len(out) < maxFileExtents; {
		data, err := e.f.Seek(pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			data = end // no data after pos
		} else if err != nil {
			return nil, err
		}
		if data > pos {
			out = append(out, Extent{Offset: pos, Length: min(data, end) - pos, Flags: StateHole | StateZero})
			pos = min(data, end)
			continue
		}
		hole, err := e.f.Seek(pos, seekHole)
		if err != nil {
			return nil, err
		}
		if hole <= pos { // the file changed between the two seeks
			hole = end
		}
		out = append(out, Extent{Offset: pos, Length: min(hole, end) - pos})
		pos = min(hole, end)
	}
	return out, nil
}
