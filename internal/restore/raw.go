package restore

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/directio"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// rawFile writes a raw image to a new regular file (sparse) or a block
// device (zero ranges are zeroed explicitly).
type rawFile struct {
	f     *os.File
	w     *directio.File // writes through f, and O_DIRECT where it can
	path  string
	block bool
	zeros []byte
	part  *partialFile // a regular file: written under a temporary name
}

// CreateRaw creates the raw image path for a disk of size bytes. A regular
// file must not exist yet (a restore never overwrites a file); it is
// written under a temporary name and only appears under path once Close
// has completed it (partial.go). A block device must be at least size
// bytes; it is written in place, so an interrupted restore leaves it with
// partial content.
func CreateRaw(path string, size int64) (ImageWriter, error) {
	st, err := os.Stat(path)
	switch {
	case err == nil && st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("open block device %s: %w", path, err)
		}
		dsize, err := f.Seek(0, io.SeekEnd)
		if err != nil || dsize < size {
			f.Close()
			return nil, fmt.Errorf("block device %s has %d bytes, the disk needs %d: %w", path, dsize, size, errs.ErrNoSpace)
		}
		return &rawFile{f: f, w: directio.New(f, os.O_WRONLY), path: path, block: true}, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("restore target %s: %w", path, err)
	}
	p, err := createPartial(path, os.O_WRONLY)
	if err != nil {
		return nil, err
	}
	if err := p.Truncate(size); err != nil {
		p.abort()
		return nil, fmt.Errorf("size %s to %d bytes: %w", p.Name(), size, mapNoSpace(err))
	}
	return &rawFile{f: p.File, w: directio.New(p.File, os.O_WRONLY), path: path, part: p}, nil
}

func (r *rawFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := r.w.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", r.path, mapNoSpace(err))
	}
	return n, nil
}

// WriteZeroes is only used for block devices; a new regular file already
// reads zeros where nothing was written.
func (r *rawFile) WriteZeroes(off, n int64) error {
	if !r.block {
		return nil
	}
	if unix.Fallocate(int(r.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n) == nil {
		return nil
	}
	if r.zeros == nil {
		r.zeros = make([]byte, 1<<20)
	}
	for n > 0 {
		m := min(n, int64(len(r.zeros)))
		if _, err := r.f.WriteAt(r.zeros[:m], off); err != nil {
			return fmt.Errorf("zero %s at offset %d: %w", r.path, off, mapNoSpace(err))
		}
		off += m
		n -= m
	}
	return nil
}

// Close completes the image: a regular file is synced and renamed to its
// final name (or removed on failure), a block device synced.
func (r *rawFile) Close() error {
	if err := r.w.Close(); err != nil {
		r.Abort()
		return fmt.Errorf("close %s: %w", r.path, err)
	}
	if r.part != nil {
		return r.part.commit()
	}
	if err := r.f.Sync(); err != nil {
		r.f.Close()
		return fmt.Errorf("sync %s: %w", r.path, mapNoSpace(err))
	}
	return r.f.Close()
}

// Abort ends a failed restore: a regular file's temporary file is removed,
// nothing ever appears under its final name; a block device keeps what was
// written.
func (r *rawFile) Abort() {
	r.w.Close()
	if r.part != nil {
		r.part.abort()
		return
	}
	r.f.Close()
}

func mapNoSpace(err error) error {
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%v: %w", err, errs.ErrNoSpace)
	}
	return err
}
